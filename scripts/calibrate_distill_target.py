#!/usr/bin/env python
"""Calibrate the distillation race's target: the distill_psnr at which the fine-tuned
field loses at most --tolerance_db of test PSNR (see benchmarks/nerf_calibrate.py).

    python scripts/calibrate_distill_target.py [--quick] [--datadir PATH]

Uses the nerf_distill preset's teacher (cached in bench/), cells and samples, on
../shared/data/nerf_synthetic/lego unless --datadir is given; writes
bench/nerf_distill_calibration[_quick].json (or --out PATH), which
``scripts/benchmark_optimizers.py --modality nerf_distill`` then reads.
"""
import os
import sys
from pathlib import Path

import configargparse

# the races live beside the library (benchmarks/), not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nerf_calibrate import calibrate_distill_target  # noqa: E402
from benchmarks.nerf_distill import NERF_DISTILL_PRESETS, prepare_distillation  # noqa: E402
from benchmarks.presets import SHARED_DATA, preset_spec, require_data  # noqa: E402
from kilonerf_lbfgs.config import parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lego", choices=list(NERF_DISTILL_PRESETS))
    p.add_argument("--quick", action="store_true", help="the race's --quick setup")
    p.add_argument("--datadir", default=os.path.join(SHARED_DATA, "nerf_synthetic", "lego"))
    p.add_argument("--levels", type=float, nargs="+", default=[10, 12, 14, 16, 18, 20, 22])
    p.add_argument("--max_seconds", type=float, default=600.0,
                   help="distillation budget (BatchedLBFGS) over all levels")
    p.add_argument("--finetune_steps", type=int, default=300)
    p.add_argument("--test_every", type=int, default=8, help="evaluate every k-th test view")
    p.add_argument("--tolerance_db", type=float, default=0.5)
    p.add_argument("--out", default=None)
    args = parse_args(p)
    require_data(args.datadir, "--datadir")
    spec = preset_spec(NERF_DISTILL_PRESETS, args.preset, args.quick)
    setup = prepare_distillation(spec, args.datadir, test_every=args.test_every)
    report = calibrate_distill_target(setup, args.levels, args.max_seconds,
                                      spec["history_size"], args.finetune_steps,
                                      tolerance_db=args.tolerance_db)
    report.update(preset=args.preset, quick=args.quick, datadir=args.datadir)
    out = args.out or os.path.join(
        "bench", f"nerf_distill_calibration{'_quick' if args.quick else ''}.json")
    save_json(out, report)
    print(f"reference fine-tuned test PSNR {report['reference_test_psnr']:.2f} dB; calibrated "
          f"target distill_psnr {report['calibrated_target']}; wrote {out}")


if __name__ == "__main__":
    run_main(main)
