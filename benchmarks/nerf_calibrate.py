"""Calibrating the distillation race's target against what matters: the test PSNR after
fine-tuning.

One BatchedLBFGS distillation run is stopped at increasing ``distill_psnr`` levels (its
optimiser state carried across the stops, so it is one run); a snapshot of the field is
kept at each level. Every snapshot is then fine-tuned on the photos with the same number of
Adam steps (the pipeline's fine-tune stage) and evaluated on the test views. The reference
is the best fine-tuned test PSNR; the calibrated target is the lowest level whose
fine-tuned test PSNR is within ``tolerance_db`` of it.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Callable, Dict, Optional, Sequence

import torch

from benchmarks.nerf_distill import DistillSetup
from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.io import load_checkpoint
from kilonerf_lbfgs.nerf.evaluate import evaluate
from kilonerf_lbfgs.nerf.train.photometric import (LoopState, PhotometricConfig,
                                                   make_photometric_optimizer, train_photometric)


def distill_snapshots(setup: DistillSetup, levels: Sequence[float], max_seconds: float,
                      history_size: int, seed: int = 0,
                      log: Callable[[str], None] = print, max_evals: int = 0) -> list:
    """``[{"level", "distill_psnr", "distill_seconds", "state"}, ...]`` for each level the
    run reaches within ``max_seconds`` (and, when ``max_evals > 0``, that many closure
    evaluations per level; the last entry: the state at the budget when the highest level
    is not reached)."""
    field = setup.make_field(seed)
    out, resume = [], None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "fit.pt")
        for level in sorted(levels):
            if out and out[-1]["distill_psnr"] >= level:    # one step crossed several levels
                out.append({**out[-1], "level": level, "state": out[-1]["state"]})
                continue
            cfg = FitConfig(optimizer="lbfgs", history_size=history_size, max_seconds=max_seconds,
                            max_evals=max_evals and max_evals + (resume or {}).get(
                                "function_evals", 0),
                            target=level, progress=False, ckpt_path=ckpt, ckpt_every=1e18,
                            keep_best=False)
            res = fit(field, setup.problem, cfg, resume=resume)
            resume = load_checkpoint(ckpt)
            snap = {"level": level if res.reached_target else None,
                    "distill_psnr": res.quality, "distill_seconds": res.train_seconds,
                    "state": copy.deepcopy(field.state_dict())}
            out.append(snap)
            log(f"  distill_psnr {res.quality:.2f} after {res.train_seconds:.1f} s"
                + ("" if res.reached_target else f" (level {level} not reached)"))
            if not res.reached_target:
                break
    return out


def finetune_and_test(setup: DistillSetup, state: Dict, steps: int, lr: float, seed: int = 0
                      ) -> Dict:
    """Fine-tune a copy of the field (from ``state``) on the photos with ``steps`` Adam
    steps and a copy of the teacher's occupancy grid; test PSNR/SSIM on the test views."""
    field = setup.make_field(seed)
    field.load_state_dict(state)
    marcher = copy.deepcopy(setup.marcher)
    cfg = PhotometricConfig(optimizer="adam", lr=lr, batch_rays=setup.opts.batch_rays,
                            seconds=1e18, max_steps=steps, occ_warmup=0.0, desc="finetune")
    loop = train_photometric(field, marcher, setup.bank, setup.rs, cfg, LoopState(),
                             make_photometric_optimizer(field, cfg),
                             torch.Generator().manual_seed(seed + 2), progress=False)
    m = evaluate(field, marcher, setup.data["test"], setup.rs, progress=False)
    return {"finetune_seconds": loop.seconds, "finetune_steps": loop.steps,
            "test_psnr": m["test_psnr"], "test_ssim": m["test_ssim"]}


def pick_target(rows: Sequence[Dict], tolerance_db: float):
    """``(best test_psnr, lowest reached level within tolerance_db of it or None)``."""
    reference = max(r["test_psnr"] for r in rows)
    ok = [r["level"] for r in rows
          if r["level"] is not None and r["test_psnr"] >= reference - tolerance_db]
    return reference, min(ok, default=None)


def calibrate_distill_target(setup: DistillSetup, levels: Sequence[float], max_seconds: float,
                             history_size: int, finetune_steps: int,
                             finetune_lr: Optional[float] = None, tolerance_db: float = 0.5,
                             log: Callable[[str], None] = print) -> Dict:
    """The calibration report (see the module docstring)."""
    lr = finetune_lr or setup.opts.finetune_lr
    rows, last_state, r = [], None, None
    for snap in distill_snapshots(setup, levels, max_seconds, history_size, log=log):
        state = snap.pop("state")
        if state is not last_state:         # levels crossed by one step share a snapshot
            r = finetune_and_test(setup, state, finetune_steps, lr)
            last_state = state
        rows.append({**snap, **r})
        log(f"  distill_psnr {snap['distill_psnr']:.2f} -> fine-tuned test PSNR "
            f"{r['test_psnr']:.2f} dB ({r['finetune_steps']} steps, "
            f"{r['finetune_seconds']:.0f} s)")
    reference, target = pick_target(rows, tolerance_db)
    return {"levels": rows, "reference_test_psnr": reference, "tolerance_db": tolerance_db,
            "calibrated_target": target, "finetune_steps": finetune_steps, "finetune_lr": lr,
            "n_test_views": len(setup.data["test"]),
            "note": ("calibrated_target: the lowest distill_psnr level whose fine-tuned test "
                     "PSNR is within tolerance_db of the best fine-tuned test PSNR; None when "
                     "only the unfinished run's final state is within it")}
