"""The fit loop every modality shares: optimiser, time budget, target, history, checkpoints.

A modality supplies a :class:`CellProblem`: how to compute the per-cell losses of a model
(with their backward pass) and how to turn per-cell losses into a quality number. The loop
times only the optimiser steps (closure evaluations included), reads the quality from the
losses the step produced (no extra evaluation), shows a tqdm bar with the quality, and
writes atomic checkpoints that ``resume`` continues from. It keeps the parameters of the
best quality seen (``FitConfig.keep_best``, untimed copies) and ends on them when the fit got
worse later, e.g. a held-out quality that falls as a fit overfits, or a diverged step; the
checkpoint holds both the last point (which a resume continues from) and the best.

The loop knows only the ``torch.optim.Optimizer`` interface (``step(closure)``,
``zero_grad``, ``param_groups``, ``state_dict``). Everything else is a callback:

* the optimiser is given (an instance, or a factory ``params -> Optimizer``), or built from
  :class:`FitConfig` by :func:`optimizer_from_config`, which also returns the callbacks
  that configuration needs (a cosine learning-rate schedule, exact quality probes);
* the closure returns the per-cell losses ``[n_cells]`` to optimisers that want them
  (:func:`wants_per_cell_losses`: :class:`~kilonerf_lbfgs.optim.BatchedLBFGS`, or any
  optimiser with ``per_cell_closure = True``) and their sum to every other one (e.g.
  ``torch.optim.LBFGS``, which needs a scalar);
* hooks run untimed around every step (:class:`Callback`); a callback may replace the
  step's losses (an exact probe), change the learning rate, or stop the fit.

Example::

    import torch
    from kilonerf_lbfgs import FitConfig, ImageProblem, MultiMLP, fit
    from kilonerf_lbfgs.fitting import CosineLR

    problem = ImageProblem(torch.rand(32, 32, 3).numpy(), (4, 4))
    model = MultiMLP(problem.n_cells, 2, 3, 16, 2)
    res = fit(model, problem, FitConfig(max_seconds=5, progress=False),
              optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
              callbacks=[CosineLR(total_seconds=5),
                         lambda state: print(state.result.steps, state.quality)])
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .backends import synchronize
from .io import save_checkpoint
from .optim import BatchedLBFGS

OPTIMIZERS = ("lbfgs", "adam", "torch_lbfgs")
LR_SCHEDULES = ("constant", "cosine")


class CellProblem:
    """What the fit loop needs from a modality.

    Subclasses implement :meth:`cell_losses` (``[n_cells]``, differentiable) and
    :meth:`quality`; those that must bound memory override :meth:`loss_and_backward` to run
    the backward pass chunk by chunk.
    """

    quality_name = "psnr"
    # whether subset(cells) gives an independent problem of those cells whose quality follows
    # from the per-cell losses alone, so the cells can be sharded over processes
    shardable = False

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
    # the optimiser fit() builds when none is passed (see optimizer_from_config)
    optimizer: str = "lbfgs"            # lbfgs | adam | torch_lbfgs (one optimiser, all cells)
    lr: Optional[float] = None          # Adam: 1e-3; L-BFGS: 1 (first trial step)
    lr_schedule: str = "constant"       # Adam: constant | cosine (decay over max_seconds)
    history_size: int = 100
    history_dtype: Optional[str] = "auto"   # L-BFGS: storage of the curvature pairs
                                        # (auto: bfloat16 for large histories; BatchedLBFGS)
    line_search: Optional[str] = "strong_wolfe"
    evals_per_step: int = 5             # L-BFGS closure evaluations between quality checks
    # the loop
    max_seconds: float = 60.0
    max_evals: int = 0                  # > 0: also stop after this many closure evaluations
                                        # (a budget that does not depend on the machine)
    target: Optional[float] = None      # stop when quality >= target
    keep_best: bool = True              # end on the parameters of the best quality seen
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
    stopped: str = "budget"             # budget | target | diverged | converged | a callback's
    # the best quality seen and when (FitConfig.keep_best: the model ends on its parameters,
    # and ``quality`` is then re-measured on them)
    best_quality: float = float("nan")
    best_seconds: float = float("nan")
    best_evals: int = 0
    final_quality: float = float("nan")  # the quality at the last step


@dataclass
class FitState:
    """What a callback sees, and may change, during :func:`fit`.

    ``result`` is the running :class:`FitResult`: ``result.steps`` steps taken,
    ``result.train_seconds`` of timed training, ``result.history`` up to the previous step.
    In :meth:`Callback.on_step_end`, ``losses`` are the step's per-cell losses (detached)
    and ``quality`` their quality; a callback that evaluates the model itself stores its
    losses with :meth:`set_losses`. Setting ``stop`` to a reason ends the fit after this
    step (``FitResult.stopped``); a reached target and divergence take precedence.
    """
    model: nn.Module
    optimizer: Optimizer
    problem: CellProblem
    config: FitConfig
    result: FitResult
    losses: Optional[torch.Tensor] = None
    quality: float = float("nan")
    stop: Optional[str] = None

    def set_losses(self, losses: torch.Tensor) -> None:
        """Replace the step's per-cell losses (and so its quality)."""
        self.losses = losses.detach()
        self.quality = self.problem.quality(self.losses)


