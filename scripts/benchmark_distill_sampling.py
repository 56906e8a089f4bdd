#!/usr/bin/env python
"""Distillation sampling study: teacher ray samples vs uniform points in each cell (a fixed
set, or drawn afresh every step), BatchedLBFGS vs Adam, held-out quality (see
benchmarks/nerf_distill_sampling.py).

    python scripts/benchmark_distill_sampling.py [--quick] [--contenders NAME ...] [--datadir PATH]
    python scripts/benchmark_distill_sampling.py --record docs/results/nerf_distill_sampling.json \
        --from bench/a.json bench/b.json      # a docs/results record from finished runs

Runs on ../shared/data/nerf_synthetic/lego unless --datadir is given; caches the teacher in
bench/ and writes bench/nerf_distill_sampling[_quick].json (or --out PATH).
"""
import os
import sys
from pathlib import Path

import configargparse

# the races live beside the library (benchmarks/), not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nerf_distill_sampling import (CONTENDERS, PRESETS, format_table,  # noqa: E402
                                              merge_reports, results_record, run_study)
from benchmarks.presets import SHARED_DATA, preset_spec, require_data  # noqa: E402
from benchmarks.records import add_record_args, write_record  # noqa: E402
from kilonerf_lbfgs.config import (for_option, parse_args, require_positive,  # noqa: E402
                                   run_main)
from kilonerf_lbfgs.io import save_json  # noqa: E402


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lego", choices=list(PRESETS))
    p.add_argument("--quick", action="store_true", help="fewer cells, a shorter budget")
    p.add_argument("--datadir", default=os.path.join(SHARED_DATA, "nerf_synthetic", "lego"))
    p.add_argument("--contenders", nargs="+", default=None, choices=list(CONTENDERS))
    p.add_argument("--budget", type=float, default=None, help="seconds per contender")
    p.add_argument("--probe_every", type=float, default=None,
                   help="seconds of training between held-out probes (default: the preset's)")
    p.add_argument("--grid_res", type=int, default=None,
                   help="cells per axis (default: the preset's 16, lego.txt's grid); fewer, "
                        "larger cells give each cell's network more of the scene to learn")
    p.add_argument("--n_cells", type=int, default=None,
                   help="occupied cells in the study (default: the preset's; at most all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the study runs (the teacher and the sample sets are made on "
                        "the CPU, then moved)")
    p.add_argument("--out", default=None)
    add_record_args(p)
    p.option_checks = [("grid_res", False, 2, 64), ("n_cells", False, 1, None)]
    args = parse_args(p)
    if args.record:
        write_record(args, merge_reports, results_record,
                     "python scripts/benchmark_distill_sampling.py")
        return
    require_data(args.datadir, "--datadir")
    spec = preset_spec(PRESETS, args.preset, args.quick)
    if args.probe_every is not None:
        require_positive(args, "probe_every")
        spec["probe_every"] = args.probe_every
    for name in ("grid_res", "n_cells"):
        if getattr(args, name) is not None:
            spec[name] = getattr(args, name)
    with for_option("--datadir", args.datadir):
        rep = run_study(args.datadir, spec, args.contenders, args.budget, device=args.device)
    rep.update(preset=args.preset, quick=args.quick, datadir=args.datadir, device=args.device,
               threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    out = args.out or os.path.join(
        "bench", f"nerf_distill_sampling{'_quick' if args.quick else ''}.json")
    save_json(out, rep)
    print(format_table(rep))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
