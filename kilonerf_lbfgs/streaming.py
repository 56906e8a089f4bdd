"""Signals larger than memory: the cells fitted in groups, one group's samples in memory at a
time.

Cells are independent in a separable fit, so the cells of a long signal (rows of a large
image, seconds of a long recording) can be fitted a group at a time: read the group's
samples, build its networks, fit them, store their weights, write the group's
reconstruction, move on. A group's cells are exactly the whole signal's cells of that range
(the modality builds its problem with the whole signal's box), so a grouped fit equals the
all-at-once fit from the same initial parameters and evaluation budget. The error is summed
group by group, so the PSNR is exact. Peak memory is set by the group, not by the signal.
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from .fitting import FitConfig, fit
from .io import save_checkpoint


@dataclass
class Group:
    """Cells ``[c0, c1)`` along the streamed axis and the samples ``[s0, s1)`` along it whose
    centres lie in them."""
    index: int
    cells: Tuple[int, int]
    samples: Tuple[int, int]


def samples_in_cells(length: int, n_cells: int, c0: int, c1: int) -> Tuple[int, int]:
    """Samples ``[s0, s1)`` of ``length`` (sample ``k`` centred at ``k + 0.5`` in the box
    ``[0, length]`` cut into ``n_cells`` equal cells) that lie in cells ``[c0, c1)``."""
    y0, y1 = c0 * length / n_cells, c1 * length / n_cells
    return int(math.ceil(y0 - 0.5)), int(math.ceil(y1 - 0.5))


def plan_groups(length: int, n_cells: int, cells_per_group: int) -> List[Group]:
    """Consecutive groups of at most ``cells_per_group`` cells (at least one) along an axis
    of ``length`` samples cut into ``n_cells`` cells."""
    per = max(1, int(cells_per_group))
    return [Group(k, (c0, min(n_cells, c0 + per)),
                  samples_in_cells(length, n_cells, c0, min(n_cells, c0 + per)))
            for k, c0 in enumerate(range(0, n_cells, per))]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): ``VmHWM`` from
    ``/proc/self/status`` where there is one (Linux). ``getrusage``'s ``ru_maxrss`` is the
    fallback; on Linux it also counts the parent's resident set at the moment a subprocess
    was started (it survives ``exec``), so a small script started by a large one would
    report the large one's memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fit_groups(groups: Sequence[Group], load_problem: Callable, make_model: Callable,
               cfg: FitConfig, weights_dir: str, write: Callable, total_cells: int,
               value_range: Tuple[float, float] = (0.0, 1.0), resume: bool = False,
               device="cpu", log: Callable[[str], None] = print, unit: str = "group") -> Dict:
    """Fit the groups one after another.

    Args:
        load_problem: ``group -> problem`` (a :class:`~kilonerf_lbfgs.problems.
            PackedMSEProblem` with ``reconstruct(model)``; its samples are read here).
        make_model: ``(n_cells, group_index) -> model`` of the group's networks.
        cfg: each group's fit; its ``max_seconds`` is the whole budget, shared out by cells.
        weights_dir: ``group_NNNNN.pt`` per group; with ``resume`` a group whose file exists
            is reconstructed from it instead of fitted again.
        write: ``(group, reconstruction, target)`` stores the group's output (arrays of the
            problem's unpacked shape, e.g. ``[h, w, C]`` or ``[t, C]``, float).
        value_range: the signal's range: predictions are clipped to it for the error, and
            its width is the PSNR's peak.
    Returns the summed training seconds and evaluations, the PSNR, the group count and
    the peak memory.
    """
    os.makedirs(weights_dir, exist_ok=True)
    lo, hi = value_range
    sse, count, seconds, evals, params_per_cell = 0.0, 0, 0.0, 0, 0
    for g in groups:
        problem = load_problem(g)
        n = problem.n_cells
        model = make_model(n, g.index)
        params_per_cell = getattr(model, "params_per_cell", 0)
        wpath = os.path.join(weights_dir, f"{unit}_{g.index:05d}.pt")
        if resume and os.path.isfile(wpath):
            done = torch.load(wpath, map_location=device, weights_only=False)
            model.load_state_dict(done["model"])
            seconds += done["train_seconds"]
            evals += done["function_evals"]
        else:
            group_cfg = FitConfig(**{**cfg.__dict__, "max_seconds":
                                     cfg.max_seconds * n / total_cells, "ckpt_path": None,
                                     "desc": f"{unit} {g.index + 1}/{len(groups)}"})
            res = fit(model, problem, group_cfg)
            seconds += res.train_seconds
            evals += res.function_evals
            save_checkpoint(wpath, {"model": model.state_dict(), unit: g.__dict__,
                                    "train_seconds": res.train_seconds,
                                    "function_evals": res.function_evals})
        recon = problem.reconstruct(model).astype(np.float32)
        target = problem.packed.unpack(problem.packed.y.double()).reshape(recon.shape)
        target = target.cpu().numpy().astype(np.float32)
        write(g, recon, target)
        err = np.clip(recon, lo, hi).astype(np.float64) - target
        sse += float((err ** 2).sum())
        count += err.size
        log(f"{unit} {g.index + 1}/{len(groups)}: samples {g.samples[0]}-{g.samples[1]}, "
            f"{n} cells; PSNR so far {psnr_db(sse, count, hi - lo):.2f} dB, peak memory "
            f"{peak_rss_mb():.0f} MB")
        del problem, model
    return {"psnr": psnr_db(sse, count, hi - lo), "train_seconds": seconds,
            "function_evals": evals, "groups": len(groups), "cells": total_cells,
            "params_per_cell": params_per_cell, "peak_rss_mb": peak_rss_mb()}


def psnr_db(sse: float, count: int, data_range: float) -> float:
    mse = sse / max(count, 1)
    return 10.0 * math.log10(data_range ** 2 / max(mse, 1e-300))


__all__ = ["Group", "samples_in_cells", "plan_groups", "fit_groups", "peak_rss_mb", "psnr_db"]
