"""The optimiser race: batched per-cell L-BFGS against swept Adam and torch's L-BFGS.

Every contender trains the same cells, networks, data and initialisation (per seed), one
after another in one process; only optimiser time counts (closure evaluations included,
quality read from the losses the step evaluated; for torch's L-BFGS re-evaluated, untimed, at
the step's end: see :func:`race_callbacks`). A contender stops once it reaches the
highest target. Results: seconds to each target per seed, medians over seeds, the quality at
the end of the budget, and ratios of each rival's median time to ours.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from kilonerf_lbfgs.fitting import (Callback, CellProblem, CosineLR, ExactQuality, FitConfig,
                                    fit, make_optimizer)
from kilonerf_lbfgs.multinet import MultiMLP

ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
PAPER_ADAM_LR = 1e-4
RIVALS = ("best_adam", "adam_sweep", "adam_lr=0.0001", "adam_lr=0.001",
          "torch_lbfgs_joint", "torch_lbfgs_per_cell")


@dataclass
class Race:
    """One race: a problem, a model factory and the rules.

    ``lbfgs``, ``torch_lbfgs`` and ``per_cell_lbfgs`` name the optimiser settings of those
    contenders (:func:`kilonerf_lbfgs.fitting.make_optimizer` builds them); the budget and
    target are the race's."""
    problem: CellProblem
    make_model: Callable[[int], MultiMLP]       # seed -> freshly initialised model
    targets: Sequence[float]
    budget: float
    seeds: Sequence[int]
    # Adam's constant-lr sweep runs on the first ``sweep_seeds`` seeds (None: all); the best
    # constant lr and the best cosine lr found there then run on every seed, and only
    # entries run on every seed compete for best_adam
    sweep_seeds: Optional[int] = None
    # Adam's constant rates (each also gives a cosine candidate); a race may narrow the grid
    # to the rates an earlier full sweep showed competitive, and says so (``adam_lrs`` in
    # the JSON)
    adam_lrs: Sequence[float] = ADAM_LRS
    lbfgs: FitConfig = field(default_factory=lambda: FitConfig(optimizer="lbfgs"))
    torch_lbfgs: FitConfig = field(default_factory=lambda: FitConfig(
        optimizer="torch_lbfgs", history_size=100, evals_per_step=20))
    per_cell_lbfgs: FitConfig = field(default_factory=lambda: FitConfig(
        optimizer="torch_lbfgs", history_size=100, evals_per_step=20))
    log: Callable[[str], None] = print
    # callbacks every fit contender runs with, built afresh per run (e.g. fresh training
    # samples, the same sequence of draws for every contender and seed)
    fit_callbacks: Callable[[], List[Callback]] = list
    # before the first timed run, each optimiser (BatchedLBFGS, Adam) runs this many
    # evaluations on a throwaway model, untimed: the first run would otherwise pay for
    # compiling BatchedLBFGS's reduced-precision history kernels (once per shape, a few
    # seconds) and, on CUDA, for kernel loading, library handles and the allocator's pools
    warmup_evals: int = 5


def first_time_reaching(history: List[List[float]], target: float) -> Optional[float]:
    """Seconds at which a ``[[seconds, quality], ...]`` history first reaches ``target``."""
    for s, q in history:
        if q is not None and q >= target:
            return s
    return None


def race_callbacks(cfg: FitConfig, budget: float) -> List[Callback]:
    """The untimed callbacks a contender runs with: Adam's cosine schedule decays over the
    race's budget; torch.optim.LBFGS's step reports the loss where it began, so its quality
    is re-evaluated at the step's end (not timed) for an exact history."""
    callbacks: List[Callback] = []
    if cfg.lr_schedule == "cosine":
        callbacks.append(CosineLR(budget, base_lr=cfg.lr or 1e-3))
    if cfg.optimizer == "torch_lbfgs":
        callbacks.append(ExactQuality())
    return callbacks


def _run_fit(race: Race, cfg: FitConfig, seed: int) -> Dict:
    model = race.make_model(seed)
    # the race reports each step's quality as measured: no keep_best
    rules = FitConfig(max_seconds=race.budget, target=max(race.targets), progress=False,
                      keep_best=False)
    res = fit(model, race.problem, rules, optimizer=lambda params: make_optimizer(cfg, params),
              callbacks=race_callbacks(cfg, race.budget) + race.fit_callbacks())
    return {"history": res.history, "quality": res.quality, "evals": res.function_evals,
            "seconds": res.train_seconds}


