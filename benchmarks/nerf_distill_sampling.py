"""Which samples, and which optimiser, distil a teacher into the cells best?

One teacher (dense grids, trained for a fixed number of Adam steps and cached), one random
subset of the occupied cells (the cells are independent problems, so a subset is a faithful
per-cell experiment and every cost scales with the number of cells), and three sample
regimes:

* ``rays``: the teacher's ray samples, a fixed set (at most ``ray_per_cell`` per cell);
* ``uniform``: points uniform in each cell, a fixed set (``n`` per cell);
* ``fresh``: points uniform in each cell, drawn afresh before every step (``n`` per draw;
  an L-BFGS step is a round of ``evals`` evaluations on one draw).

Each contender trains for ``budget`` seconds of optimiser time (drawing fresh samples and
the teacher's targets counted); every ``probe_every`` seconds the run pauses (untimed) and
measures the **held-out** distillation PSNR on a fixed set of fresh ray samples and of
fresh uniform samples that no contender trains on. Targets are held-out ray-sample PSNRs:
the samples a renderer actually meets.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks import records
from benchmarks.race import first_time_reaching
from kilonerf_lbfgs.fitting import Callback, FitConfig, fit
from kilonerf_lbfgs.grid import CellGrid
from kilonerf_lbfgs.io import load_checkpoint
from kilonerf_lbfgs.nerf.data.loaders import load_dataset
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.train.distill import (DistillProblem, DistillSamples,
                                               FreshUniformSamples, collect_distill_samples,
                                               uniform_distill_samples)
from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions, NerfPipeline

LEGO_BOX = [-0.7, -1.25, -0.4, 0.7, 1.25, 1.05]

PRESETS = {
    # lego at 100x100, the configs/lego.txt field (16^3 cells, 3475 parameters per cell,
    # omega_0 10), a 1500-step dense teacher, 256 of the occupied cells
    "lego": dict(downsample=4, aabb=LEGO_BOX, grid_res=16, occ_res=64, omega_0=10.0,
                 teacher_steps=1500, n_cells=256, ray_per_cell=512, distill_rays=65536,
                 budget=60.0, probe_every=3.0, targets=(20.0, 22.0, 24.0),
                 quick=dict(teacher_steps=300, n_cells=64, budget=20.0, probe_every=2.0,
                            targets=(16.0, 18.0, 20.0))),
}

# name -> sampling, samples per cell (fixed set or per draw), optimiser, its settings
CONTENDERS: Dict[str, Dict] = {
    "lbfgs_rays": dict(sampling="rays", optimizer="lbfgs"),
    "adam_rays_lr=0.001": dict(sampling="rays", optimizer="adam", lr=1e-3),
    "adam_rays_lr=0.003": dict(sampling="rays", optimizer="adam", lr=3e-3),
    "lbfgs_uniform1024": dict(sampling="uniform", n=1024, optimizer="lbfgs"),
    "adam_uniform1024_lr=0.001": dict(sampling="uniform", n=1024, optimizer="adam", lr=1e-3),
    "adam_uniform1024_lr=0.003": dict(sampling="uniform", n=1024, optimizer="adam", lr=3e-3),
    "adam_uniform1024_lr=0.01": dict(sampling="uniform", n=1024, optimizer="adam", lr=1e-2),
    "adam_uniform1024_mb128_lr=0.003": dict(sampling="uniform", n=1024, optimizer="adam",
                                            lr=3e-3, minibatch=128),
    "lbfgs_fresh256x10": dict(sampling="fresh", n=256, optimizer="lbfgs", evals=10),
    "lbfgs_fresh256x10_reset": dict(sampling="fresh", n=256, optimizer="lbfgs", evals=10,
                                    keep_history=False),
    "lbfgs_fresh1024x10": dict(sampling="fresh", n=1024, optimizer="lbfgs", evals=10),
    "lbfgs_fresh1024x20": dict(sampling="fresh", n=1024, optimizer="lbfgs", evals=20),
    "adam_fresh128_lr=0.0003": dict(sampling="fresh", n=128, optimizer="adam", lr=3e-4),
    "adam_fresh128_lr=0.001": dict(sampling="fresh", n=128, optimizer="adam", lr=1e-3),
    "adam_fresh128_lr=0.003": dict(sampling="fresh", n=128, optimizer="adam", lr=3e-3),
    "adam_fresh512_lr=0.001": dict(sampling="fresh", n=512, optimizer="adam", lr=1e-3),
    # more target values than parameters per cell (2048 x 4 = 2.4x, 4096 x 4 = 4.7x the 3475):
    # the regime where L-BFGS wins on images; affordable on a GPU
    "lbfgs_uniform2048": dict(sampling="uniform", n=2048, optimizer="lbfgs"),
    "lbfgs_uniform4096": dict(sampling="uniform", n=4096, optimizer="lbfgs"),
    "adam_uniform4096_lr=0.001": dict(sampling="uniform", n=4096, optimizer="adam", lr=1e-3),
    "adam_uniform4096_lr=0.003": dict(sampling="uniform", n=4096, optimizer="adam", lr=3e-3),
    "adam_uniform4096_mb128_lr=0.001": dict(sampling="uniform", n=4096, optimizer="adam",
                                            lr=1e-3, minibatch=128),
    "adam_uniform4096_mb512_lr=0.001": dict(sampling="uniform", n=4096, optimizer="adam",
                                            lr=1e-3, minibatch=512),
    "lbfgs_fresh4096x20": dict(sampling="fresh", n=4096, optimizer="lbfgs", evals=20),
}


class MiniBatch(Callback):
    """Before every step, ``problem`` gets ``size`` random samples per cell of the fixed
    set ``full`` (Adam's usual mode on a fixed data set); timed."""

    timed = True

    def __init__(self, problem: DistillProblem, full: DistillSamples, size: int,
                 generator: torch.Generator):
        self.problem, self.full, self.size, self.generator = problem, full, size, generator

    def on_step_begin(self, state) -> None:
        P = self.full.local.shape[1]
        idx = torch.randint(P, (self.size,), generator=self.generator)
        f = self.full
        mask = f.mask[:, idx]
        self.problem.set_samples(DistillSamples(f.local[:, idx], f.dirs[:, idx],
                                                f.alpha[:, idx], f.rgb[:, idx], mask,
                                                mask.sum(1)))


class HeldOutProbe(Callback):
    """Every ``every`` seconds of training (and at the end), untimed: held-out quality."""

    def __init__(self, held_out: Dict[str, DistillProblem], field, every: float):
        self.held_out, self.field, self.every = held_out, field, every
        self.history: List[List[float]] = []      # [[seconds, evals, ray, uniform], ...]
        self._last = -math.inf

    def measure(self, seconds: float, evals: int) -> None:
        with torch.no_grad():
            q = [p.quality(p.cell_losses(self.field)) for p in self.held_out.values()]
        self.history.append([seconds, evals, *q])
        self._last = seconds

    def on_fit_begin(self, state) -> None:
        self.measure(0.0, 0)

    def on_step_end(self, state) -> None:
        s = state.result.train_seconds
        if s - self._last >= self.every:
            self.measure(s, state.result.steps)

    def on_fit_end(self, state) -> None:
        if self.history[-1][0] < state.result.train_seconds:
            self.measure(state.result.train_seconds, state.result.steps)


def prepare(spec: Dict, datadir: str, cache_dir: str, log: Callable[[str], None] = print,
            device="cpu"):
    """Teacher (cached), the cells' subset, the fixed sample sets and the held-out sets.

    Made on the CPU, then moved to ``device`` (teacher, field, samples) for the study."""
    data = load_dataset(datadir, downsample=spec["downsample"], test_every=8)
    opts = NerfOptions(aabb=list(spec["aabb"]), grid_res=spec["grid_res"],
                       occ_res=spec["occ_res"], omega_0=spec["omega_0"],
                       near=data["train"].near, far=data["train"].far, max_seconds=1e12,
                       teacher_fraction=0.5, max_steps=spec["teacher_steps"], progress=False)
    bank = RayBank(data["train"])
    os.makedirs(cache_dir, exist_ok=True)
    ckpt = os.path.join(cache_dir, f"distill_sampling_teacher_{spec['teacher_steps']}.pt")
    pipe = NerfPipeline(opts, bank, "cpu", ckpt)
    if os.path.isfile(ckpt):
        pipe.load(load_checkpoint(ckpt))
        log(f"teacher from cache {ckpt}")
    else:
        pipe.run_teacher()               # writes the checkpoint when it ends
    rs = pipe.rs
    occ = pipe.marcher.grid.cells_occupied(CellGrid(opts.aabb[:3], opts.aabb[3:],
                                                    opts.grid_res))
    full = pipe.new_field(occ.cpu())
    nets = torch.randperm(full.n_nets, generator=torch.Generator().manual_seed(0))
    nets = nets[:spec["n_cells"]].sort()[0]
    rays = collect_distill_samples(pipe.teacher, pipe.marcher, bank, full, rs,
                                   spec["distill_rays"], spec["ray_per_cell"],
                                   torch.Generator().manual_seed(1)).select(nets)
    held_rays = collect_distill_samples(pipe.teacher, pipe.marcher, bank, full, rs,
                                        spec["distill_rays"], spec["ray_per_cell"],
                                        torch.Generator().manual_seed(2)).select(nets)
    pipe.teacher.to(device)                       # the study's device (no-ops on the CPU)
    full.to(device)
    rays, held_rays, nets = rays.to(device), held_rays.to(device), nets.to(device)
    held_uni = uniform_distill_samples(pipe.teacher, full.subset(nets), 1024, rs.step_size,
                                       torch.Generator().manual_seed(3))
    log(f"{full.n_nets} cells with networks, {len(nets)} in the study, "
        f"{full.params_per_cell} parameters per cell, "
        f"{float(rays.counts.float().mean()):.0f} ray samples per cell on average")
    return dict(teacher=pipe.teacher, rs=rs, full=full, nets=nets, rays=rays,
                held_out={"ray": DistillProblem(held_rays, rs.step_size),
                          "uniform": DistillProblem(held_uni, rs.step_size)},
                n_nets=full.n_nets, params_per_cell=full.params_per_cell)


def run_contender(name: str, setup: Dict, spec: Dict, budget: float, seed: int = 0) -> Dict:
    c = CONTENDERS[name]
    field = setup["full"].subset(setup["nets"])
    rs, teacher = setup["rs"], setup["teacher"]
    gen = torch.Generator().manual_seed(100 + seed)
    callbacks = []
    if c["sampling"] == "rays":
        problem = DistillProblem(setup["rays"], rs.step_size)
    else:
        problem = DistillProblem(uniform_distill_samples(teacher, field, c["n"], rs.step_size,
                                                         gen), rs.step_size)
        if c["sampling"] == "fresh":
            callbacks.append(FreshUniformSamples(problem, teacher, field, c["n"], rs.step_size,
                                                 gen, keep_history=c.get("keep_history", True)))
    if c.get("minibatch"):
        callbacks.append(MiniBatch(problem, problem.samples, c["minibatch"], gen))
    probe = HeldOutProbe(setup["held_out"], field, spec["probe_every"])
    callbacks.append(probe)
    cfg = FitConfig(optimizer=c["optimizer"], lr=c.get("lr"), history_size=20,
                    evals_per_step=c.get("evals", 5), max_seconds=budget, progress=False,
                    keep_best=False)
    res = fit(field, problem, cfg, callbacks=callbacks)
    h = probe.history
    return {"options": c, "seconds": res.train_seconds, "evals": res.function_evals,
            "steps": res.steps, "train_quality": res.quality,
            "heldout_ray_end": h[-1][2], "heldout_uniform_end": h[-1][3],
            "best_heldout_ray": max(r[2] for r in h),
            "history": h,
            "seconds_to_target": {str(t): first_time_reaching([[r[0], r[2]] for r in h], t)
                                  for t in spec["targets"]}}


def run_study(datadir: str, spec: Dict, contenders: Optional[Sequence[str]] = None,
              budget: Optional[float] = None, cache_dir: str = "bench",
              log: Callable[[str], None] = print, device="cpu") -> Dict:
    names = list(contenders or CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {' '.join(unknown)}; choose from "
                         f"{' '.join(CONTENDERS)}")
    budget = budget or spec["budget"]
    setup = prepare(spec, datadir, cache_dir, log, device)
    if torch.device(device).type == "cuda":     # kernels, library handles, allocator pools
        run_contender(names[0], setup, spec, 1.0)  # untimed warm-up, discarded
    results = {}
    for name in names:
        r = run_contender(name, setup, spec, budget)
        results[name] = r
        ts = " ".join(f"{k} dB: {'miss' if v is None else f'{v:.1f} s'}"
                      for k, v in r["seconds_to_target"].items())
        log(f"  {name:34s} held-out ray {r['heldout_ray_end']:.2f} (best "
            f"{r['best_heldout_ray']:.2f}), uniform {r['heldout_uniform_end']:.2f} dB, "
            f"{r['evals']} evals; {ts}")
    return {"targets": list(spec["targets"]), "budget_seconds": budget,
            "n_cells_studied": len(setup["nets"]), "n_cells_scene": setup["n_nets"],
            "params_per_cell": setup["params_per_cell"],
            "spec": {k: v for k, v in spec.items() if k != "quick"}, "contenders": results}


def format_table(rep: Dict) -> str:
    t = rep["targets"]
    head = ("| contender | " + " | ".join(f"s to {x} dB" for x in t)
            + " | held-out ray (end / best) | held-out uniform | train | evals |")
    lines = [head, "|" + "---|" * (len(t) + 5)]
    for name, r in rep["contenders"].items():
        cells = ["miss" if r["seconds_to_target"][str(x)] is None
                 else f"{r['seconds_to_target'][str(x)]:.1f}" for x in t]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {r['heldout_ray_end']:.2f} / {r['best_heldout_ray']:.2f}"
                     f" | {r['heldout_uniform_end']:.2f} | {r['train_quality']:.2f}"
                     f" | {r['evals']} |")
    return "\n".join(lines)


