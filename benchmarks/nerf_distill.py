"""The distillation race: one teacher, one set of cells and samples, every optimiser.

The teacher is trained once on the photos (pure-torch dense grids, Adam; not timed in the
race) and cached next to the benchmark outputs, so reruns and every contender share it. Its
density sets the occupancy grid and so the cells that hold a network; its samples (training
rays marched through that grid) are the distillation data. The race then times only the
distillation: ``batched_lbfgs`` against swept Adam and torch's L-BFGS, all on the same
:class:`DistillProblem`, in ``distill_psnr`` (``-10 log10`` of the mean per-sample loss).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from benchmarks.race import Race
from kilonerf_lbfgs.fitting import FitConfig
from kilonerf_lbfgs.grid import CellGrid
from kilonerf_lbfgs.io import load_checkpoint, save_checkpoint
from kilonerf_lbfgs.nerf.data.loaders import load_dataset
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.fields.kilonerf import KiloNeRFField
from kilonerf_lbfgs.nerf.render.marcher import Marcher
from kilonerf_lbfgs.nerf.train.distill import DistillProblem, collect_distill_samples
from kilonerf_lbfgs.nerf.train.photometric import LoopState, PhotometricConfig, train_photometric
from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions, new_teacher, teacher_lr

LEGO_BOX = [-0.7, -1.25, -0.4, 0.7, 1.25, 1.05]

NERF_DISTILL_PRESETS = {
    # lego at 100x100, 16^3 cells (3x32 sine trunk + 32-wide head per cell), teacher 600 s.
    # History 20 for both L-BFGS contenders: ~3000 cells x 3475 parameters make m = 100 an
    # 8 GB history (3.7 s per evaluation here); m = 20 is 1.6 GB. omega_0 10 as in
    # configs/lego.txt (the field the pipeline trains). The targets are a distill_psnr
    # ladder; scripts/calibrate_distill_target.py adds the calibrated one (benchmarks/nerf_calibrate.py).
    "lego": dict(downsample=4, aabb=LEGO_BOX, grid_res=16, occ_res=64, omega_0=10.0,
                 teacher_seconds=600.0, history_size=20,
                 distill_rays=65536, max_per_cell=512, targets=(12.0, 15.0, 18.0),
                 budget=240.0,
                 quick=dict(teacher_seconds=240.0, distill_rays=32768, max_per_cell=256,
                            budget=120.0)),
}


def _teacher_cache(datadir: str, spec: Dict, cache_dir: str) -> str:
    key = json.dumps({"data": os.path.abspath(datadir), **{k: spec[k] for k in
                      ("downsample", "aabb", "occ_res", "teacher_seconds")},
                      "teacher_steps": spec.get("teacher_steps", 0)}, sort_keys=True)
    return os.path.join(cache_dir, f"nerf_teacher_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt")


@dataclass
class DistillSetup:
    """What every distillation contender (and the target calibration) shares."""
    data: Dict                      # the scene's splits
    opts: NerfOptions
    rs: object                      # RenderSettings
    bank: RayBank
    marcher: Marcher                # the teacher's occupancy grid
    teacher: torch.nn.Module        # the opts' teacher (dense by default)
    occupied: torch.Tensor          # [grid_res^3] bool: cells that hold a network
    problem: DistillProblem
    device: torch.device = torch.device("cpu")   # where the race runs (the setup is built on the CPU)

    def make_field(self, seed: int) -> KiloNeRFField:
        o = self.opts
        return KiloNeRFField(o.aabb, o.grid_res, self.occupied.cpu(), o.width, o.depth,
                             o.feature_dim, o.head_width, o.activation, o.omega_0,
                             o.head_omega, generator=torch.Generator().manual_seed(1000 + seed),
                             device=self.device)


def prepare_distillation(spec: Dict, datadir: str, cache_dir: str = "bench",
                         progress: bool = True, test_every: int = 1,
                         device="cpu") -> DistillSetup:
    """Load the scene, train (or load the cached) teacher, collect the distillation samples.

    All of it on the CPU; ``device`` is where the problem's samples and the fields go (the
    race's device)."""
    data = load_dataset(datadir, downsample=spec["downsample"], test_every=test_every)
    opts = NerfOptions(aabb=list(spec["aabb"]), grid_res=spec["grid_res"],
                       occ_res=spec["occ_res"], omega_0=spec["omega_0"],
                       near=data["train"].near, far=data["train"].far)
    rs = opts.settings("cpu")
    bank = RayBank(data["train"])
    marcher = Marcher(opts.aabb, opts.occ_res, threshold=opts.occ_threshold)
    teacher = new_teacher(opts, "cpu")
    path = _teacher_cache(datadir, spec, cache_dir)
    if os.path.isfile(path):
        ck = load_checkpoint(path)
        teacher.load_state_dict(ck["teacher"])
        marcher.load_state_dict(ck["marcher"])
        print(f"teacher from cache {path}")
    else:
        # teacher_steps > 0 (tests): a step budget, so the teacher does not depend on the clock
        cfg = PhotometricConfig(optimizer="adam", batch_rays=opts.batch_rays,
                                seconds=spec["teacher_seconds"],
                                max_steps=spec.get("teacher_steps", 0), desc="teacher")
        gen = torch.Generator().manual_seed(0)
        train_photometric(teacher, marcher, bank, rs, cfg, LoopState(),
                          teacher.optimizer(lr_grid=teacher_lr(opts, teacher)), gen,
                          progress=progress)
        marcher.update(teacher.density, rs.step_size)
        save_checkpoint(path, {"teacher": teacher.state_dict(), "marcher": marcher.state_dict()})
    occupied = marcher.grid.cells_occupied(CellGrid(opts.aabb[:3], opts.aabb[3:], opts.grid_res))
    setup = DistillSetup(data, opts, rs, bank, marcher, teacher, occupied, None)
    samples = collect_distill_samples(teacher, marcher, bank, setup.make_field(0), rs,
                                      spec["distill_rays"], spec["max_per_cell"],
                                      torch.Generator().manual_seed(1))
    setup.problem = DistillProblem(samples.to(device), rs.step_size)
    setup.device = torch.device(device)
    print(f"distillation: {setup.problem.n_cells} cells with networks "
          f"({int(occupied.sum())}/{occupied.numel()}), {int(samples.counts.sum())} samples")
    return setup


