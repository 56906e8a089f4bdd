#!/usr/bin/env python
"""Does a reduced-precision L-BFGS history change the optimisation? Evaluations to each target.

    python scripts/benchmark_history_dtype.py                      # image fidelity, 3 seeds
    python scripts/benchmark_history_dtype.py --images camera coffee --distill

BatchedLBFGS (the races' settings: history 100, strong Wolfe) runs with its curvature pairs
stored in each ``--dtypes`` entry, one evaluation per step, and the quality is measured after
every evaluation: the table gives the evaluations to each target (they do not depend on the
machine) and the optimiser's seconds. Images: the fidelity preset (256x256 crop, 8x8 cells,
targets 40-70 dB), on ``--images`` (camera is the preset's; the others check the result on
pictures it was not chosen for). ``--distill``: the NeRF distillation race's quick setup
(lego at 100x100, ~3000 cells, history 20; its teacher is trained once and cached in bench/),
distill PSNR after each of ``--distill_evals`` evaluations (past the race's targets).
"""
import os
import sys
import time
from pathlib import Path

import configargparse
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.presets import MODALITIES, image_race  # noqa: E402
from benchmarks.records import PROVENANCE, add_record_args, write_record  # noqa: E402
from kilonerf_lbfgs.config import parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402
from kilonerf_lbfgs.optim import BatchedLBFGS  # noqa: E402


def one_step_fn(race, model, dtype: str):
    """A function that takes one BatchedLBFGS step (``race.lbfgs`` settings, one evaluation
    per step, the history in ``dtype``) on ``model``."""
    cfg = race.lbfgs
    opt = BatchedLBFGS(model.parameters(), lr=cfg.lr or 1.0, max_eval=1,
                       history_size=cfg.history_size, history_dtype=dtype,
                       line_search=None if cfg.line_search == "none" else cfg.line_search)

    def closure():
        opt.zero_grad()
        return race.problem.loss_and_backward(model)
    return lambda: opt.step(closure)


def trajectory(race, seed: int, dtype: str, max_evals: int, stop_at_top: bool = True) -> dict:
    """Quality after every evaluation of BatchedLBFGS for ``max_evals`` evaluations, or until
    the highest target."""
    # warm-up on a throwaway model of the same shape: the reduced-precision kernels compile
    # on first use (once per shape), which the timed run should not pay
    step = one_step_fn(race, race.make_model(seed), dtype)
    for _ in range(3):
        step()
    model = race.make_model(seed)
    step = one_step_fn(race, model, dtype)
    problem = race.problem
    qualities, seconds = [], 0.0
    top = max(race.targets)
    for _ in range(max_evals):
        t0 = time.perf_counter()
        step()
        seconds += time.perf_counter() - t0
        with torch.no_grad():
            qualities.append(problem.quality(problem.cell_losses(model)))
        if stop_at_top and qualities[-1] >= top:
            break
    hit = {str(t): next((i + 1 for i, q in enumerate(qualities) if q >= t), None)
           for t in race.targets}
    return {"seed": seed, "dtype": dtype, "evals_to_target": hit, "evals": len(qualities),
            "quality_end": qualities[-1], "optimizer_seconds": seconds,
            "qualities": qualities}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for image in args.images:
        for seed in range(args.seeds):
            race = image_race("fidelity", True, [seed], image=image)
            for dtype in args.dtypes:
                r = trajectory(race, seed, dtype, args.max_evals)
                rows.append({"problem": f"image fidelity, {image}", "targets": race.targets,
                             "unit": "dB", **r})
                print({k: v for k, v in rows[-1].items() if k != "qualities"}, flush=True)
    if args.distill:
        race = MODALITIES["nerf_distill"](None, True, [0])
        for dtype in args.dtypes:
            r = trajectory(race, 0, dtype, args.distill_evals, stop_at_top=False)
            rows.append({"problem": "NeRF distillation, lego (quick race)",
                         "targets": race.targets, "unit": "dB", **r})
            print({k: v for k, v in rows[-1].items() if k != "qualities"}, flush=True)
    from kilonerf_lbfgs.optim import native
    path = native.cpu_path()
    for row in rows:
        row["lbfgs_path"] = path
    return {"threads": args.threads, "torch": torch.__version__, "rows": rows}


def to_record(report, command, date, machine, threads, notes):
    rows = []
    # BatchedLBFGS's CPU path (older runs: the torch path); the gap column compares with the
    # float32 run on the same path
    path = lambda r: r.get("lbfgs_path", "torch")  # noqa: E731
    ref = {(r["problem"], r["seed"], path(r)): r["qualities"] for r in report["rows"]
           if r["dtype"] == "float32"}
    two_paths = len({path(r) for r in report["rows"]}) > 1
    for r in report["rows"]:
        targets = " / ".join(f"{t:g}" for t in r["targets"])
        hits = " / ".join("miss" if r["evals_to_target"][str(t)] is None
                          else str(r["evals_to_target"][str(t)]) for t in r["targets"])
        base = ref.get((r["problem"], r["seed"], path(r)))
        gap = None if base is None else round(max(
            abs(a - b) for a, b in zip(r["qualities"], base)), 2)
        rows.append([r["problem"], r["seed"], r["dtype"]] + ([path(r)] if two_paths else []) +
                    [targets, hits, r["evals"], round(r["quality_end"], 2), gap,
                     round(r["optimizer_seconds"], 1)])
    return {
        "title": ("BatchedLBFGS's native per-cell kernel against its torch path: evaluations "
                  "to each target" if two_paths else
                  "BatchedLBFGS with its history in float32, bfloat16 and float16: evaluations "
                  "to each target"),
        "command": command, "date": date, "machine": machine, "threads": threads,
        "conditions": "BatchedLBFGS with the races' settings (history 100 on images, 20 on "
                      "the distillation; strong Wolfe), one evaluation per step, the quality "
                      "measured after each (untimed). Only the stored pairs are rounded; the "
                      "iterate, gradients, Gram matrices and every product stay in full "
                      "precision. Each run is preceded by 3 untimed evaluations of a throwaway "
                      "model of the same shape, which compile the reduced-precision kernels.",
        "notes": notes, "provenance": PROVENANCE,
        "columns": ["problem", "seed", "history dtype"] + (["L-BFGS path"] if two_paths else []) +
                   ["targets (dB)", "evaluations to target",
                    "evaluations", "quality at end (dB)",
                    "largest gap to float32 over the run (dB)", "optimiser s"],
        "rows": rows}


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="*", default=["camera"],
                   help="images for the fidelity preset (scikit-image names or files)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                   choices=("float32", "bfloat16", "float16", "auto"))
    p.add_argument("--max_evals", type=int, default=400)
    p.add_argument("--distill", action="store_true",
                   help="also the NeRF distillation (needs ../shared/data/nerf_synthetic/lego)")
    p.add_argument("--distill_evals", type=int, default=60)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=os.path.join("bench", "history_dtype.json"))
    add_record_args(p)
    args = parse_args(p)
    if args.record:
        write_record(args, lambda reports: {**reports[0], "rows": [
            r for rep in reports for r in rep["rows"]]}, to_record,
            "python scripts/benchmark_history_dtype.py")
        return
    save_json(args.out, run(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
