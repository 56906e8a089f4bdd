"""The whole-pipeline NeRF race (``--modality nerf``): routes and optimisers to a test PSNR.

Each contender is one complete training run of :class:`NerfPipeline` (its route, its cell
optimiser) on the same scene, field layout and total budget. While the cell networks train,
the run is paused every ``probe_every`` seconds of training and the current field is
rendered on the race's test views (not timed); a contender's time to a target is the first
probe at or above it, so times are resolved to ``probe_every`` seconds (and to the end of
the distillation stage, where a probe is taken too). During the distill route's teacher
stage the cells do not exist yet, so that route cannot reach a target before it.

``distill_batched_lbfgs`` (per-cell distillation with :class:`BatchedLBFGS`) is ours; the
others are its rivals, and the JSON has the same shape as the optimiser race's: seconds to
each target per seed, medians, final test PSNR, ratios (rival median / ours; a rival that
misses counts at the budget and the ratio is marked a lower bound).
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks import records
from benchmarks.nerf_distill import LEGO_BOX
from benchmarks.race import ratio_cells, results_table, summarise
from kilonerf_lbfgs.config import UserError
from kilonerf_lbfgs.nerf.data.loaders import load_dataset
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.evaluate import evaluate
from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions, NerfPipeline

OURS = "distill_batched_lbfgs"

# route and cell optimiser per contender; the distill Adam rate (constant) comes from the
# quick nerf_distill sweep (constant 3e-3 and 1e-2 reach its calibrated target within 10%
# of each other and of the best, cosine 1e-2); the direct rate is configs/lego.txt's
CONTENDERS: Dict[str, Dict] = {
    "distill_batched_lbfgs": dict(route="distill", optimizer="lbfgs"),
    "distill_adam": dict(route="distill", optimizer="adam", lr=3e-3),
    "direct_adam": dict(route="direct", optimizer="adam"),
    # the direct rate swept around configs/lego.txt's 5e-4 (the quick preset picks the best)
    "direct_adam_lr=0.00025": dict(route="direct", optimizer="adam", direct_lr=2.5e-4),
    "direct_adam_lr=0.001": dict(route="direct", optimizer="adam", direct_lr=1e-3),
    "direct_adam_lr=0.002": dict(route="direct", optimizer="adam", direct_lr=2e-3),
    "direct_batched_lbfgs": dict(route="direct", optimizer="lbfgs"),
    # coupled L-BFGS on 4x larger ray batches, 10 evaluations on each
    "direct_batched_lbfgs_big_batch": dict(route="direct", optimizer="lbfgs",
                                           batch_rays=16384, evals_per_step=10),
    # the design card's literal route: every ray batch's photometric residual becomes
    # per-sample targets (a Gauss-Newton step in output space) that each cell fits with
    # BatchedLBFGS (8 evaluations per batch: the best of 2, 4, 8 on the demo scene)
    "direct_lbfgs_targets": dict(route="direct", optimizer="lbfgs_targets", evals_per_step=8),
    # distillation on uniform points drawn afresh every step (benchmarks/nerf_distill_sampling:
    # the sample regime that generalises); each optimiser with its best setting there
    "distill_fresh_batched_lbfgs": dict(route="distill", optimizer="lbfgs",
                                        distill_sampling="fresh", distill_uniform_per_cell=256,
                                        evals_per_step=10),
    "distill_fresh_adam": dict(route="distill", optimizer="adam", lr=1e-3,
                               distill_sampling="fresh", distill_uniform_per_cell=128),
    # the same with a shorter teacher: 25% teacher, 20% distillation, 55% fine-tune
    "distill_fresh_batched_lbfgs_short_teacher": dict(
        route="distill", optimizer="lbfgs", distill_sampling="fresh",
        distill_uniform_per_cell=256, evals_per_step=10, teacher_fraction=0.25,
        distill_fraction=0.2),
    "distill_fresh_adam_short_teacher": dict(
        route="distill", optimizer="adam", lr=1e-3, distill_sampling="fresh",
        distill_uniform_per_cell=128, teacher_fraction=0.25, distill_fraction=0.2),
}

NERF_PIPELINE_PRESETS = {
    # lego at 100x100 with configs/lego.txt's field (16^3 cells, omega_0 10, 64^3 occupancy),
    # every 8th test view (25), a test probe every 30 s of training
    "lego": dict(downsample=4, test_every=8, options=dict(aabb=LEGO_BOX, omega_0=10.0),
                 probe_every=30.0, budget=600.0, targets=(24.0, 26.0, 28.0),
                 quick=dict(test_every=40, budget=240.0, targets=(22.0, 24.0, 26.0))),
}


def run_contender(name: str, opts: NerfOptions, bank: RayBank, test, probe_every: float,
                  log: Callable[[str], None] = print) -> Dict:
    """One training run with test probes: history ``[[seconds, test_psnr], ...]``."""
    history: List[List[float]] = []

    def probe(field, seconds):
        m = evaluate(field, pipe.marcher, test, pipe.rs, progress=False)
        history.append([seconds, m["test_psnr"]])

    with tempfile.TemporaryDirectory() as tmp:
        pipe = NerfPipeline(opts, bank, bank.rgbs.device, f"{tmp}/ckpt.pt")
        pipe.probe, pipe.probe_every = probe, probe_every
        field = pipe.run()
    final = history[-1][1] if history else float("nan")
    log(f"  {name:24s} seed {opts.seed}: test PSNR {final:.2f} dB after "
        f"{pipe.train_seconds():.1f} s, {pipe.function_evals()} evals, "
        f"{field.n_nets} cells")
    return {"history": history, "quality": final, "evals": pipe.function_evals(),
            "seconds": pipe.train_seconds()}


def run_pipeline_race(datadir: str, spec: Dict, seeds: Sequence[int],
                      budget: Optional[float] = None,
                      contenders: Optional[Sequence[str]] = None,
                      device="cpu", log: Callable[[str], None] = print) -> Dict:
    """Every contender over every seed; the results JSON (see the module docstring)."""
    budget = budget or spec["budget"]
    data = load_dataset(datadir, downsample=spec["downsample"], test_every=spec["test_every"])
    train, test = data["train"], data["test"]
    bank = RayBank(train, device)
    base = NerfOptions(near=train.near, far=train.far, max_seconds=budget, progress=False,
                       ckpt_every=1e9, **spec["options"])
    names = list(contenders or CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise UserError(f"--contenders {' '.join(unknown)}: not a nerf contender; choose from "
                        f"{' '.join(CONTENDERS)}")
    targets = spec["targets"]
    results = {}
    for name in names:
        runs = [run_contender(name, replace(base, seed=seed, **CONTENDERS[name]), bank, test,
                              spec["probe_every"], log) for seed in seeds]
        results[name] = summarise(name, runs, targets)
        results[name]["options"] = CONTENDERS[name]
    return {"targets": list(targets), "seeds": list(seeds), "quality_name": "test_psnr",
            "budget_seconds": budget, "probe_every": spec["probe_every"],
            "n_test_views": len(test), "image_size": [train.W, train.H],
            "results": list(results.values()), **ratios_to_ours(results, targets, budget)}


def ratios_to_ours(results: Dict[str, Dict], targets: Sequence[float], budget: float) -> Dict:
    """Rival median seconds / ours per target; misses count at the budget (lower bound)."""
    ratios, lower = {}, {}
    ours = results.get(OURS)
    for t in map(str, targets):
        ratios[t], lower[t] = {}, {}
        mine = ours["median_seconds_to_target"][t] if ours else None
        for name, r in results.items():
            if name == OURS:
                continue
            theirs = r["median_seconds_to_target"][t]
            ratios[t][name] = None if not mine else (budget if theirs is None else theirs) / mine
            lower[t][name] = theirs is None
    return {"ratios": ratios, "ratio_is_lower_bound": lower}


def format_pipeline_tables(report: Dict) -> str:
    targets = [str(t) for t in report["targets"]]
    lines = results_table(report, " dB", "test PSNR at end (dB)", 2)
    lines += ["", f"| speed-up of {OURS} over | " + " | ".join(f"{t} dB" for t in targets) +
              " |", "|" + "---|" * (len(targets) + 1)]
    for r in report["results"]:
        if r["contender"] != OURS:
            cells = ratio_cells(report, r["contender"])
            lines.append(f"| {r['contender']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_pipeline_reports(reports: Sequence[Dict]) -> Dict:
    """Pipeline races run side by side (contenders split over processes) as one report."""
    return records.merge_reports(reports, ("targets", "seeds", "budget_seconds", "probe_every",
                                           "n_test_views", "image_size"), "results")


def pipeline_record(rep: Dict, title: str, command: str, date: str, machine: str,
                    threads: str, notes: Sequence[str] = (),
                    reference: str = "direct_adam") -> Dict:
    """A pipeline race as a docs/results record (see docs/make_results.py): seconds to each
    target (median over seeds), test PSNR at the budget, and every contender's speed-up over
    ``reference`` (its seconds / the contender's; a miss counts at the budget)."""
    targets = rep["targets"]
    budget = rep["budget_seconds"]
    rows, by_name = [], {}
    for e in rep["results"]:
        med = e["median_seconds_to_target"]
        by_name[e["contender"]] = e
        rows.append([e["contender"], e["options"].get("route"), e["options"].get("optimizer"),
                     *["miss" if med[str(t)] is None else round(med[str(t)], 1)
                       for t in targets],
                     round(e["median_psnr_at_budget"], 2), e["function_evals"][0]])
    ratio_rows = []
    ref = by_name.get(reference)
    if ref is not None:
        for e in rep["results"]:
            if e["contender"] == reference:
                continue
            cells = []
            for t in targets:
                a, b = ref["median_seconds_to_target"][str(t)], \
                    e["median_seconds_to_target"][str(t)]
                if b is None:
                    cells.append("misses")
                else:
                    cells.append(f"{'>' if a is None else ''}{(a or budget) / b:.2f}x")
            ratio_rows.append([e["contender"], *cells])
    probe = rep["probe_every"]
    return {
        "title": title, "command": command, "date": date, "machine": machine,
        "threads": threads,
        "conditions": (f"{rep['n_test_views']} test views at {rep['image_size'][0]}x"
                       f"{rep['image_size'][1]}; {budget:.0f} s of training per run; seeds "
                       f"{rep['seeds']}; every {probe:.0f} s of training the run pauses and "
                       f"renders the test views (untimed); time to a target is the first "
                       f"probe at or above it (resolved to {probe:.0f} s and to the end of "
                       f"the distillation)."),
        "notes": list(notes),
        "provenance": "generated by scripts/benchmark_optimizers.py --record from the race's "
                      "JSON",
        "columns": ["contender", "route", "cell optimiser",
                    *[f"s to {t} dB" for t in targets], "test PSNR at budget", "evals"],
        "rows": rows,
        "tables": [{"caption": f"Speed-up over {reference} (its seconds / the contender's; "
                               f"'>': {reference} missed, counted at the budget)",
                    "columns": ["contender", *[f"{t} dB" for t in targets]],
                    "rows": ratio_rows}] if ratio_rows else [],
    }
