#!/usr/bin/env python
"""Race batched per-cell L-BFGS against swept Adam and torch.optim.LBFGS (joint, per cell).

    python scripts/benchmark_optimizers.py --modality image --preset fidelity [--quick]
    python scripts/benchmark_optimizers.py --modality image --study activations|width
    python scripts/benchmark_optimizers.py --modality audio|video|shape [--quick]
    python scripts/benchmark_optimizers.py --modality nerf_distill|nerf [--quick]

Writes bench/<modality>_<preset or study>[_quick].json (or --out PATH) and a PNG of the
curves beside it. Audio, video, shape and NeRF use ../shared/data (audio/gt_bach.wav,
video/bikes.mp4, meshes/armadillo.obj, nerf_synthetic/lego); --audio, --video, --mesh and
--datadir PATH replace them.
"""
import os
import sys
from pathlib import Path

import configargparse
import torch

# the races live beside the library (benchmarks/), not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.presets import (MODALITIES, PRESETS, SHARED_DATA,  # noqa: E402
                                preset_spec, require_data, study_races)
from benchmarks.race import Race, adam_rank_key, format_tables, run_race  # noqa: E402
from benchmarks.records import add_record_args, write_record  # noqa: E402
from kilonerf_lbfgs.config import (UserError, parse_args, require_positive,  # noqa: E402
                                   run_main)