def _run_per_cell(race: Race, cfg: FitConfig, seed: int) -> Dict:
    """The paper's patch scheme: cells one after another, each with its own
    ``torch.optim.LBFGS``; the budget is shared (a cell gets what is left divided by the
    cells left), a cell stops at the highest target."""
    model = race.make_model(seed)
    problem = race.problem
    with torch.no_grad():
        losses = problem.cell_losses(model).detach().clone()
    top = max(race.targets)
    history, elapsed, evals = [], 0.0, 0
    n = problem.n_cells
    for c in range(n):
        cell = torch.tensor([c], device=losses.device)
        sub = problem.subset(cell)
        if hasattr(model, "subset"):        # models of several networks per cell (NeRF)
            one = model.subset(cell)
        else:
            one = MultiMLP(1, model.d_in, model.d_out, model.width, model.depth,
                           model.activation, omega_0=model.omega_0, sigma=model.sigma,
                           pe_freqs=model.pe_freqs).to(next(model.parameters()).device)
            with torch.no_grad():
                for dst, src in zip(one.parameters(), model.parameters()):
                    dst.copy_(src[c:c + 1])
        opt = make_optimizer(cfg, one.parameters())

        def closure():
            nonlocal evals
            opt.zero_grad()
            evals += 1
            loss = sub.cell_losses(one)
            loss.sum().backward()
            return loss.sum()

        slice_end = elapsed + (race.budget - elapsed) / (n - c)
        while elapsed < slice_end:
            t0 = time.perf_counter()
            opt.step(closure)
            elapsed += time.perf_counter() - t0
            with torch.no_grad():
                cell_loss = sub.cell_losses(one)
            if not torch.isfinite(cell_loss).all():
                break
            losses[c] = cell_loss[0]
            if sub.quality(cell_loss) >= top:
                break
        with torch.no_grad():
            for dst, src in zip(model.parameters(), one.parameters()):
                dst[c:c + 1].copy_(src)
        history.append([elapsed, problem.quality(losses)])
        if elapsed >= race.budget:
            break
    return {"history": history, "quality": history[-1][1] if history else float("nan"),
            "evals": evals, "seconds": elapsed}


def median_seconds(values: List[Optional[float]]) -> Optional[float]:
    """Median with misses (None) counted as +inf; None if the median is a miss."""
    vals = [math.inf if v is None else v for v in values]
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def summarise(name: str, runs: List[Dict], targets: Sequence[float]) -> Dict:
    secs = {str(t): [first_time_reaching(r["history"], t) for r in runs] for t in targets}
    return {"contender": name,
            "n_seeds": len(runs),
            "seconds_to_target": secs,
            "median_seconds_to_target": {k: median_seconds(v) for k, v in secs.items()},
            "psnr_at_budget": [r["quality"] for r in runs],
            "median_psnr_at_budget": statistics.median(r["quality"] for r in runs),
            "function_evals": [r["evals"] for r in runs],
            "histories": [r["history"] for r in runs]}


def adam_rank_key(entry: Dict, targets: Sequence[float]):
    """Higher is better: more targets reached, then sooner at the highest one, then PSNR."""
    med = entry["median_seconds_to_target"]
    reached = [t for t in targets if med[str(t)] is not None]
    top_time = med[str(max(reached))] if reached else math.inf
    return (len(reached), -top_time, entry["median_psnr_at_budget"])