def build_distill_race(spec: Dict, datadir: str, seeds: Sequence[int], budget: Optional[float],
                       cache_dir: str = "bench", progress: bool = True, device="cpu") -> Race:
    setup = prepare_distillation(spec, datadir, cache_dir, progress, device=device)
    m = spec["history_size"]
    return Race(setup.problem, setup.make_field, targets=spec["targets"],
                budget=budget or spec["budget"], seeds=seeds,
                lbfgs=FitConfig(optimizer="lbfgs", history_size=m),
                torch_lbfgs=FitConfig(optimizer="torch_lbfgs", history_size=m, evals_per_step=20),
                per_cell_lbfgs=FitConfig(optimizer="torch_lbfgs", history_size=m,
                                         evals_per_step=20))


def apply_calibration(race: Race, meta: Dict, path: str) -> None:
    """Add the calibrated target (``scripts/calibrate_distill_target.py`` wrote ``path``) to
    the race's targets, and say in ``meta["target_note"]`` where every target comes from."""
    calib = None
    if os.path.isfile(path):
        with open(path) as f:
            calib = json.load(f)
    if calib is None or calib.get("calibrated_target") is None:
        meta["target_note"] = (
            "targets are distill_psnr = -10 log10(mean per-sample loss: (alpha_s - alpha_t)^2 "
            f"+ mean rgb squared error); no calibrated target in {path} (run "
            "scripts/calibrate_distill_target.py), so they are provisional")
        return
    target = float(calib["calibrated_target"])
    race.targets = tuple(sorted(set(map(float, race.targets)) | {target}))
    meta["calibrated_target"] = target
    meta["target_note"] = (
        f"calibrated target: distill_psnr {target:g} is the lowest level at which the field, "
        f"fine-tuned for {calib['finetune_steps']} Adam steps, is within "
        f"{calib['tolerance_db']} dB of the best fine-tuned test PSNR "
        f"({calib['reference_test_psnr']:.2f} dB on {calib['n_test_views']} test views; "
        f"{path}); the other targets are a ladder for the curves")