def best_of(rep: Dict, optimizer: str, target: float) -> Optional[tuple]:
    """(name, seconds) of the ``optimizer``'s contender first to the held-out ``target``."""
    best = None
    for name, r in rep["contenders"].items():
        s = r["seconds_to_target"][str(target)]
        if r["options"]["optimizer"] == optimizer and s is not None and (
                best is None or s < best[1]):
            best = (name, s)
    return best


def merge_reports(reports: Sequence[Dict]) -> Dict:
    """Several runs of the study on one setup (e.g. contenders split over two processes)."""
    return records.merge_reports(reports, ("targets", "budget_seconds", "n_cells_studied",
                                           "params_per_cell"), "contenders")


def results_record(rep: Dict, command: str, date: str, machine: str, threads: str,
                   notes: Sequence[str] = ()) -> Dict:
    """The study as a docs/results record (see docs/make_results.py)."""
    t = rep["targets"]
    rows = []
    for name, r in rep["contenders"].items():
        o = r["options"]
        rows.append([name, o["sampling"],
                     o.get("n", f"<= {rep['spec']['ray_per_cell']}"),
                     o["optimizer"], o.get("lr"),
                     *["miss" if r["seconds_to_target"][str(x)] is None else
                       round(r["seconds_to_target"][str(x)], 1) for x in t],
                     round(r["heldout_ray_end"], 2), round(r["best_heldout_ray"], 2),
                     round(r["heldout_uniform_end"], 2), round(r["train_quality"], 2),
                     r["evals"]])
    ratio_rows = []
    for x in t:
        lb, ad = best_of(rep, "lbfgs", x), best_of(rep, "adam", x)
        ratio = None if lb is None or ad is None or lb[1] <= 0 else round(ad[1] / lb[1], 2)
        ratio_rows.append([f"{x} dB", lb[0] if lb else "none reaches it",
                           round(lb[1], 1) if lb else None, ad[0] if ad else "none reaches it",
                           round(ad[1], 1) if ad else None,
                           ratio if ratio is not None else (
                               "L-BFGS misses" if lb is None else
                               "Adam misses" if ad is None else "at the start")])
    spec = rep["spec"]
    return {
        "title": "NeRF distillation: sample regime and optimiser (held-out quality)"
                 + ("" if spec["grid_res"] == 16 else f", {spec['grid_res']}^3 cells"),
        "command": command, "date": date, "machine": machine, "threads": threads,
        "conditions": (
            f"lego 100x100; a dense teacher after {spec['teacher_steps']} Adam steps; "
            f"{rep['n_cells_studied']} of its {rep['n_cells_scene']} occupied cells (cells "
            f"are independent problems, so every cost scales with their number); the "
            f"configs/lego.txt cell network ({rep['params_per_cell']} parameters, omega_0 "
            f"{spec['omega_0']}) on a {spec['grid_res']}^3 grid; {rep['budget_seconds']:.0f} s of optimiser time per "
            f"contender, drawing fresh samples and the teacher's targets included; L-BFGS "
            f"history 20. Quality: held-out distillation PSNR on fresh teacher ray samples "
            f"(the samples a renderer meets; targets) and on fresh uniform samples, measured "
            f"every {spec['probe_every']:.0f} s untimed; one seed."),
        "notes": list(notes),
        "provenance": "generated by scripts/benchmark_distill_sampling.py --record from the "
                      "study's JSON",
        "columns": ["contender", "sampling", "samples per cell", "optimizer", "lr",
                    *[f"s to {x} dB" for x in t], "held-out ray end", "held-out ray best",
                    "held-out uniform end", "train PSNR end", "evals"],
        "rows": rows,
        "tables": [{"caption": "Fastest L-BFGS contender against the fastest Adam contender "
                               "(speed-up = Adam's seconds / L-BFGS's)",
                    "columns": ["held-out target", "L-BFGS", "s", "Adam", "s", "speed-up"],
                    "rows": ratio_rows}],
    }
