#!/usr/bin/env python
"""Strong scaling of a separable fit over processes (torchrun, gloo on the CPU): the same
cells, networks, samples and evaluation budget run as one process and as N processes that
each hold a block of the cells; time per evaluation, time to each target, peak memory per
rank, and the quality reached (which must not depend on the process count).

    python scripts/benchmark_scaling.py --jobs image nerf_distill --equivalence image audio shape \
        --out bench/scaling.json
    python scripts/benchmark_scaling.py --record docs/results/scaling.json --from bench/scaling.json

Jobs: ``image``, the image compression race's problem (astronaut 512x512, 16x16 cells,
sine 3x32, BatchedLBFGS history 100); ``nerf_distill``, the NeRF distillation race's
problem (lego at 100x100, a cached teacher, 16^3 cells of which about 3000 hold a network,
BatchedLBFGS history 20; ``--datadir`` the lego scene). Each configuration (processes x
threads per process, ``--configs``) is a fresh subprocess (under ``torchrun`` when it has
several processes) that builds the problem, fits it for ``--max_evals`` evaluations (a budget
that does not depend on the machine), and reports the optimiser's time only.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import configargparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import (PROVENANCE, add_record_args, run_script,  # noqa: E402
                                write_record)
from kilonerf_lbfgs.config import UserError, parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402

LEGO = ROOT.parent / "shared" / "data" / "nerf_synthetic" / "lego"
JOBS = {
    "image": dict(targets=(35.0, 40.0, 45.0), max_evals=160, history_size=100),
    "nerf_distill": dict(targets=(12.0, 15.0, 18.0), max_evals=40, history_size=20),
}


# ------------------------------------------------------------------ worker (one configuration)
def build(job: str, datadir: str, quick: bool):
    """(problem, model) of a job, the same on every rank."""
    import torch
    if job == "image":
        from kilonerf_lbfgs.multinet import MultiMLP
        from kilonerf_lbfgs.signals.image import ImageProblem, load_image
        img = load_image("astronaut")
        problem = ImageProblem(img, (16, 16))
        model = MultiMLP(problem.n_cells, 2, 3, 32, 3, "sine", omega_0=30.0,
                         generator=torch.Generator().manual_seed(1000))
        return problem, model
    from benchmarks.nerf_distill import NERF_DISTILL_PRESETS, prepare_distillation
    from benchmarks.presets import preset_spec
    spec = preset_spec(NERF_DISTILL_PRESETS, "lego", quick)
    setup = prepare_distillation(spec, datadir, cache_dir=str(ROOT / "bench"), progress=False)
    return setup.problem, setup.make_field(0)


def worker(args) -> None:
    import torch

    from kilonerf_lbfgs import distributed
    from kilonerf_lbfgs.fitting import FitConfig, fit
    from kilonerf_lbfgs.streaming import peak_rss_mb
    shards = distributed.init_from_env(torch.device("cpu"))
    job = JOBS[args.job]
    problem, model = build(args.job, args.datadir, args.quick)
    cfg = FitConfig(optimizer="lbfgs", history_size=job["history_size"], max_seconds=1e9,
                    max_evals=args.max_evals or job["max_evals"], keep_best=False,
                    progress=False)
    if shards is None:
        res = fit(model, problem, cfg)
    else:
        res = distributed.fit_sharded(shards, model, problem, cfg)
    rss = peak_rss_mb()
    per_rank = [rss]
    if shards is not None:
        per_rank = [None] * shards.world
        torch.distributed.all_gather_object(per_rank, rss)
    if shards is None or shards.is_main:
        reached = {}
        for t in job["targets"]:
            hit = next((s for s, q in res.history if q is not None and q >= t), None)
            reached[f"s_to_{t:g}"] = hit
        save_json(args.worker_out, {
            "job": args.job, "processes": 1 if shards is None else shards.world,
            "threads": torch.get_num_threads(), "n_cells": model.n_cells,
            "params_per_cell": model.params_per_cell, "evals": res.function_evals,
            "train_seconds": res.train_seconds,
            "seconds_per_eval": res.train_seconds / max(res.function_evals, 1),
            "quality": res.quality, "quality_name": problem.quality_name,
            "peak_rss_mb_per_rank": per_rank, **reached, "history": res.history})
    if shards is not None:
        distributed.shutdown()
        distributed.exit_process(0)


# ------------------------------------------------------------------ driver
def launcher(procs: int) -> list:
    """The command prefix that starts a script as ``procs`` processes (torchrun when > 1)."""
    return [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node", str(procs)] if procs > 1 else [])


def run_config(args, job: str, procs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "w.json")
        cmd = [str(Path(__file__).resolve()), "--worker", "--job", job, "--worker_out", out,
               "--datadir", args.datadir, "--max_evals", str(args.max_evals)]
        cmd += ["--quick"] if args.quick else []
        run_script(launcher(procs) + cmd, threads, f"{job} on {procs} x {threads}")
        return json.loads(Path(out).read_text())


# ------------------------------------------------------------------ the scripts, 1 vs 2 processes
EQUIVALENCE = {"image": ("fit_image.py", "image.txt"), "audio": ("fit_audio.py", "audio.txt"),
               "shape": ("fit_shape.py", "shape.txt")}


def equivalence(args) -> list:
    """Each script with its config and ``--max_evals``, as one process and under torchrun
    with 2: PSNR (IoU for shapes) and the largest weight difference."""
    import torch
    rows = []
    for name in args.equivalence:
        script, config = EQUIVALENCE[name]
        res = {}
        with tempfile.TemporaryDirectory() as tmp:
            for procs in (1, 2):
                out = os.path.join(tmp, f"p{procs}")
                cmd = [str(ROOT / "scripts" / script), "--config", config, "--max_evals",
                       str(args.equivalence_evals), "--max_seconds", "1e9", "--out_dir", out,
                       "--no_progress", "--no_keep_best"]
                run_script(launcher(procs) + cmd, max(1, 2 // procs), f"{script} on {procs}")
                m = json.loads(Path(out, "metrics.json").read_text())
                w = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
                res[procs] = (m, w)
        (m1, w1), (m2, w2) = res[1], res[2]
        q = "iou" if name == "shape" else "psnr"
        rows.append({"script": f"{script} --config {config}", "evals": m1["function_evals"],
                     "evals_2": m2["function_evals"], "quality_name": q,
                     "quality_1": m1[q], "quality_2": m2[q],
                     "max_abs_weight_diff": max(float((w1[k] - w2[k]).abs().max())
                                                for k in w1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


COLUMNS = ["job", "processes", "threads_each", "cells", "evals", "s_per_eval", "speedup",
           "s_to_targets", "quality_end", "peak_rss_mb_per_rank"]


def to_record(report, command, date, machine, threads, notes):
    rows = []
    for job in report["jobs"]:
        runs = [r for r in report["rows"] if r["job"] == job]
        base = next((r for r in runs if r["processes"] == 1 and r["threads"] == 1), runs[0])
        names = [k for k in runs[0] if k.startswith("s_to_")]
        for r in runs:
            rows.append([job, r["processes"], r["threads"], r["n_cells"], r["evals"],
                         round(r["seconds_per_eval"], 3),
                         round(base["seconds_per_eval"] / r["seconds_per_eval"], 2),
                         ", ".join(f"{n[5:]}: {'miss' if r[n] is None else round(r[n], 1)}"
                                   for n in names),
                         f"{r['quality']:.3f} {r['quality_name']}",
                         ", ".join(str(round(m)) for m in r["peak_rss_mb_per_rank"])])
    return {
        "title": "Strong scaling over processes (torchrun, gloo): the same cells on 1 and 2 "
                 "processes",
        "command": command, "date": date, "machine": machine, "threads": threads,
        "conditions": "Each row is a fresh run of the same problem (same cells, networks, "
                      "samples and initialisation), BatchedLBFGS for a fixed number of "
                      "evaluations, the optimiser's time only. 2 processes: torchrun "
                      "--nproc_per_node 2, each process holding half the cells (their "
                      "networks, history and samples), the per-cell losses gathered every "
                      "evaluation for the whole signal's quality. speedup: seconds per "
                      "evaluation of 1 process x 1 thread over the row's. image: the "
                      "compression race's problem (astronaut 512x512, 16x16 cells, sine 3x32, "
                      "history 100). nerf_distill: the NeRF distillation race's problem "
                      "(lego 100x100, its cached teacher's samples, history 20). Peak memory: "
                      "each process's peak resident set (VmHWM).",
        "notes": notes,
        "provenance": PROVENANCE,
        "columns": COLUMNS, "rows": rows,
        "tables": [{"caption": "The scripts as users run them, one process against torchrun "
                               "--nproc_per_node 2 (same seed, same evaluation budget, "
                               "--no_keep_best): the quality and the largest difference of "
                               "any weight",
                    "columns": ["command", "evals (1 / 2 processes)", "quality, 1 process",
                                "quality, 2 processes", "difference", "max weight difference"],
                    "rows": [[r["script"] + f" --max_evals {r['evals']}",
                              f"{r['evals']} / {r['evals_2']}",
                              round(r["quality_1"], 4), round(r["quality_2"], 4),
                              f"{abs(r['quality_1'] - r['quality_2']):.2g} {r['quality_name']}",
                              f"{r['max_abs_weight_diff']:.2g}"]
                             for r in report.get("equivalence", [])]}]}


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=tuple(JOBS))
    p.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"],
                   help="PROCESSESxTHREADS per configuration")
    p.add_argument("--max_evals", type=int, default=0, help="0: the job's default budget")
    p.add_argument("--datadir", default=str(LEGO), help="nerf_distill: the lego scene")
    p.add_argument("--quick", action="store_true",
                   help="nerf_distill: the quick race's teacher and sample counts")
    p.add_argument("--equivalence", nargs="*", default=[], choices=tuple(EQUIVALENCE),
                   help="also run these scripts with their configs as 1 and 2 processes")
    p.add_argument("--equivalence_evals", type=int, default=40)
    p.add_argument("--out", default=os.path.join("bench", "scaling.json"))
    p.add_argument("--worker", action="store_true", help=configargparse.SUPPRESS)
    p.add_argument("--job", default="image", choices=tuple(JOBS), help=configargparse.SUPPRESS)
    p.add_argument("--worker_out", default=None, help=configargparse.SUPPRESS)
    add_record_args(p)
    args = parse_args(p)
    if args.worker:
        return worker(args)
    if args.record:
        write_record(args, lambda reports: {**reports[0], "jobs": [
            j for rep in reports for j in rep["jobs"]], "rows": [
            r for rep in reports for r in rep["rows"]], "equivalence": [
            r for rep in reports for r in rep.get("equivalence", [])]}, to_record,
            "python scripts/benchmark_scaling.py")
        return
    configs = []
    for c in args.configs:
        try:
            procs, threads = (int(v) for v in c.lower().split("x"))
        except ValueError:
            raise UserError(f"--configs {c}: write PROCESSESxTHREADS, e.g. 2x1") from None
        configs.append((procs, threads))
    if "nerf_distill" in args.jobs:
        if not os.path.isdir(args.datadir):
            raise UserError(f"--datadir {args.datadir}: not a folder (the lego scene)")
        build("nerf_distill", args.datadir, args.quick)   # the teacher, cached, once
    rows, same = [], []
    report = {"threads": "per row", "jobs": args.jobs, "rows": rows, "equivalence": same}
    for job in args.jobs:
        for procs, threads in configs:
            row = run_config(args, job, procs, threads)
            row.pop("history")
            rows.append(row)
            print(json.dumps(row), flush=True)
            save_json(args.out, report)
    same += equivalence(args)
    save_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
