"""The fit loop every modality shares: optimiser, time budget, target, history, checkpoints.

A modality supplies a :class:`CellProblem`: how to compute the per-cell losses of a model
(with their backward pass) and how to turn per-cell losses into a quality number. The loop
times only the optimiser steps (closure evaluations included), reads the quality from the
losses the optimiser returns (no extra evaluation), shows a tqdm bar with the quality, and
writes atomic checkpoints that ``resume`` continues from.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .backends import synchronize
from .io import save_checkpoint
from .optim import BatchedLBFGS

OPTIMIZERS = ("lbfgs", "adam", "torch_lbfgs")


class CellProblem:
    """What the fit loop needs from a modality.

    Subclasses implement :meth:`cell_losses` (``[n_cells]``, differentiable) and
    :meth:`quality`; those that must bound memory override :meth:`loss_and_backward` to run
    the backward pass chunk by chunk.
    """

    quality_name = "psnr"

    def cell_losses(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def loss_and_backward(self, model: nn.Module) -> torch.Tensor:
        """Per-cell losses ``[n_cells]`` (detached) with gradients accumulated in ``model``."""
        losses = self.cell_losses(model)
        losses.sum().backward()
        return losses.detach()

    def quality(self, cell_losses: torch.Tensor) -> float:
        """Quality of the whole signal from per-cell losses (higher is better)."""
        raise NotImplementedError


@dataclass
class FitConfig:
    optimizer: str = "lbfgs"            # lbfgs | adam | torch_lbfgs (one optimiser, all cells)
    lr: Optional[float] = None          # Adam: 1e-3; L-BFGS: 1 (first trial step)
    lr_schedule: str = "constant"       # Adam: constant | cosine (decay over max_seconds)
    history_size: int = 100
    line_search: Optional[str] = "strong_wolfe"
    evals_per_step: int = 5             # L-BFGS closure evaluations between quality checks
    max_seconds: float = 60.0
    target: Optional[float] = None      # stop when quality >= target
    ckpt_path: Optional[str] = None
    ckpt_every: float = 30.0            # seconds of training between checkpoints
    progress: bool = True
    desc: str = ""


@dataclass
class FitResult:
    train_seconds: float
    steps: int
    function_evals: int
    iterations: int
    history: List[List[float]] = field(default_factory=list)   # [[seconds, quality], ...]
    quality: float = float("nan")
    reached_target: bool = False
    stopped: str = "budget"             # budget | target | diverged | converged


def make_optimizer(cfg: FitConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "lbfgs":
        return BatchedLBFGS(params, lr=cfg.lr or 1.0, history_size=cfg.history_size,
                            max_eval=cfg.evals_per_step,
                            line_search=None if cfg.line_search == "none" else cfg.line_search)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr or 1e-3)
    if cfg.optimizer == "torch_lbfgs":
        return torch.optim.LBFGS(params, lr=cfg.lr or 1.0, history_size=cfg.history_size,
                                 max_iter=cfg.evals_per_step, line_search_fn="strong_wolfe",
                                 tolerance_grad=0.0, tolerance_change=0.0)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}")


def _cosine_lr(lr0: float, elapsed: float, total: float) -> float:
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / max(total, 1e-9))))


def fit(model: nn.Module, problem: CellProblem, cfg: FitConfig,
        resume: Optional[Dict] = None, extra_ckpt: Optional[Dict] = None,
        device=None) -> FitResult:
    """Train ``model`` on ``problem`` until the budget or the target.

    Args:
        resume: a checkpoint dict written by an earlier call (model, optimiser, clock, history).
        extra_ckpt: anything else to store in each checkpoint (e.g. the run's options).
    """
    device = device or next(model.parameters()).device
    opt = make_optimizer(cfg, model.parameters())
    counters = {"evals": 0}
    last_losses: Dict[str, torch.Tensor] = {}

    def closure():
        opt.zero_grad(set_to_none=False)
        counters["evals"] += 1
        losses = problem.loss_and_backward(model)
        if cfg.optimizer == "torch_lbfgs":
            last_losses["v"] = losses
            return losses.sum()
        return losses

    res = FitResult(0.0, 0, 0, 0)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        res.train_seconds = float(resume["train_seconds"])
        res.steps, counters["evals"] = int(resume["steps"]), int(resume["function_evals"])
        res.history = [list(h) for h in resume["history"]]
    lr0 = cfg.lr or 1e-3

    def checkpoint():
        if cfg.ckpt_path is None:
            return
        payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                   "train_seconds": res.train_seconds, "steps": res.steps,
                   "function_evals": counters["evals"], "history": res.history,
                   "fit_config": cfg.__dict__}
        payload.update(extra_ckpt or {})
        save_checkpoint(cfg.ckpt_path, payload)

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=round(cfg.max_seconds, 1), unit="s", desc=cfg.desc or cfg.optimizer,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f}s "
                              "[{elapsed}<{remaining}{postfix}]")
        bar.update(min(res.train_seconds, cfg.max_seconds))
    last_ckpt = res.train_seconds
    quality = res.history[-1][1] if res.history else float("nan")
    while res.train_seconds < cfg.max_seconds:
        if cfg.optimizer == "adam" and cfg.lr_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(lr0, res.train_seconds, cfg.max_seconds)
        synchronize(device)
        t0 = time.perf_counter()
        losses = opt.step(closure)
        synchronize(device)
        dt = time.perf_counter() - t0
        res.train_seconds += dt
        res.steps += 1
        if cfg.optimizer == "torch_lbfgs":
            with torch.no_grad():   # exact quality at the step's final point, not timed
                losses = problem.cell_losses(model)
        quality = problem.quality(losses.detach())
        res.history.append([res.train_seconds, quality])
        if bar is not None:
            bar.update(min(dt, max(0.0, cfg.max_seconds - bar.n)))
            bar.set_postfix_str(f"{problem.quality_name} {quality:.2f}")
        if not math.isfinite(quality):
            res.stopped = "diverged"
            break
        if cfg.target is not None and quality >= cfg.target:
            res.stopped, res.reached_target = "target", True
            break
        if isinstance(opt, BatchedLBFGS) and bool((opt.status()["status"] != 0).all()):
            res.stopped = "converged"
            break
        if res.train_seconds - last_ckpt >= cfg.ckpt_every:
            checkpoint()
            last_ckpt = res.train_seconds
    if bar is not None:
        bar.close()
    res.function_evals = counters["evals"]
    res.quality = quality
    if isinstance(opt, BatchedLBFGS) and opt.status():
        res.iterations = int(opt.status()["n_iters"].float().mean().round())
    else:
        res.iterations = res.steps
    if res.stopped != "diverged":
        checkpoint()
    return res


def first_time_reaching(history: List[List[float]], target: float) -> Optional[float]:
    """Seconds at which a ``[[seconds, quality], ...]`` history first reaches ``target``."""
    for s, q in history:
        if q is not None and q >= target:
            return s
    return None