def run_race(race: Race, contenders: Optional[Sequence[str]] = None) -> Dict:
    """Run every contender over every seed; return the results JSON: ``targets``,
    ``seeds``, ``adam_sweep_seeds``, ``adam_lrs``, ``quality_name``, ``budget_seconds``,
    ``results`` (one :func:`summarise` entry per contender), ``rival_median_seconds_to_target``,
    ``ratios`` (rival median seconds / ours), ``ratio_is_lower_bound``,
    ``psnr_gain_at_budget`` (see :func:`compare`)."""
    results: Dict[str, Dict] = {}
    wanted = set(contenders) if contenders else None

    def want(name):
        return wanted is None or name in wanted or (name.startswith("adam") and "adam" in wanted)

    runs_of: Dict[str, List[Dict]] = {}

    def race_one(name: str, runner, cfg: FitConfig, seeds: Optional[Sequence[int]] = None):
        runs = runs_of.setdefault(name, [])
        for seed in (race.seeds if seeds is None else seeds):
            runs.append(runner(race, cfg, seed))
            r = runs[-1]
            race.log(f"  {name:24s} seed {seed}: final {r['quality']:.2f} after "
                     f"{r['seconds']:.1f} s, {r['evals']} evals; to targets " +
                     ", ".join(f"{t}: {_fmt(first_time_reaching(r['history'], t))}"
                               for t in race.targets))
        results[name] = summarise(name, runs, race.targets)

    if race.warmup_evals > 0:
        for cfg in (race.lbfgs, FitConfig(optimizer="adam", lr=race.adam_lrs[0])):
            fit(race.make_model(0), race.problem,
                FitConfig(max_evals=race.warmup_evals, progress=False, keep_best=False),
                optimizer=lambda params, c=cfg: make_optimizer(c, params))
    if want("batched_lbfgs"):
        race_one("batched_lbfgs", _run_fit, race.lbfgs)
    adam_names = []
    if want("adam"):
        n_sweep = len(race.seeds) if race.sweep_seeds is None else \
            max(1, min(race.sweep_seeds, len(race.seeds)))
        sweep, rest = list(race.seeds[:n_sweep]), list(race.seeds[n_sweep:])
        rank = lambda names: sorted(names, key=lambda n: adam_rank_key(
            results[n], race.targets), reverse=True)
        for lr in race.adam_lrs:
            name = f"adam_lr={lr:g}"
            race_one(name, _run_fit, FitConfig(optimizer="adam", lr=lr), sweep)
            adam_names.append(name)
        top_constant = rank(adam_names)[:2]
        cosines = []
        for name in top_constant:
            lr = float(name.split("=")[1])
            cos = f"adam_cos_lr={lr:g}"
            race_one(cos, _run_fit, FitConfig(optimizer="adam", lr=lr, lr_schedule="cosine"),
                     sweep)
            cosines.append(cos)
        adam_names += cosines
        if rest:   # the sweep's best constant and best cosine settings on the other seeds
            for name in (top_constant[0], rank(cosines)[0]):
                lr = float(name.split("=")[1])
                race_one(name, _run_fit, FitConfig(
                    optimizer="adam", lr=lr,
                    lr_schedule="cosine" if name.startswith("adam_cos") else "constant"),
                    rest)
    if want("torch_lbfgs_joint"):
        race_one("torch_lbfgs_joint", _run_fit, race.torch_lbfgs)
    if want("torch_lbfgs_per_cell"):
        race_one("torch_lbfgs_per_cell", _run_per_cell, race.per_cell_lbfgs)
    return compare(results, adam_names, race)


def _fmt(v):
    return "miss" if v is None else f"{v:.1f}s"


