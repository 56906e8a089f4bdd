#!/usr/bin/env python
"""Does a longer shape fit get better? The default shape config on several meshes, with
fresh training points (the default) and with one fixed draw: held-out IoU over the run,
its best and its last step.

    python scripts/benchmark_shape_generalisation.py --meshes knot ../shared/data/meshes/bunny.obj \
        --targets occupancy sdf --sampling fresh fixed --max_seconds 90 --out bench/shape_gen.json
    python scripts/benchmark_shape_generalisation.py --record docs/results/shape_generalisation.json \
        --from bench/shape_gen.json

Each run is ``scripts/fit_shape.py --config configs/shape.txt`` in a subprocess (what a
user runs), ``--resample_every 0`` for the fixed draw; the rows come from its metrics.json.
"""
import json
import os
import sys
from pathlib import Path

import configargparse

# the races live beside the library (benchmarks/), not in the installed package
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import (PROVENANCE, add_record_args, add_run_args,  # noqa: E402
                                concat_rows, run_script, write_record)
from kilonerf_lbfgs.config import UserError, parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402

SAMPLING = {"fresh": [], "fixed": ["--resample_every", "0"]}
COLUMNS = ["mesh", "target", "sampling", "best_iou", "best_at_s", "last_step_iou",
           "last_10_mean_iou", "best_minus_last", "exported_iou", "chamfer", "evals"]


def run_one(mesh: str, target: str, sampling: str, seconds: float, out_root: str,
            threads: int) -> dict:
    name = f"{Path(mesh).stem}_{target}_{sampling}"
    out = os.path.join(out_root, name)
    cmd = [sys.executable, str(ROOT / "scripts" / "fit_shape.py"), "--config",
           str(ROOT / "configs" / "shape.txt"), "--target", target, "--max_seconds",
           str(seconds), "--out_dir", out, "--no_progress"] + SAMPLING[sampling]
    if mesh != "knot":
        cmd += ["--mesh", mesh]
    run_script(cmd, threads, f"{name}: fit_shape.py")
    return row_from_metrics(mesh, target, sampling,
                            json.loads(Path(out, "metrics.json").read_text()))


def row_from_metrics(mesh: str, target: str, sampling: str, m: dict) -> dict:
    """One table row from a fit_shape.py metrics.json: the best held-out IoU and when, the
    last step's, the mean of the last 10 steps' (fresh draws make single steps noisy), the
    exported (best) one."""
    hist = [(s, q) for s, q in m["history"] if q is not None]
    best_s, best = max(hist, key=lambda h: h[1])
    last = hist[-1][1]
    tail = [q for _, q in hist[-10:]]
    return {"mesh": "torus knot (bundled)" if mesh == "knot" else Path(mesh).name,
            "target": target, "sampling": sampling, "best_iou": round(best, 4),
            "best_at_s": round(best_s, 1), "last_step_iou": round(last, 4),
            "last_10_mean_iou": round(sum(tail) / len(tail), 4),
            "best_minus_last": round(best - last, 4), "exported_iou": round(m["iou"], 4),
            "chamfer": round(m["chamfer"], 5), "evals": m["function_evals"],
            "train_seconds": round(m["train_seconds"], 1)}


def to_record(report, command, date, machine, threads, notes):
    rows = [[r[c] for c in COLUMNS] for r in report["rows"]]
    return {
        "title": "Shape: does a longer fit get better? Fresh training points against one "
                 "fixed draw",
        "command": command, "date": date, "machine": machine, "threads": threads,
        "conditions": f"scripts/fit_shape.py --config configs/shape.txt (4x4x4 cells, sine "
                      f"3x32, omega_0 10, batched L-BFGS, 60k training points per draw, half "
                      f"near the surface), {report['max_seconds']:g} s each, one seed. "
                      f"fresh: a new draw after every 5 evaluations (the default); fixed: "
                      f"--resample_every 0. IoU on 50k held-out uniform points after every "
                      f"step; exported: the parameters of the best step (the default "
                      f"keep-best), measured again.",
        "notes": notes,
        "provenance": PROVENANCE,
        "columns": COLUMNS, "rows": rows}


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", nargs="+", default=["knot"],
                   help="mesh files; knot: the bundled torus knot")
    p.add_argument("--targets", nargs="+", default=["occupancy"], choices=("occupancy", "sdf"))
    p.add_argument("--sampling", nargs="+", default=["fresh", "fixed"], choices=tuple(SAMPLING))
    p.add_argument("--max_seconds", type=float, default=90.0)
    add_run_args(p, "shape_gen")
    add_record_args(p)
    args = parse_args(p)
    if args.record:
        write_record(args, concat_rows, to_record,
                     "python scripts/benchmark_shape_generalisation.py")
        return
    for m in args.meshes:
        if m != "knot" and not os.path.isfile(m):
            raise UserError(f"--meshes: {m} does not exist")
    rows = []
    for mesh in args.meshes:
        for target in args.targets:
            for sampling in args.sampling:
                rows.append(run_one(mesh, target, sampling, args.max_seconds, args.runs_dir,
                                    args.threads))
                print(json.dumps(rows[-1]), flush=True)
                save_json(args.out, {"threads": args.threads, "max_seconds": args.max_seconds,
                                     "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