class Callback:
    """Hooks into :func:`fit`. Override the ones you need.

    None of the hooks is timed, except :meth:`on_step_begin` of a callback whose
    ``timed`` is True: that one is part of the training work (e.g. drawing a fresh batch
    of samples) and runs inside the step's clock.

    A plain callable ``f(state)`` passed as a callback is called as :meth:`on_step_end`;
    a ``torch.optim.lr_scheduler.LRScheduler`` is stepped after every optimiser step.
    """

    timed: bool = False

    def on_fit_begin(self, state: FitState) -> None:
        """Once, after the optimiser is built and a checkpoint (if any) restored."""

    def on_step_begin(self, state: FitState) -> None:
        """Before each step, e.g. to set the learning rate."""

    def on_step_end(self, state: FitState) -> None:
        """After each step, with its losses and quality in ``state``."""

    def on_fit_end(self, state: FitState) -> None:
        """Once, when the loop has stopped (before the final checkpoint)."""


class _OnStepEnd(Callback):
    def __init__(self, fn: Callable[[FitState], None]):
        self.fn = fn

    def on_step_end(self, state: FitState) -> None:
        self.fn(state)


class _SchedulerStep(Callback):
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def on_step_end(self, state: FitState) -> None:
        self.scheduler.step()


CallbackLike = Union[Callback, Callable[[FitState], None],
                     torch.optim.lr_scheduler.LRScheduler]


def as_callback(obj: CallbackLike) -> Callback:
    """A :class:`Callback` from a callback, an LR scheduler or a function of the state."""
    if isinstance(obj, Callback):
        return obj
    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
        return _SchedulerStep(obj)
    if callable(obj):
        return _OnStepEnd(obj)
    raise ValueError(f"callbacks: {obj!r} is neither a Callback, an LR scheduler nor "
                     f"a function of the fit state")


class CosineLR(Callback):
    """Cosine decay of every parameter group's learning rate over training seconds:
    ``lr = base * (1 + cos(pi * min(1, seconds / total_seconds))) / 2``.

    ``base_lr`` defaults to each group's ``initial_lr`` (set to its ``lr`` on first use and
    stored in the optimiser's ``state_dict``, so a resumed fit keeps its schedule).
    """

    def __init__(self, total_seconds: float, base_lr: Optional[float] = None):
        if not total_seconds > 0:
            raise ValueError(f"CosineLR: total_seconds must be positive, got {total_seconds}")
        if base_lr is not None and not base_lr > 0:
            raise ValueError(f"CosineLR: base_lr must be positive, got {base_lr}")
        self.total_seconds = float(total_seconds)
        self.base_lr = base_lr

    def factor(self, seconds: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, seconds / self.total_seconds)))

    def on_fit_begin(self, state: FitState) -> None:
        for group in state.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def on_step_begin(self, state: FitState) -> None:
        f = self.factor(state.result.train_seconds)
        for group in state.optimizer.param_groups:
            group["lr"] = (self.base_lr if self.base_lr is not None
                           else group["initial_lr"]) * f


