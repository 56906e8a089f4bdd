#!/usr/bin/env python
"""Training loss against held-out IoU on the shape race's problems (quick and full point
counts): batched L-BFGS and Adam at one rate, the same budget each, one seed.

    python scripts/benchmark_shape_generalisation.py [--mesh PATH] [--adam_lr 3e-3]

Uses ../shared/data/meshes/armadillo.obj unless --mesh is given; writes
bench/shape_generalisation.json (or --out PATH) and prints one line per run.
"""
import os
import sys
from pathlib import Path

import configargparse
import torch

# the races live beside the library (benchmarks/), not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.presets import shape_race  # noqa: E402
from kilonerf_lbfgs.config import parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.fitting import FitConfig, fit  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default=None, help="default: the race's armadillo")
    p.add_argument("--adam_lr", type=float, default=3e-3)
    p.add_argument("--out", default=os.path.join("bench", "shape_generalisation.json"))
    args = parse_args(p)
    rows = []
    for quick in (True, False):
        race = shape_race(None, quick, [0], data=args.mesh)
        counts = race.problem.packed.counts.double()
        for name, cfg in (("batched_lbfgs", FitConfig(optimizer="lbfgs")),
                          (f"adam_lr={args.adam_lr:g}", FitConfig(optimizer="adam",
                                                                   lr=args.adam_lr))):
            model = race.make_model(0)
            cfg.max_seconds, cfg.progress = race.budget, False
            res = fit(model, race.problem, cfg)
            with torch.no_grad():
                losses = race.problem.cell_losses(model).double()
            rows.append({"points": int(counts.sum()), "contender": name,
                         "seconds": res.train_seconds, "evals": res.function_evals,
                         "train_mse": float((losses * counts).sum() / counts.sum()),
                         "heldout_iou": res.quality})
            print(rows[-1], flush=True)
    save_json(args.out, {"threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