def compare(results: Dict[str, Dict], adam_names: List[str], race: Race) -> Dict:
    targets = [str(t) for t in race.targets]
    budget = race.budget
    ours = results.get("batched_lbfgs")
    rival_time: Dict[str, Dict[str, Optional[float]]] = {}
    rival_lower: Dict[str, Dict[str, bool]] = {}
    for t in targets:
        rival_time[t], rival_lower[t] = {}, {}
        if adam_names:
            times = [results[n]["median_seconds_to_target"][t] for n in adam_names]
            full = [results[n]["median_seconds_to_target"][t] for n in adam_names
                    if results[n]["n_seeds"] == len(race.seeds)]
            hit = [x for x in full if x is not None]
            rival_time[t]["best_adam"] = min(hit) if hit else None
            rival_time[t]["adam_sweep"] = sum(budget if x is None else x for x in times)
            rival_lower[t]["adam_sweep"] = any(x is None for x in times)
        for name in ("adam_lr=0.0001", "adam_lr=0.001", "torch_lbfgs_joint",
                     "torch_lbfgs_per_cell"):
            if name in results:
                rival_time[t][name] = results[name]["median_seconds_to_target"][t]
    ratios, lower = {}, {}
    for t in targets:
        ratios[t], lower[t] = {}, {}
        mine = ours["median_seconds_to_target"][t] if ours else None
        for rival, x in rival_time[t].items():
            if mine is None or mine <= 0:
                ratios[t][rival] = None
                continue
            is_lower = x is None or rival_lower[t].get(rival, False)
            ratios[t][rival] = (budget if x is None else x) / mine
            lower[t][rival] = is_lower
    gains = {}
    if ours:
        mine = ours["median_psnr_at_budget"]
        if adam_names:
            best = max(results[n]["median_psnr_at_budget"] for n in adam_names
                       if results[n]["n_seeds"] == len(race.seeds))
            gains["best_adam"] = mine - best
        for name in ("adam_lr=0.0001", "adam_lr=0.001", "torch_lbfgs_joint",
                     "torch_lbfgs_per_cell"):
            if name in results:
                gains[name] = mine - results[name]["median_psnr_at_budget"]
    return {"targets": list(race.targets), "seeds": list(race.seeds),
            "adam_sweep_seeds": race.sweep_seeds, "adam_lrs": list(race.adam_lrs),
            "quality_name": getattr(race.problem, "quality_name", "psnr"),
            "budget_seconds": budget,
            "results": list(results.values()),
            "rival_median_seconds_to_target": rival_time,
            "ratios": ratios, "ratio_is_lower_bound": lower,
            "psnr_gain_at_budget": gains}


def results_table(report: Dict, unit: str, qlabel: str, qdigits: int) -> List[str]:
    """Markdown rows: each contender's median seconds to each target (misses and partial
    hits marked), its median quality at the end and its median evaluations."""
    targets = [str(t) for t in report["targets"]]
    head = "| contender | " + " | ".join(f"s to {t}{unit}" for t in targets) + \
        f" | {qlabel} | evals |"
    lines = [head, "|" + "---|" * (len(targets) + 3)]
    for r in report["results"]:
        cells = []
        for t in targets:
            v = r["median_seconds_to_target"][t]
            n_hit = sum(x is not None for x in r["seconds_to_target"][t])
            n = len(r["seconds_to_target"][t])
            cells.append("miss" if v is None else
                         f"{v:.1f}" + ("" if n_hit == n else f" ({n_hit}/{n})"))
        evals = int(statistics.median(r["function_evals"]))
        n_seeds = r.get("n_seeds", len(report["seeds"]))
        label = r["contender"] + ("" if n_seeds == len(report["seeds"]) else
                                  f" ({n_seeds} of {len(report['seeds'])} seeds)")
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {r['median_psnr_at_budget']:.{qdigits}f} | {evals} |")
    return lines


def ratio_cells(report: Dict, rival: str) -> List[str]:
    """``1.23x`` per target (``>`` for a lower bound, ``n/a`` where ours missed)."""
    cells = []
    for t in map(str, report["targets"]):
        v = report["ratios"][t].get(rival)
        lb = report["ratio_is_lower_bound"][t].get(rival, False)
        cells.append("n/a" if v is None else (">" if lb else "") + f"{v:.2f}x")
    return cells


def format_tables(report: Dict) -> str:
    """Plain-text tables: median seconds to each target and PSNR at budget; ratios."""
    targets = [str(t) for t in report["targets"]]
    q = report.get("quality_name", "psnr")
    unit = " dB" if q == "psnr" else ""
    qlabel = "PSNR at end (dB)" if q == "psnr" else f"{q.upper()} at end"
    lines = results_table(report, unit, qlabel, 2 if q == "psnr" else 4)
    lines.append("")
    rivals = [k for k in RIVALS if any(k in report["ratios"][t] for t in targets)]
    gain = "PSNR gain at end (dB)" if q == "psnr" else f"{q.upper()} gain at end"
    lines += ["| speed-up of batched_lbfgs over | " + " | ".join(f"{t}{unit}" for t in targets) +
              f" | {gain} |", "|" + "---|" * (len(targets) + 2)]
    for rival in rivals:
        cells = ratio_cells(report, rival)
        g = report["psnr_gain_at_budget"].get(rival)
        lines.append(f"| {rival} | " + " | ".join(cells) + " | " +
                     ("" if g is None else f"{g:+.{2 if q == 'psnr' else 4}f}") + " |")
    return "\n".join(lines)