class ExactQuality(Callback):
    """Re-evaluate the per-cell losses at the step's final point (untimed) and report their
    quality. For optimisers whose step does not end on an evaluation at the point it leaves
    the parameters at (``torch.optim.LBFGS`` returns the loss where its step began, and its
    line search may end elsewhere than its last evaluation)."""

    def on_step_end(self, state: FitState) -> None:
        with torch.no_grad():
            state.set_losses(state.problem.cell_losses(state.model))


class StopWhenConverged(Callback):
    """For :class:`~kilonerf_lbfgs.optim.BatchedLBFGS`: stop once no cell is active
    (``stopped = "converged"``), and report the cells' mean iteration count as
    ``FitResult.iterations``. :func:`fit` adds it for a BatchedLBFGS."""

    def on_step_end(self, state: FitState) -> None:
        st = state.optimizer.status()
        if st and bool((st["status"] != 0).all()):
            state.stop = "converged"

    def on_fit_end(self, state: FitState) -> None:
        st = state.optimizer.status()
        if st:
            state.result.iterations = int(st["n_iters"].float().mean().round())


class Resample(Callback):
    """Fresh training samples during the fit: before a step (never the first) once at least
    ``every`` closure evaluations were spent on the current draw, ``draw()`` replaces the
    problem's samples with a new draw from the same distribution (counting evaluations
    treats an optimiser of one evaluation per step, such as Adam, and one of several, such
    as L-BFGS, alike), and an optimiser with ``new_objective``
    (:class:`~kilonerf_lbfgs.optim.BatchedLBFGS`) is told, so its line searches restart on
    the new samples; its curvature pairs, each measured on one draw, are kept when
    ``keep_history``. Drawing (and labelling) samples is training work: the hook is timed.

    A fixed sample set of a continuous signal is overfitted, and the better optimiser of the
    training loss overfits it first; fresh draws are not.
    """

    timed = True

    def __init__(self, draw: Callable[[], None], every: int = 5, keep_history: bool = True):
        if every < 1:
            raise ValueError(f"Resample: every must be >= 1 evaluation, got {every}")
        self.draw, self.every, self.keep_history = draw, int(every), bool(keep_history)
        self.draws = 0
        self._since = None          # evaluations count at the current draw

    def on_step_begin(self, state: FitState) -> None:
        evals = state.result.function_evals
        if self._since is None:     # the problem's own samples serve the first steps
            self._since = evals
            return
        if evals - self._since < self.every:
            return
        self.draw()
        self.draws += 1
        self._since = evals
        if hasattr(state.optimizer, "new_objective"):
            state.optimizer.new_objective(keep_history=self.keep_history)


def make_optimizer(cfg: FitConfig, params) -> Optimizer:
    """The optimiser ``cfg.optimizer`` names, with ``cfg``'s settings."""
    params = list(params)
    if cfg.optimizer == "lbfgs":
        return BatchedLBFGS(params, lr=cfg.lr or 1.0, history_size=cfg.history_size,
                            max_eval=cfg.evals_per_step, history_dtype=cfg.history_dtype,
                            line_search=None if cfg.line_search == "none" else cfg.line_search)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr or 1e-3)
    if cfg.optimizer == "torch_lbfgs":
        return torch.optim.LBFGS(params, lr=cfg.lr or 1.0, history_size=cfg.history_size,
                                 max_iter=cfg.evals_per_step, line_search_fn="strong_wolfe",
                                 tolerance_grad=0.0, tolerance_change=0.0)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}")