from kilonerf_lbfgs.io import plot_convergence, save_json  # noqa: E402


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", default="image", choices=list(MODALITIES) + ["nerf"],
                   help="nerf: the whole NeRF pipeline (routes and optimisers) to a test PSNR")
    p.add_argument("--preset", default=None,
                   help="the modality's preset (default: its first): " +
                   "; ".join(f"{m}: {', '.join(v)}" for m, v in PRESETS.items()))
    p.add_argument("--study", default=None, choices=["activations", "width"],
                   help="the paper's claims: L-BFGS vs best Adam across activations or widths")
    p.add_argument("--quick", action="store_true", help="shorter budgets, one seed")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (full: 3, quick: 1)")
    p.add_argument("--budget", type=float, default=None, help="override the seconds per run")
    p.add_argument("--sweep_seeds", type=int, default=None,
                   help="run Adam's learning-rate sweep on this many seeds only, then its best "
                        "constant and best cosine settings on every seed (default: all seeds)")
    p.add_argument("--adam_lrs", type=float, nargs="+", default=None,
                   help="Adam's constant rates to sweep (default 1e-4 3e-4 1e-3 3e-3 1e-2); the "
                        "cosine candidates come from the best two")
    p.add_argument("--contenders", nargs="+", default=None,
                   help="subset: batched_lbfgs adam torch_lbfgs_joint torch_lbfgs_per_cell")
    p.add_argument("--image", default=None,
                   help="replace the preset's image (same crop, grid and targets)")
    for name in ("audio", "video", "mesh"):
        p.add_argument(f"--{name}", default=None,
                       help=f"replace the preset's {name} file (default: ../shared/data)")
    p.add_argument("--datadir", default=None,
                   help="nerf, nerf_distill: the scene folder (default "
                        "../shared/data/nerf_synthetic/lego)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="nerf_distill: where the race runs (the teacher and samples are made "
                        "on the CPU); the other modalities run on the CPU")
    p.add_argument("--targets", type=float, nargs="+", default=None,
                   help="replace the preset's quality targets (e.g. higher ones on a GPU)")
    p.add_argument("--out", default=None, help="results JSON (a PNG of the curves goes beside)")
    add_record_args(p)                  # nerf: a docs/results record from finished races
    p.add_argument("--title", default="NeRF whole-pipeline race", help="the record's title")
    p.add_argument("--reference", default="direct_adam",
                   help="nerf records: the contender the speed-ups are measured against")
    args = parse_args(p)
    if args.record:
        from benchmarks.nerf_pipeline import merge_pipeline_reports, pipeline_record
        write_record(args, merge_pipeline_reports, pipeline_record,
                     "python scripts/benchmark_optimizers.py --modality nerf", title=args.title,
                     reference=args.reference)
        return
    preset = args.preset or PRESETS[args.modality][0]
    if preset not in PRESETS[args.modality]:
        raise UserError(f"--preset {preset}: not a {args.modality} preset; choose one of "
                        f"{', '.join(PRESETS[args.modality])}")
    data = {"image": args.image, "audio": args.audio, "video": args.video,
            "shape": args.mesh, "nerf_distill": args.datadir}.get(args.modality)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    out = args.out or os.path.join("bench", f"{args.modality}_{args.study or preset}"
                                   f"{'_quick' if args.quick else ''}.json")
    if args.device != "cpu" and args.modality != "nerf_distill":
        raise UserError(f"--device {args.device}: only --modality nerf_distill runs off the CPU")
    meta = {"modality": args.modality, "device": args.device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "quick": args.quick}
    if args.study:
        report = {**meta, "study": args.study, "rows": []}
        curves = {}
        for label, race in study_races(args.study, args.quick, seeds, args.budget):
            print(f"== {args.study}: {label}")
            r = run_race(race, contenders=["batched_lbfgs", "adam"])
            r["label"] = label
            report["rows"].append(r)
            print(format_tables(r))
            for entry in r["results"]:
                if entry["contender"] == "batched_lbfgs" or entry["contender"] == _best_adam(r):
                    curves[f"{label} {entry['contender']}"] = entry["histories"][0]
        save_json(out, report)
        plot_convergence(out.replace(".json", ".png"), curves,
                         title=f"{args.study} study (seed 0)")
        print(study_table(report))
    elif args.modality == "nerf":
        from benchmarks.nerf_pipeline import (NERF_PIPELINE_PRESETS, format_pipeline_tables,
                                              run_pipeline_race)
        spec = preset_spec(NERF_PIPELINE_PRESETS, preset, args.quick)
        datadir = require_data(args.datadir or os.path.join(SHARED_DATA, "nerf_synthetic",
                                                            "lego"), "--datadir")
        print(f"== nerf {preset}{' (quick)' if args.quick else ''}: budget "
              f"{args.budget or spec['budget']:.0f} s per run, seeds {seeds}, test PSNR "
              f"targets {list(spec['targets'])}, a test probe every {spec['probe_every']:.0f} s")
        report = {**meta, "preset": preset, "data": datadir,
                  **run_pipeline_race(datadir, spec, seeds, args.budget, args.contenders)}
        save_json(out, report)
        curves = {e["contender"]: e["histories"][0] for e in report["results"]}
        plot_convergence(out.replace(".json", ".png"), curves, targets=spec["targets"],
                         ylabel="test PSNR (dB)", title=f"NeRF pipeline, {preset} (seed 0)")
        print(format_pipeline_tables(report))
    else:
        extra = {"device": args.device} if args.modality == "nerf_distill" else {}
        race: Race = MODALITIES[args.modality](preset, args.quick, seeds, args.budget, data,
                                               **extra)
        if args.sweep_seeds is not None:
            require_positive(args, "sweep_seeds")
            race.sweep_seeds = args.sweep_seeds
        if args.targets is not None:
            race.targets = tuple(sorted(args.targets))
        if args.adam_lrs is not None:
            if not args.adam_lrs or min(args.adam_lrs) <= 0:
                raise UserError(f"--adam_lrs {args.adam_lrs}: give one or more positive rates")
            race.adam_lrs = tuple(args.adam_lrs)
        if args.modality == "nerf_distill":
            from benchmarks.nerf_distill import apply_calibration
            apply_calibration(race, meta, os.path.join(
                "bench", f"nerf_distill_calibration{'_quick' if args.quick else ''}.json"))
        print(f"== {args.modality} {preset}{' (quick)' if args.quick else ''}: "
              f"budget {race.budget:g} s, seeds {seeds}, targets {list(race.targets)}")
        report = {**meta, "preset": preset, "data": data,
                  **({"image": args.image} if args.modality == "image" else {}),
                  **run_race(race, args.contenders)}
        save_json(out, report)
        curves = {e["contender"]: e["histories"][0] for e in report["results"]}
        plot_convergence(out.replace(".json", ".png"), curves, targets=race.targets,
                         ylabel=report["quality_name"],
                         title=f"{args.modality} {preset} (seed {seeds[0]})")
        print(format_tables(report))
    print(f"wrote {out}")


def _best_adam(report):
    """The best Adam variant by the race's own ranking (targets reached, then time)."""
    adams = [e for e in report["results"] if e["contender"].startswith("adam")]
    if not adams:
        return None
    return max(adams, key=lambda e: adam_rank_key(e, report["targets"]))["contender"]


def study_table(report):
    targets = [str(t) for t in report["rows"][0]["targets"]]
    head = " | ".join(f"s to {t} dB" for t in targets)
    lines = [f"| setting | contender | {head} | PSNR at end (dB) |",
             "|---|---|" + "---|" * (len(targets) + 1)]
    for r in report["rows"]:
        best = _best_adam(r)
        for name in ("batched_lbfgs", best):
            e = next(x for x in r["results"] if x["contender"] == name)
            secs = " | ".join("miss" if e["median_seconds_to_target"][t] is None
                              else f"{e['median_seconds_to_target'][t]:.1f}" for t in targets)
            label = name if name == "batched_lbfgs" else f"best Adam: {name}"
            lines.append(f"| {r['label']} | {label} | {secs} | "
                         f"{e['median_psnr_at_budget']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