def optimizer_from_config(cfg: FitConfig, params) -> Tuple[Optimizer, List[Callback]]:
    """``cfg``'s optimiser and the callbacks it needs: :class:`CosineLR` for Adam with
    ``lr_schedule="cosine"``, :class:`ExactQuality` for ``torch_lbfgs``."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose one of "
                         f"{LR_SCHEDULES}")
    opt = make_optimizer(cfg, params)
    callbacks: List[Callback] = []
    if cfg.optimizer == "adam" and cfg.lr_schedule == "cosine":
        callbacks.append(CosineLR(cfg.max_seconds, base_lr=cfg.lr or 1e-3))
    if cfg.optimizer == "torch_lbfgs":
        callbacks.append(ExactQuality())
    return opt, callbacks


def wants_per_cell_losses(optimizer: Optimizer) -> bool:
    """Whether the closure gives ``optimizer`` the per-cell losses (else their sum): its
    ``per_cell_closure`` attribute, by default true for BatchedLBFGS only."""
    return bool(getattr(optimizer, "per_cell_closure", isinstance(optimizer, BatchedLBFGS)))


OptimizerLike = Union[Optimizer, Callable[[List[nn.Parameter]], Optimizer]]


def fit(model: nn.Module, problem: CellProblem, cfg: Optional[FitConfig] = None,
        resume: Optional[Dict] = None, extra_ckpt: Optional[Dict] = None,
        device=None, *, optimizer: Optional[OptimizerLike] = None,
        callbacks: Iterable[CallbackLike] = (),
        save: Optional[Callable[[Dict], None]] = None) -> FitResult:
    """Train ``model`` on ``problem`` until the budget, the target or a callback's stop.

    Args:
        cfg: budget, target, checkpoints, progress bar; and, when ``optimizer`` is None, the
            optimiser to build (:func:`optimizer_from_config`). Default: ``FitConfig()``.
        resume: a checkpoint dict written by an earlier call (model, optimiser, clock, history).
        extra_ckpt: anything else to store in each checkpoint (e.g. the run's options).
        optimizer: a ``torch.optim.Optimizer`` over ``model``'s parameters, or a factory
            called with the list of them. ``cfg``'s optimiser fields are then not used.
        callbacks: :class:`Callback` objects, LR schedulers or functions of the
            :class:`FitState`, run in order after ``cfg``'s own callbacks (and after
            :class:`StopWhenConverged`, added for a BatchedLBFGS).
        save: writes a checkpoint payload (default: atomically to ``cfg.ckpt_path``); e.g.
            sharded fits gather the ranks' cells into one checkpoint.
    """
    cfg = cfg if cfg is not None else FitConfig()
    if cfg.max_evals < 0:
        raise ValueError(f"FitConfig.max_evals must be >= 0 (0: no limit), got {cfg.max_evals}")
    device = device or next(model.parameters()).device
    if optimizer is None:
        opt, hooks = optimizer_from_config(cfg, model.parameters())
    else:
        if cfg.lr_schedule != "constant":
            raise ValueError(f"FitConfig.lr_schedule={cfg.lr_schedule!r} applies to the "
                             f"optimiser fit builds; with optimizer= given, pass the "
                             f"schedule as a callback (e.g. CosineLR)")
        opt = optimizer if isinstance(optimizer, Optimizer) else optimizer(
            list(model.parameters()))
        if not isinstance(opt, Optimizer):
            raise ValueError(f"optimizer: the factory returned {type(opt).__name__}, "
                             f"not a torch.optim.Optimizer")
        hooks = []
    hooks += [as_callback(c) for c in callbacks]
    if isinstance(opt, BatchedLBFGS) and not any(isinstance(h, StopWhenConverged)
                                                 for h in hooks):
        hooks.insert(0, StopWhenConverged())
    per_cell = wants_per_cell_losses(opt)
    counters = {"evals": 0}
    last: Dict[str, torch.Tensor] = {}

    def closure():
        opt.zero_grad(set_to_none=False)
        counters["evals"] += 1
        losses = problem.loss_and_backward(model)
        last["losses"] = losses
        return losses if per_cell else losses.sum()

    res = FitResult(0.0, 0, 0, 0)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        res.train_seconds = float(resume["train_seconds"])
        res.steps, counters["evals"] = int(resume["steps"]), int(resume["function_evals"])
        res.history = [list(h) for h in resume["history"]]
    state = FitState(model, opt, problem, cfg, res)
    state.quality = res.history[-1][1] if res.history else float("nan")
    best: Dict = {"quality": -math.inf, "seconds": math.nan, "evals": 0, "model": None}
    if resume is not None and resume.get("best") is not None:
        best.update(resume["best"])

    def remember_if_best():
        if cfg.keep_best and math.isfinite(state.quality) and state.quality > best["quality"]:
            best.update(quality=state.quality, seconds=res.train_seconds,
                        evals=counters["evals"],
                        model={k: v.detach().clone() for k, v in model.state_dict().items()})

    def checkpoint():
        if cfg.ckpt_path is None and save is None:
            return
        payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                   "train_seconds": res.train_seconds, "steps": res.steps,
                   "function_evals": counters["evals"], "history": res.history,
                   "fit_config": cfg.__dict__,
                   "best": best if best["model"] is not None else None}
        payload.update(extra_ckpt or {})
        if save is not None:
            save(payload)
        else:
            save_checkpoint(cfg.ckpt_path, payload)

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        desc = cfg.desc or (cfg.optimizer if optimizer is None else type(opt).__name__)
        bar = tqdm(total=round(cfg.max_seconds, 1), unit="s", desc=desc,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f}s "
                              "[{elapsed}<{remaining}{postfix}]")
        bar.update(min(res.train_seconds, cfg.max_seconds))
    for h in hooks:
        h.on_fit_begin(state)
    last_ckpt = res.train_seconds
    while res.train_seconds < cfg.max_seconds:
        for h in hooks:
            if not h.timed:
                h.on_step_begin(state)
        synchronize(device)
        t0 = time.perf_counter()
        for h in hooks:
            if h.timed:
                h.on_step_begin(state)
        out = opt.step(closure)
        synchronize(device)
        dt = time.perf_counter() - t0
        res.train_seconds += dt
        res.steps += 1
        res.function_evals = counters["evals"]
        # the step's own per-cell losses when it reports them, else its last evaluation's
        losses = last["losses"]
        if torch.is_tensor(out) and out.shape == losses.shape:
            losses = out
        state.set_losses(losses)
        for h in hooks:
            h.on_step_end(state)
        quality = state.quality
        res.history.append([res.train_seconds, quality])
        remember_if_best()
        if bar is not None:
            bar.update(min(dt, max(0.0, cfg.max_seconds - bar.n)))
            bar.set_postfix_str(f"{problem.quality_name} {quality:.2f}")
        if not math.isfinite(quality):
            res.stopped = "diverged"
            break
        if cfg.target is not None and quality >= cfg.target:
            res.stopped, res.reached_target = "target", True
            break
        if state.stop is not None:
            res.stopped = state.stop
            break
        if 0 < cfg.max_evals <= counters["evals"]:
            break
        if res.train_seconds - last_ckpt >= cfg.ckpt_every:
            checkpoint()
            last_ckpt = res.train_seconds
    if bar is not None:
        bar.close()
    res.function_evals = counters["evals"]
    res.quality = state.quality
    res.iterations = res.steps
    for h in hooks:
        h.on_fit_end(state)
    if res.stopped != "diverged":
        checkpoint()                 # the last point, so that a resume continues from it
    res.final_quality = res.quality
    if best["model"] is not None:
        res.best_quality, res.best_seconds = best["quality"], best["seconds"]
        res.best_evals = best["evals"]
        if not res.quality >= best["quality"]:     # a worse (or non-finite) end
            last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best["model"])
            # the quality of the parameters the model ends on, measured (untimed): an
            # optimiser that evaluates before it updates (Adam) reported its best step's
            # quality one update earlier
            with torch.no_grad():
                exact = problem.quality(problem.cell_losses(model).detach())
            if exact >= res.final_quality or not math.isfinite(res.final_quality):
                res.quality = exact
            else:
                model.load_state_dict(last)
    return res


__all__ = ["CellProblem", "FitConfig", "FitResult", "FitState", "Callback", "CosineLR",
           "ExactQuality", "StopWhenConverged", "Resample", "as_callback", "make_optimizer",
           "optimizer_from_config", "wants_per_cell_losses", "fit", "OPTIMIZERS",
           "LR_SCHEDULES"]
