"""BatchedLBFGS: one L-BFGS per cell, all cells in the same tensor operations.

Every parameter's dim 0 indexes the cell. The closure returns either

* a loss vector ``[n_cells]``: the cells are independent problems. Each cell keeps its own
  curvature history, runs its own line search and converges (or fails) on its own. Cells
  advance asynchronously: every closure evaluation is one line-search trial for every active
  cell, so a cell that must backtrack never makes the others wait, and N cells optimised
  together follow exactly the iterates of N separate runs.
* a scalar: the loss couples the cells (volume rendering). Curvature stays per cell
  (block-diagonal), the step length comes from one shared line search.

All state is fixed-shape tensors (:class:`LBFGSState`: ring buffers ``[n_cells, m, 2, p]``
for the ``s`` and ``y`` pairs, Gram matrices ``[n_cells, m, m]``); an iteration does no host
synchronisation. A non-finite trial is rejected for its cell (the step shrinks) and never
enters the history. A pair with non-positive curvature is skipped. When a cell's line search
fails, its history is dropped and it retries steepest descent; if that fails too the cell is
frozen.

One closure evaluation is one iteration of :func:`iterate`, made of named pieces:

1. :func:`line_search_trial`: the trial point's value and slope feed each line's search
   (:func:`~kilonerf_lbfgs.optim.linesearch.line_search_update`); a cell accepts, falls back
   to its best point, fails, or tries another step.
2. :func:`curvature_pair` and :func:`update_history`: the accepted step's pair ``(s, y)``
   enters the ring buffer and the Gram matrices ``S^T Y``, ``Y^T Y`` are updated
   incrementally (one pass over the history, not ``m``).
3. :func:`convergence_test`: gradient and step tolerances; failed searches reset or freeze.
4. :func:`new_direction`: the compact-form direction ``-H g``
   (:func:`~kilonerf_lbfgs.optim.compact.compact_coefficients`) and a fresh line search
   (:func:`start_line_search`) for every cell that moved or must retry.

Shapes below: ``n`` cells, ``p`` parameters per cell, ``m`` history slots, ``L`` line
searches (``L = n`` for a separable loss, ``L = 1`` for a coupled one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch.optim import Optimizer

from . import native
from .compact import all_set, cell_dot, chronological_order, compact_coefficients
from .history import (combine, initial_dtype, narrow, needs_blocked, new_history, project,
                      resolve_dtype, to_blocked, warm_kernels, write_pair)
from .linesearch import LINE_SEARCHES, LineSearchState, line_search_update, new_line_state

ACTIVE, CONVERGED, FAILED = 0, 1, 2


# ---------------------------------------------------------------------------- hyperparameters

class Hyperparameters(NamedTuple):
    """The validated contents of ``param_groups[0]``, read at every :meth:`BatchedLBFGS.step`.

    See :class:`BatchedLBFGS` for their meaning; ``line_search`` is ``"none"`` for ``None``.
    """
    lr: float
    history_size: int
    max_eval: int
    line_search: str
    tolerance_grad: float
    tolerance_change: float
    max_ls: int
    c1: float
    c2: float
    curvature_eps: float
    max_step: Optional[float] = None
    history_dtype: Optional[str] = None


# what history_dtype may say (None: the parameters' dtype; "auto": see history.resolve_dtype)
HISTORY_DTYPES = ("auto", "float64", "float32", "bfloat16", "float16")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or torch.is_tensor(value):
        raise ValueError(f"BatchedLBFGS: {name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"BatchedLBFGS: {name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"BatchedLBFGS: {name} must be finite, got {value!r}")
    return out


def _integer(name: str, value: Any, minimum: int) -> int:
    out = _number(name, value)
    if not out.is_integer() or out < minimum:
        raise ValueError(f"BatchedLBFGS: {name} must be an integer >= {minimum}, got {value!r}")
    return int(out)


def check_hyperparameters(group: Mapping[str, Any]) -> Hyperparameters:
    """Validate a parameter group's hyperparameters; ``ValueError`` names the first bad one.

    Rules: ``lr > 0``; ``history_size``, ``max_eval``, ``max_ls`` integers ``>= 1``;
    ``0 < c1 < c2 < 1``; ``tolerance_grad``, ``tolerance_change``, ``curvature_eps`` ``>= 0``;
    every number finite; ``line_search`` one of ``"strong_wolfe"``, ``"armijo"``, ``"none"``
    or ``None``; ``max_step`` ``None`` (absent in groups saved before it existed) or ``> 0``;
    ``history_dtype`` ``None`` (absent in older groups) or a name (or ``torch.dtype``) in
    :data:`HISTORY_DTYPES`.
    """
    missing = [f for f in Hyperparameters._fields if f not in group
               and f not in ("max_step", "history_dtype")]
    if missing:
        raise ValueError(f"BatchedLBFGS: parameter group lacks {', '.join(missing)}")
    mode = "none" if group["line_search"] is None else group["line_search"]
    if not isinstance(mode, str) or mode not in LINE_SEARCHES:
        raise ValueError(f"BatchedLBFGS: line_search must be one of 'strong_wolfe', 'armijo' "
                         f"or None, got {group['line_search']!r}")
    lr = _number("lr", group["lr"])
    if lr <= 0:
        raise ValueError(f"BatchedLBFGS: lr must be > 0, got {group['lr']!r}")
    ints = {k: _integer(k, group[k], 1) for k in ("history_size", "max_eval", "max_ls")}
    floats = {}
    for k in ("tolerance_grad", "tolerance_change", "curvature_eps"):
        floats[k] = _number(k, group[k])
        if floats[k] < 0:
            raise ValueError(f"BatchedLBFGS: {k} must be >= 0, got {group[k]!r}")
    c1, c2 = _number("c1", group["c1"]), _number("c2", group["c2"])
    if not 0 < c1 < 1:
        raise ValueError(f"BatchedLBFGS: c1 must lie in (0, 1), got {group['c1']!r}")
    if not 0 < c2 < 1:
        raise ValueError(f"BatchedLBFGS: c2 must lie in (0, 1), got {group['c2']!r}")
    if not c1 < c2:
        raise ValueError(f"BatchedLBFGS: c1 must be smaller than c2, got c1={group['c1']!r}, "
                         f"c2={group['c2']!r}")
    max_step = group.get("max_step")
    if max_step is not None:
        max_step = _number("max_step", max_step)
        if max_step <= 0:
            raise ValueError(f"BatchedLBFGS: max_step must be > 0 or None, got "
                             f"{group['max_step']!r}")
    history_dtype = group.get("history_dtype")
    if isinstance(history_dtype, torch.dtype):
        history_dtype = str(history_dtype).replace("torch.", "")
    if history_dtype is not None and history_dtype not in HISTORY_DTYPES:
        raise ValueError(f"BatchedLBFGS: history_dtype must be None or one of "
                         f"{', '.join(HISTORY_DTYPES)}, got {group['history_dtype']!r}")
    return Hyperparameters(lr=lr, line_search=mode, c1=c1, c2=c2, max_step=max_step,
                           history_dtype=history_dtype, **ints, **floats)


# ---------------------------------------------------------------------------- the state

@dataclass
class LBFGSState:
    """Everything one :class:`BatchedLBFGS` carries between closure evaluations.

    Curvature history (a ring buffer per cell, slot ``ptr`` written next):
        sy: ``[n, m, 2, p]`` history dtype (by default the parameters'),
            ``sy[:, i, 0] = s_i``, ``sy[:, i, 1] = y_i``.
        syb: None, or with a history dtype narrower than the parameters' the same pairs in
            the blocked layout ``[n, P, 2m, B]`` of :func:`~.history.to_blocked`.
        sty: ``[n, m, m]`` float64, ``sty[:, i, j] = s_i . y_j`` (slot order).
        yty: ``[n, m, m]`` float64, ``yty[:, i, j] = y_i . y_j``.
        valid: ``[n, m]`` bool, the slots the direction uses.
        ptr: ``[n]`` long, each cell's next slot.
        slots_used: int, slots written so far by any cell (``<= m``); the rest are zero.
        gamma: ``[n]`` float64, the initial inverse-Hessian scale ``s.y / y.y`` of the newest pair.
    The current point:
        x0, g0: ``[n, p]`` param dtype, accepted parameters and their gradient.
        f0: ``[n]`` (separable) or ``[]`` (coupled), loss dtype, the loss at ``x0``.
    The current direction ``d = -(dgamma g0 + dcoef . [S;Y])``:
        d: ``[n, p]`` param dtype.
        proj0: ``[n, 2m]`` float64, ``[S^T g0, Y^T g0]``.
        dgamma: ``[n]`` float64; dcoef: ``[n, 2m]`` float64 (kept to get ``s^T Y`` from the
            Gram matrices instead of a pass over ``Y``).
        gtd0: ``[L]`` float64, the slope ``g0 . d`` of each line at ``t = 0``.
    The line searches along ``d``:
        ls: :class:`~kilonerf_lbfgs.optim.linesearch.LineSearchState` over ``[L]``.
        t_unit: ``[L]`` float64, each search's first trial for ``lr = 1`` (the first trial is
            ``lr * t_unit``, so a change of ``lr`` applies to searches not yet begun).
        lo_g: ``[n, p]``, the gradient at each search's best point so far.
    Bookkeeping:
        separable: bool, whether the closure returns ``[n]`` (True) or a scalar.
        status: ``[n]`` long, 0 active, 1 converged, 2 failed.
        n_evals, n_iters: ``[n]`` long, evaluations while active; accepted steps.
    """
    separable: bool
    slots_used: int
    sy: torch.Tensor
    sty: torch.Tensor
    yty: torch.Tensor
    valid: torch.Tensor
    ptr: torch.Tensor
    gamma: torch.Tensor
    x0: torch.Tensor
    g0: torch.Tensor
    f0: torch.Tensor
    d: torch.Tensor
    proj0: torch.Tensor
    dgamma: torch.Tensor
    dcoef: torch.Tensor
    gtd0: torch.Tensor
    ls: LineSearchState
    t_unit: torch.Tensor
    lo_g: torch.Tensor
    status: torch.Tensor
    n_evals: torch.Tensor
    n_iters: torch.Tensor
    syb: Optional[torch.Tensor] = None

    @property
    def n_cells(self) -> int:
        return self.x0.shape[0]

    @property
    def history_size(self) -> int:
        return self.sy.shape[1]

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of tensors (``ls`` a nested dict), as kept in ``optimizer.state``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ls"] = self.ls._asdict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LBFGSState":
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in d and k != "syb"]
        ls = d.get("ls")
        if not missing and isinstance(ls, Mapping):
            missing = [f"ls.{k}" for k in LineSearchState._fields if k not in ls]
        elif not missing:
            missing = ["ls"]
        if missing:
            raise ValueError(f"BatchedLBFGS: the optimizer state lacks {', '.join(missing)}")
        kw = {k: d[k] for k in names if k in d}
        kw["ls"] = LineSearchState(**{k: ls[k] for k in LineSearchState._fields})
        st = cls(**kw)
        if st.syb is None and needs_blocked(st.sy.dtype, st.x0.dtype, st.x0.device):
            st.syb = to_blocked(st.sy)
        return st


def _same_value(x: torch.Tensor) -> Optional[int]:
    """The value every entry of the integer tensor ``x`` holds, where that is known without a
    device sync (on the CPU) and they all hold one; else None."""
    if x.device.type != "cpu":
        return None
    lo, hi = int(x.min()), int(x.max())
    return lo if lo == hi else None


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask[:, None], a, b)`` for ``[n, p]`` operands and ``mask [n]``; ``a``
    itself (no pass over the data) when every cell is selected (see :func:`~.compact.all_set`)."""
    return a if all_set(mask) else torch.where(mask[:, None], a, b)


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    """``[n, p] -> [n]`` max-norm per cell (NaN where the cell has one), as the larger of
    ``max x`` and ``-min x``: two reductions without an ``abs`` temporary, several times
    faster on the CPU than ``abs().amax`` or ``vector_norm(ord=inf)``."""
    return torch.maximum(x.amax(1), x.amin(1).neg())


def _line_values(loss: torch.Tensor, per_cell: torch.Tensor, separable: bool):
    """Per-line loss ``[L]`` float64 and per-line sum of a per-cell quantity ``[n] -> [L]``."""
    if separable:
        return loss.double(), per_cell
    return loss.double().reshape(1), per_cell.sum().reshape(1)


def _cell_of_line(line_vals: torch.Tensor, st: LBFGSState) -> torch.Tensor:
    """``[L] -> [n]``: each cell's line."""
    return line_vals if st.separable else line_vals.expand(st.n_cells)


def init_state(loss: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, separable: bool,
               hp: Hyperparameters, work: Optional[Dict[str, torch.Tensor]] = None
               ) -> LBFGSState:
    """The state after the first evaluation: ``loss`` (``[n]`` or ``[]``) and ``grad [n, p]``
    at ``x [n, p]``; empty history, steepest-descent direction, fresh line searches.
    A cell that starts at a stationary point is converged."""
    n, p = grad.shape
    m = hp.history_size
    dev, dt = grad.device, grad.dtype
    f64 = dict(device=dev, dtype=torch.float64)
    n_lines = n if separable else 1
    status = torch.full((n,), ACTIVE, dtype=torch.long, device=dev)
    final = resolve_dtype(hp.history_dtype, dt, n, m, p)
    start = initial_dtype(hp.history_dtype, dt, n, m, p)
    if start != final:  # narrows when full: compile its kernels now, not in mid-run
        warm_kernels(n, m, p, final, dt, dev)
    sy, syb = new_history(n, m, p, start, dt, dev)
    st = LBFGSState(
        separable=bool(separable), slots_used=0, sy=sy, syb=syb,
        sty=torch.zeros(n, m, m, **f64), yty=torch.zeros(n, m, m, **f64),
        valid=torch.zeros(n, m, dtype=torch.bool, device=dev),
        ptr=torch.zeros(n, dtype=torch.long, device=dev),
        gamma=torch.ones(n, **f64),
        x0=x, g0=grad, f0=loss.clone(),
        d=torch.zeros_like(grad), proj0=torch.zeros(n, 2 * m, **f64),
        dgamma=torch.ones(n, **f64), dcoef=torch.zeros(n, 2 * m, **f64),
        gtd0=torch.zeros(n_lines, **f64),
        ls=new_line_state(torch.zeros(n_lines, **f64), torch.zeros(n_lines, **f64),
                          torch.zeros(n_lines, **f64)),
        t_unit=torch.ones(n_lines, **f64), lo_g=grad.clone(),
        status=status,
        n_evals=torch.ones(n, dtype=torch.long, device=dev),
        n_iters=torch.zeros(n, dtype=torch.long, device=dev))
    stationary = grad.abs().amax(1) <= hp.tolerance_grad
    if not separable:  # a coupled problem converges as a whole
        stationary = stationary.all().expand(n)
    st.status = torch.where(stationary, torch.full_like(status, CONVERGED), status)
    new_direction(st, grad, torch.zeros(n, 2 * m, **f64),
                  reset=torch.zeros(n, dtype=torch.bool, device=dev), where=None, lr=hp.lr,
                  work=work, max_step=hp.max_step)
    return st


# ---------------------------------------------------------------------------- direction

def compact_direction(st: LBFGSState, grad: torch.Tensor, proj: torch.Tensor,
                      reset: torch.Tensor, where: Optional[torch.Tensor],
                      work: Optional[Dict[str, torch.Tensor]] = None,
                      max_step: Optional[float] = None):
    """The quasi-Newton direction ``d = -H grad`` of every cell, in compact form.

    Args:
        grad: ``[n, p]`` each cell's gradient at its current point.
        proj: ``[n, 2m]`` float64, ``[S^T grad, Y^T grad]``.
        reset: ``[n]`` bool, cells whose history is dropped first (``gamma = 1``).
        where: ``[n]`` bool or None (all), the cells that take the new direction.
        max_step: a per-cell trust region: each cell's direction is scaled down (never up)
            so that no parameter of the cell moves more than ``max_step`` at ``t = 1``
            (None: off). A positive scale per cell keeps every cell's direction a descent
            direction, and keeps a coupled problem's line a line.
    Updates ``st.valid`` and ``st.gamma`` (reset cells, and cells whose direction is not a
    descent direction: they fall back to ``-grad`` and lose their history).
    Returns:
        d: ``[n, p]``; dgamma ``[n]`` and dcoef ``[n, 2m]`` float64 with
        ``d = -(dgamma grad + dcoef . [S;Y])``; gtd ``[n]`` float64, ``grad . d``.
    """
    valid = st.valid & ~reset[:, None]
    st.valid = valid
    st.gamma = torch.where(reset, torch.ones_like(st.gamma), st.gamma)
    order = chronological_order(st.ptr, st.history_size)
    coef = compact_coefficients(proj, st.sty, st.yty, st.gamma, valid, order, work,
                                shift=_same_value(st.ptr))
    # d = -(gamma g + coef . [S;Y]); combine returns a new tensor
    d = torch.addcmul(combine(st.sy, st.syb, coef, st.slots_used, grad.dtype),
                      st.gamma.to(grad.dtype)[:, None], grad).neg_()
    return checked_direction(st, grad, d, coef, where, max_step)


def checked_direction(st: LBFGSState, grad: torch.Tensor, d: torch.Tensor, coef: torch.Tensor,
                      where: Optional[torch.Tensor], max_step: Optional[float] = None):
    """The quasi-Newton direction ``d = -(gamma grad + coef . [S;Y]) [n, p]`` made safe: a
    cell (in ``where``, or any if None) whose ``d`` is not a descent direction falls back to
    ``-grad`` and loses its history; ``max_step`` scales each cell's direction down (see
    :func:`compact_direction`, which returns what this returns)."""
    gtd_cell = cell_dot(grad, d)
    # not a descent direction (rounding, bad pairs): drop the history, use -grad
    bad = ~(gtd_cell < 0) | ~torch.isfinite(gtd_cell)
    if where is not None:
        bad = bad & where
    if not all_set(~bad):
        d = torch.where(bad[:, None], -grad, d)
        gtd_cell = cell_dot(grad, d)
    st.valid = st.valid & ~bad[:, None]
    dgamma = torch.where(bad, torch.ones_like(st.gamma), st.gamma)
    dcoef = torch.where(bad[:, None], torch.zeros_like(coef), coef)
    if max_step is not None:
        dmax = _max_abs(d).double()
        scale = (max_step / dmax.clamp(min=1e-300)).clamp(max=1.0)
        d = d * scale.to(d.dtype)[:, None]
        dgamma, dcoef = dgamma * scale, dcoef * scale[:, None]
        gtd_cell = cell_dot(grad, d)
    return d, dgamma, dcoef, gtd_cell


def start_line_search(st: LBFGSState, grad: torch.Tensor, gtd_cell: torch.Tensor
                      ) -> Tuple[LineSearchState, torch.Tensor, torch.Tensor]:
    """Fresh searches along the new directions, first trial for ``lr = 1``.

    Args:
        grad: ``[n, p]`` the gradients the directions were built from.
        gtd_cell: ``[n]`` float64, ``grad . d`` per cell.
    Returns:
        ls: a :class:`LineSearchState` over ``[L]`` with ``t = t_unit``; gtd0 ``[L]``; t_unit
        ``[L]``: 1 where the cell (line) has history, else ``min(1, 1 / |grad|_1)`` so that a
        steepest-descent step is at most ``lr`` long in l1 norm.
    """
    f0_line, gtd0 = _line_values(st.f0, gtd_cell, st.separable)
    gnorm1 = torch.linalg.vector_norm(grad, ord=1, dim=1).double()
    no_hist_line = ~st.valid.any(1)
    if not st.separable:
        gnorm1 = gnorm1.sum().reshape(1)
        no_hist_line = no_hist_line.all().reshape(1)
    t_unit = torch.where(no_hist_line, torch.clamp(1.0 / gnorm1.clamp(min=1e-300), max=1.0),
                         torch.ones_like(gtd0))
    return new_line_state(f0_line, gtd0, t_unit), gtd0, t_unit


def new_direction(st: LBFGSState, grad: torch.Tensor, proj: torch.Tensor, reset: torch.Tensor,
                  where: Optional[torch.Tensor], lr: float,
                  work: Optional[Dict[str, torch.Tensor]] = None,
                  max_step: Optional[float] = None) -> None:
    """Set ``d``, ``gtd0``, ``proj0``, ``dgamma``, ``dcoef`` and a fresh line search (first
    trial ``lr * t_unit``) for the cells in ``where`` (all cells if None), from their
    gradient ``grad [n, p]`` and ``proj [n, 2m] = [S;Y]^T grad`` (``max_step``: see
    :func:`compact_direction`)."""
    d, dgamma, dcoef, gtd_cell = compact_direction(st, grad, proj, reset, where, work,
                                                   max_step)
    adopt_direction(st, grad, proj, d, dgamma, dcoef, gtd_cell, where, lr)


def adopt_direction(st: LBFGSState, grad: torch.Tensor, proj: torch.Tensor, d: torch.Tensor,
                    dgamma: torch.Tensor, dcoef: torch.Tensor, gtd_cell: torch.Tensor,
                    where: Optional[torch.Tensor], lr: float) -> None:
    """The cells in ``where`` (all if None) take the direction ``d`` (from
    :func:`checked_direction`, with ``proj = [S;Y]^T grad``) and a fresh line search."""
    fresh, gtd0, t_unit = start_line_search(st, grad, gtd_cell)
    fresh = fresh._replace(t=lr * t_unit)
    if where is None:
        st.d, st.gtd0, st.proj0, st.dgamma, st.dcoef = d, gtd0, proj, dgamma, dcoef
        st.ls, st.t_unit = fresh, t_unit
        return
    w_line = where if st.separable else where.any().reshape(1)
    st.d = _select(where, d, st.d)
    st.proj0 = torch.where(where[:, None], proj, st.proj0)
    st.dgamma = torch.where(where, dgamma, st.dgamma)
    st.dcoef = torch.where(where[:, None], dcoef, st.dcoef)
    st.gtd0 = torch.where(w_line, gtd0, st.gtd0)
    st.t_unit = torch.where(w_line, t_unit, st.t_unit)
    st.ls = fresh.where(w_line, st.ls)


def apply_lr(st: LBFGSState, lr: float) -> None:
    """Searches that have not tried a step yet start at ``lr * t_unit`` (``lr`` may have
    changed since they were set up); searches under way keep their trial."""
    st.ls = st.ls._replace(t=torch.where(st.ls.trials == 0, lr * st.t_unit, st.ls.t))


# ---------------------------------------------------------------------------- one iteration

def trial_point(st: LBFGSState) -> torch.Tensor:
    """``[n, p]``: ``x0 + t d`` for active cells, ``x0`` for the others."""
    t = _cell_of_line(st.ls.t, st)
    t = torch.where(st.status == ACTIVE, t, torch.zeros_like(t))
    return torch.addcmul(st.x0, t.to(st.x0.dtype)[:, None], st.d)


class TrialOutcome(NamedTuple):
    """Per-cell result of one line-search trial (all ``[n]`` unless said).

    accept: the cell moves (its trial passed, or its search gave up with a better point).
    fallback: it moves to the best point of a search that gave up.
    failed: its search gave up without any better point (active cells only).
    t_acc: float64, the accepted step length.
    g_new: ``[n, p]`` the gradient at the accepted point; f_new: the loss there
    (``[n]``, or ``[]`` when coupled).
    """
    accept: torch.Tensor
    fallback: torch.Tensor
    failed: torch.Tensor
    t_acc: torch.Tensor
    g_new: torch.Tensor
    f_new: torch.Tensor


def line_search_trial(st: LBFGSState, loss: torch.Tensor, grad: torch.Tensor,
                      hp: Hyperparameters) -> TrialOutcome:
    """Feed the trial's ``loss`` (``[n]`` or ``[]``) and ``grad [n, p]`` to every line's search.

    A search gives up after ``max_ls`` trials or when its bracket is too narrow to move any
    parameter by ``1e-3 tolerance_change``; it then falls back to its best point, or fails if
    it has none. A non-finite gradient fails the cell's (line's) trial. Updates ``st.ls``,
    ``st.lo_g`` and ``st.n_evals``.
    """
    separable = st.separable
    active = st.status == ACTIVE
    st.n_evals += active.long()
    gtd_cell = cell_dot(grad, st.d)
    f_line, gtd_line = _line_values(loss, gtd_cell, separable)
    # a non-finite entry of a cell's gradient makes its g . d non-finite (NaN * 0 is NaN)
    finite_grad = torch.isfinite(gtd_cell) if separable else torch.isfinite(gtd_cell).all()
    gtd_line = torch.where(finite_grad, gtd_line, torch.full_like(gtd_line, float("nan")))
    ls_old = st.ls
    accept_l, lo_moved_l, ls = line_search_update(
        ls_old, f_line, gtd_line, _line_values(st.f0, gtd_cell, separable)[0], st.gtd0,
        hp.line_search, hp.c1, hp.c2)
    # give up: too many trials or a bracket too narrow to matter
    dmax = _max_abs(st.d).double()
    dmax_line = dmax if separable else dmax.max().reshape(1)
    narrow = torch.isfinite(ls.hi_t) & \
        ((ls.hi_t - ls.lo_t).abs() * dmax_line < 1e-3 * hp.tolerance_change)
    give_up = ~accept_l & ((ls.trials >= hp.max_ls) | narrow)
    fallback_l = give_up & (ls.lo_t > 0)           # accept the best point seen
    failed_l = give_up & ~fallback_l
    accept = _cell_of_line(accept_l | fallback_l, st) & active
    fallback = _cell_of_line(fallback_l, st)
    failed = _cell_of_line(failed_l, st) & active
    lo_moved = _cell_of_line(lo_moved_l, st)
    st.lo_g = _select(lo_moved, grad, st.lo_g)
    st.ls = ls
    t_acc = _cell_of_line(torch.where(fallback_l, ls.lo_t, ls_old.t), st)
    g_new = _select(~fallback, grad, st.lo_g)
    if separable:
        f_new = torch.where(fallback_l, ls.lo_f.to(loss.dtype), loss)
    else:
        f_new = torch.where(fallback_l[0], ls.lo_f[0].to(loss.dtype), loss)
    return TrialOutcome(accept, fallback, failed, t_acc, g_new, f_new)


def curvature_pair(st: LBFGSState, out: TrialOutcome, hp: Hyperparameters):
    """The accepted step's pair and whether it enters the history.

    Returns:
        s: ``[n, p]``, ``s = t_acc d``; stored: ``(s, y)`` ``[n, p]`` each as the history
        stores them (its dtype; ``y = g_new - g0``); wide: the same pair in the parameters'
        dtype (the stored values, widened; ``s`` and ``y`` themselves at full precision);
        sy, yy: ``[n]`` float64, ``s.y`` and ``y.y`` of the stored pair (consistent with its
        later projections); keep: ``[n]`` bool, accepted with ``s.y > curvature_eps y.y``,
        ``y != 0`` and both finite.
    """
    s = out.t_acc.to(out.g_new.dtype)[:, None] * st.d
    y = out.g_new - st.g0
    # each conversion is a no-op (the tensor itself) where the history is full precision
    stored = (s.to(st.sy.dtype), y.to(st.sy.dtype))
    ws, wy = stored[0].to(s.dtype), stored[1].to(y.dtype)
    sy, yy = cell_dot(ws, wy), cell_dot(wy, wy)
    keep = out.accept & (sy > hp.curvature_eps * yy) & (yy > 0) & \
        torch.isfinite(sy) & torch.isfinite(yy)
    return s, stored, (ws, wy), sy, yy, keep


def update_history(st: LBFGSState, stored: Tuple[torch.Tensor, torch.Tensor],
                   wide: Tuple[torch.Tensor, torch.Tensor], g_new: torch.Tensor,
                   sy: torch.Tensor, yy: torch.Tensor, keep: torch.Tensor,
                   t_acc: torch.Tensor) -> torch.Tensor:
    """Write the pair ``(s, y)`` of the cells in ``keep`` (``stored`` in the history's dtype,
    ``wide`` the same values in the parameters', see :func:`curvature_pair`) into slot
    ``ptr`` and update the Gram matrices incrementally; return ``[S;Y]^T g_new`` ``[n, 2m]``
    float64 for the new history (the next direction needs it).

    One pass over the old history gives ``[S;Y]_old^T g_new``; with ``proj0 = [S;Y]^T g0``
    the new column is ``S_old^T y = S_old^T g_new - S_old^T g0`` (and likewise ``Y_old^T y``).
    The new row ``s^T Y_old`` needs no pass at all: ``s = -t (dgamma g0 + dcoef . [S;Y])``,
    so ``s^T Y = -t (dgamma g0^T Y + dcoef_S . S^T Y + dcoef_Y . Y^T Y)``. The diagonal entry
    is ``s.y`` (``y.y``). Slot ``ptr`` is then patched in the projection.
    """
    m = st.history_size
    proj_new = project(st.sy, g_new, st.slots_used)                       # [S;Y]_old g
    sty_col = proj_new[:, :m] - st.proj0[:, :m]                           # S_old^T y
    yty_col = proj_new[:, m:] - st.proj0[:, m:]                           # Y_old^T y
    j = st.ptr
    # the cells' slots: one shared int where that is known without a device sync (plain
    # slicing, several times cheaper than advanced indexing), else per cell
    shared = _same_value(j)
    jj = j if shared is None else shared
    ix = (slice(None),) if shared is not None else \
        (torch.arange(st.n_cells, device=g_new.device),)
    kj = keep[:, None]
    write_pair(st.sy, st.syb, j, stored[0], stored[1], keep)
    # slots are written in order from 0, at most one per evaluation
    st.slots_used = min(m, st.slots_used + 1)
    dc = st.dcoef
    sty_row = -t_acc.double()[:, None] * (
        st.dgamma[:, None] * st.proj0[:, m:]
        + torch.bmm(dc[:, None, :m], st.sty)[:, 0]
        + torch.bmm(dc[:, None, m:], st.yty)[:, 0])                       # s^T Y_old
    onehot = torch.nn.functional.one_hot(j, m).bool()
    sty_row = torch.where(onehot, sy[:, None], sty_row)                   # s^T Y_new
    sty_col = torch.where(onehot, sy[:, None], sty_col)
    yty_col = torch.where(onehot, yy[:, None], yty_col)
    sty, yty = st.sty, st.yty
    col, row = ix + (slice(None), jj), ix + (jj,)
    sty[col] = torch.where(kj, sty_col, sty[col])
    sty[row] = torch.where(kj, sty_row, sty[row])
    yty[col] = torch.where(kj, yty_col, yty[col])
    yty[row] = torch.where(kj, yty_col, yty[row])
    st.valid[row] = st.valid[row] | keep
    st.ptr = torch.where(keep, (j + 1) % m, j)
    st.gamma = torch.where(keep, sy / yy.clamp(min=1e-300), st.gamma)
    # [S;Y]_new g: patch the rewritten slot
    sg = cell_dot(wide[0], g_new)
    yg = cell_dot(wide[1], g_new)
    s_at, y_at = ix + (jj,), ix + (m + jj,)
    proj_new[s_at] = torch.where(keep, sg, proj_new[s_at])
    proj_new[y_at] = torch.where(keep, yg, proj_new[y_at])
    return proj_new


def convergence_test(st: LBFGSState, out: TrialOutcome, s: torch.Tensor,
                     hp: Hyperparameters) -> torch.Tensor:
    """Update ``st.status``: an accepted cell with ``max|g_new| <= tolerance_grad`` or
    ``max|s| <= tolerance_change`` is converged (a coupled problem only as a whole); a failed
    search without history freezes its cell. Returns ``retry [n]`` bool: failed searches
    with history, which restart from steepest descent."""
    gmax = _max_abs(out.g_new)
    smax = _max_abs(s)
    converged = out.accept & ((gmax <= hp.tolerance_grad) | (smax <= hp.tolerance_change))
    if not st.separable:  # a coupled problem converges as a whole
        converged = converged.all().expand(st.n_cells) & out.accept
    had_history = st.valid.any(1)
    frozen_fail = out.failed & ~had_history
    retry = out.failed & had_history
    st.status = torch.where(converged, torch.full_like(st.status, CONVERGED), st.status)
    st.status = torch.where(frozen_fail, torch.full_like(st.status, FAILED), st.status)
    return retry


def iterate(st: LBFGSState, loss: torch.Tensor, grad: torch.Tensor, hp: Hyperparameters,
            work: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Consume one closure evaluation at :func:`trial_point` (``loss`` ``[n]`` or ``[]``,
    ``grad [n, p]``): line-search trial, curvature pair, history update, convergence test,
    and a new direction for the cells that moved or retry. Updates ``st`` in place."""
    out = line_search_trial(st, loss, grad, hp)
    s, stored, wide, sy, yy, keep = curvature_pair(st, out, hp)
    if native.serves(st.x0.device, st.x0.dtype, st.sy.dtype):
        _iterate_native(st, out, s, stored, sy, yy, keep, hp)
    else:
        proj_new = update_history(st, stored, wide, out.g_new, sy, yy, keep, out.t_acc)
        retry = convergence_test(st, out, s, hp)
        _move(st, out, s)
        renew = (out.accept | retry) & (st.status == ACTIVE)
        new_direction(st, st.g0, torch.where(out.accept[:, None], proj_new, st.proj0),
                      reset=retry, where=renew, lr=hp.lr, work=work, max_step=hp.max_step)
    if st.slots_used == st.history_size and hp.history_dtype == "auto" and \
            st.sy.dtype == st.x0.dtype:
        narrow_when_full(st)


def _move(st: LBFGSState, out: TrialOutcome, s: torch.Tensor) -> None:
    """The accepted cells move to their new point: ``x0 += s``, with its gradient and loss."""
    accept = out.accept
    st.n_iters += accept.long()
    st.x0 = _select(accept, st.x0 + s, st.x0)
    st.g0 = _select(accept, out.g_new, st.g0)
    st.lo_g = _select(accept, out.g_new, st.lo_g)
    st.f0 = torch.where(accept, out.f_new, st.f0) if st.separable else \
        torch.where(accept.any(), out.f_new, st.f0)


def _iterate_native(st: LBFGSState, out: TrialOutcome, s: torch.Tensor,
                    stored: Tuple[torch.Tensor, torch.Tensor], sy: torch.Tensor,
                    yy: torch.Tensor, keep: torch.Tensor, hp: Hyperparameters) -> None:
    """The rest of :func:`iterate` with the history work of every cell in one C kernel per
    cell (:func:`~.native.cell_step`): the same arithmetic as :func:`update_history` and
    :func:`new_direction`, the history read once instead of twice. The convergence test
    comes first here (it needs nothing the history update changes: a failed cell keeps no
    pair)."""
    retry = convergence_test(st, out, s, hp)
    _move(st, out, s)
    renew = (out.accept | retry) & (st.status == ACTIVE)
    st.valid = st.valid & ~retry[:, None]
    st.gamma = torch.where(retry, torch.ones_like(st.gamma), st.gamma)
    st.syb = None                       # the kernel reads the plain layout only
    proj, coef, d = native.cell_step(st, stored, sy, yy, keep, out.accept, renew, out.t_acc)
    st.slots_used = min(st.history_size, st.slots_used + 1)
    d, dgamma, dcoef, gtd_cell = checked_direction(st, st.g0, d, coef, renew, hp.max_step)
    adopt_direction(st, st.g0, proj, d, dgamma, dcoef, gtd_cell, renew, hp.lr)


def narrow_when_full(st: LBFGSState) -> None:
    """``history_dtype="auto"``: the history just filled; store it from now on in the dtype
    :func:`~.history.resolve_dtype` picks (if narrower), with the Gram matrices and ``proj0``
    recomputed from the rounded pairs (:func:`~.history.narrow`). The one approximation: a
    cell's next ``s^T Y`` row comes from its current direction's coefficients, which were
    computed from the pairs before rounding (a relative error of the rounding's order in one
    row, replaced within ``m`` steps)."""
    n, m, _, p = st.sy.shape
    final = resolve_dtype("auto", st.x0.dtype, n, m, p)
    if final != st.sy.dtype:
        st.sy, st.syb, st.sty, st.yty, st.proj0 = narrow(st.sy, final, st.g0)


def restart_on_new_objective(st: LBFGSState, loss: torch.Tensor, grad: torch.Tensor,
                             hp: Hyperparameters, keep_history: bool,
                             work: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The objective changed (a new batch of samples): ``loss`` (``[n]`` or ``[]``) and
    ``grad [n, p]`` are the new objective's value and gradient at the current point
    ``st.x0``. Every cell becomes active again (unless stationary) with a fresh line search
    along a new direction. With ``keep_history`` the curvature pairs of earlier objectives
    stay: each pair was measured on one objective (``y = g(x_new; B) - g(x; B)``, the same
    batch ``B`` on both sides), so it is a true secant pair of that objective, and with
    batches from one distribution the curvature they describe carries over. Without it the
    cells restart from steepest descent, as a new optimiser would."""
    n = st.n_cells
    st.f0, st.g0, st.lo_g = loss.clone(), grad, grad.clone()
    stationary = grad.abs().amax(1) <= hp.tolerance_grad
    if not st.separable:
        stationary = stationary.all().expand(n)
    st.status = torch.where(stationary, torch.full_like(st.status, CONVERGED),
                            torch.full_like(st.status, ACTIVE))
    st.n_evals += 1
    reset = torch.full((n,), not keep_history, dtype=torch.bool, device=grad.device)
    proj = project(st.sy, grad, st.slots_used)
    new_direction(st, grad, proj, reset=reset, where=None, lr=hp.lr, work=work,
                  max_step=hp.max_step)


# ---------------------------------------------------------------------------- the optimiser

def _tree_map(fn, value):
    if isinstance(value, Mapping):
        return {k: _tree_map(fn, v) for k, v in value.items()}
    return fn(value) if torch.is_tensor(value) else value


class BatchedLBFGS(Optimizer):
    """Per-cell L-BFGS in the ``torch.optim`` style.

    Args:
        params: parameters whose dim 0 is the cell index (all the same size there, one
            dtype and device), one parameter group.
        lr: first trial step of each line search (1 is right for quasi-Newton steps); > 0.
        history_size: pairs kept per cell (``m``, >= 1); memory ``n_cells * 2m * p * 4`` bytes
            in fp32. Fixed once the first :meth:`step` has allocated the history: changing
            ``param_groups[0]["history_size"]`` later makes :meth:`step` raise ``ValueError``.
        max_eval: closure evaluations per :meth:`step` call (>= 1).
        line_search: ``"strong_wolfe"`` (default), ``"armijo"`` or ``None`` (fixed step ``lr``).
        tolerance_grad: a cell whose gradient max-norm falls to this is converged (>= 0).
        tolerance_change: a cell whose accepted step changes no parameter by more than this is
            converged (>= 0).
        max_ls: trials per line search before it gives up (>= 1).
        c1, c2: the sufficient-decrease and curvature constants, ``0 < c1 < c2 < 1``.
        curvature_eps: a pair is kept only if ``s.y > curvature_eps * y.y`` (>= 0).
        max_step: a per-cell trust region (None: off; else > 0): every new direction is
            scaled down per cell so that no parameter of a cell moves more than
            ``max_step`` at ``t = 1``; with ``line_search=None`` the step is then at most
            ``lr * max_step`` per parameter.
        history_dtype: the dtype the curvature pairs are stored in: None (default: the
            parameters' dtype, the exact reference), a narrower ``"bfloat16"`` /
            ``"float16"`` (or the ``torch.dtype``): half the memory traffic of an fp32
            history, through fused kernels that widen the pairs and accumulate in the
            parameters' dtype (:mod:`~kilonerf_lbfgs.optim.history`), or ``"auto"``:
            exact while the history fills, then bfloat16 where an fp32 history would
            outgrow the cache (:func:`~kilonerf_lbfgs.optim.history.resolve_dtype`), else
            exact throughout. Only the
            stored pairs are rounded, so the iterates differ from fp32 at the level of that
            rounding; fixed once the history is allocated, like ``history_size``.

    Every bad argument raises ``ValueError`` naming it. As in ``torch.optim``, the
    hyperparameters live in ``param_groups[0]`` and are read (and validated) at every
    :meth:`step`: a new ``lr`` sets the first trial of every line search that has not begun
    (a backtracking search under way keeps its step), and ``max_eval``, ``max_ls``, the
    tolerances, ``c1``/``c2`` and ``line_search`` apply from the next evaluation on.

    ``state_dict()`` has the ``torch.optim`` layout ``{"state": {0: {...}}, "param_groups":
    [{..., "params": [0, 1, ...]}]}``: the whole :class:`LBFGSState` sits under the first
    parameter's index (``{}`` before the first step), as in ``torch.optim.LBFGS``.
    ``load_state_dict`` restores it exactly (a resumed run continues bit for bit) and raises
    ``ValueError`` for a state of another cell count, parameter count per cell, number of
    parameter tensors, history size or dtype.
    """

    def __init__(self, params, lr: float = 1.0, history_size: int = 100, max_eval: int = 20,
                 line_search: Optional[str] = "strong_wolfe", tolerance_grad: float = 1e-12,
                 tolerance_change: float = 1e-12, max_ls: int = 25, c1: float = 1e-4,
                 c2: float = 0.9, curvature_eps: float = 1e-10,
                 max_step: Optional[float] = None, history_dtype=None):
        hp = check_hyperparameters(dict(
            lr=lr, history_size=history_size, max_eval=max_eval, line_search=line_search,
            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change, max_ls=max_ls,
            c1=c1, c2=c2, curvature_eps=curvature_eps, max_step=max_step,
            history_dtype=history_dtype))
        if torch.is_tensor(params):
            raise TypeError("BatchedLBFGS: params must be an iterable of tensors, got a tensor")
        params = list(params)
        if not params:
            raise ValueError("BatchedLBFGS: params is empty")
        super().__init__(params, hp._asdict())
        if len(self.param_groups) != 1:
            raise ValueError("BatchedLBFGS: params must form a single parameter group")
        group = self.param_groups[0]
        group.update(check_hyperparameters(group)._asdict())
        self._params = group["params"]
        if not self._params:
            raise ValueError("BatchedLBFGS: params is empty")
        for i, p in enumerate(self._params):
            if p.dim() == 0:
                raise ValueError(f"BatchedLBFGS: params[{i}] is a scalar; every parameter "
                                 f"needs a dim 0 (the cell index)")
            if not p.is_floating_point():
                raise ValueError(f"BatchedLBFGS: params[{i}] has dtype {p.dtype}; "
                                 f"floating point needed")
        sizes = sorted({p.shape[0] for p in self._params})
        if len(sizes) != 1:
            raise ValueError(f"BatchedLBFGS: every parameter needs the same dim 0 (the cell "
                             f"index); got sizes {sizes}")
        if len({(p.dtype, p.device) for p in self._params}) != 1:
            raise ValueError("BatchedLBFGS: params must share one dtype and one device")
        self.n_cells = sizes[0]
        if self.n_cells < 1:
            raise ValueError("BatchedLBFGS: params have no cells (dim 0 is 0)")
        self._numels = [p[0].numel() for p in self._params]
        self.n_params = sum(self._numels)
        stored = self._history_dtype(hp)
        if stored.itemsize > self._params[0].dtype.itemsize:
            raise ValueError(f"BatchedLBFGS: history_dtype {hp.history_dtype} is wider than "
                             f"the parameters' {self._params[0].dtype}; use None")
        self._work: Dict[str, torch.Tensor] = {}   # scratch buffers, not part of the state
        self._new_objective: Optional[bool] = None  # set by new_objective(): keep_history

    # ------------------------------------------------------------------ flat views
    def _gather_flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(self.n_cells, -1) for p in self._params], 1)

    def _gather_flat_grad(self) -> torch.Tensor:
        grads = [torch.zeros_like(p).reshape(self.n_cells, -1) if p.grad is None
                 else p.grad.detach().reshape(self.n_cells, -1) for p in self._params]
        return torch.cat(grads, 1)

    @torch.no_grad()
    def _set_flat_params(self, x: torch.Tensor) -> None:
        offset = 0
        for p, k in zip(self._params, self._numels):
            p.copy_(x[:, offset:offset + k].view_as(p))
            offset += k

    # ------------------------------------------------------------------ state
    def _hyperparameters(self) -> Hyperparameters:
        """``param_groups[0]`` validated, and consistent with an allocated history."""
        hp = check_hyperparameters(self.param_groups[0])
        st = self.state[self._params[0]]
        if "sy" in st and st["sy"].shape[1] != hp.history_size:
            raise ValueError(f"BatchedLBFGS: history_size cannot change after the first step "
                             f"(the history holds {st['sy'].shape[1]} slots, "
                             f"param_groups[0] asks for {hp.history_size})")
        if "sy" in st and st["sy"].dtype not in self._history_dtypes(hp):
            raise ValueError(f"BatchedLBFGS: history_dtype cannot change after the first step "
                             f"(the history is stored in {st['sy'].dtype}, param_groups[0] "
                             f"asks for {hp.history_dtype})")
        return hp

    def _history_dtype(self, hp: Hyperparameters) -> torch.dtype:
        return resolve_dtype(hp.history_dtype, self._params[0].dtype, self.n_cells,
                             hp.history_size, self.n_params)

    def _history_dtypes(self, hp: Hyperparameters) -> Tuple[torch.dtype, ...]:
        """The dtypes a history of this ``history_dtype`` may be stored in: its final one,
        and with ``"auto"`` also the parameters' (before it is full)."""
        start = initial_dtype(hp.history_dtype, self._params[0].dtype, self.n_cells,
                              hp.history_size, self.n_params)
        return tuple({start, self._history_dtype(hp)})

    def _evaluate(self, closure: Callable):
        with torch.enable_grad():
            loss = closure()
        if not torch.is_tensor(loss):
            raise TypeError("BatchedLBFGS: the closure must return a tensor")
        loss = loss.detach()
        if loss.dim() == 0:
            separable = False
        elif loss.shape == (self.n_cells,):
            separable = True
        else:
            raise ValueError(f"BatchedLBFGS: the closure returned shape {tuple(loss.shape)}; "
                             f"expected [{self.n_cells}] (independent cells) or a scalar")
        return loss, self._gather_flat_grad(), separable

    def new_objective(self, keep_history: bool = True) -> None:
        """Say that the closure now computes another objective (e.g. a new batch of samples
        drawn from the same distribution). The next :meth:`step` first evaluates the new
        objective at the current point, then every cell starts a new line search from
        there (converged cells become active again). ``keep_history=True`` keeps the
        curvature pairs (each measured within one batch; see
        :func:`restart_on_new_objective`); ``False`` drops them, as a new optimiser would.
        Before the first step it does nothing. Not part of ``state_dict`` (call it again
        after a resume if the objective changes then)."""
        if self.state[self._params[0]]:
            self._new_objective = bool(keep_history)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable) -> torch.Tensor:
        """Run ``max_eval`` closure evaluations; return the loss at the accepted points
        (``[n_cells]`` or scalar). The parameters are left at the accepted points."""
        if closure is None:
            raise ValueError("BatchedLBFGS.step needs a closure")
        hp = self._hyperparameters()
        key = self._params[0]
        if not self.state[key]:
            loss, grad, separable = self._evaluate(closure)
            st = init_state(loss, grad, self._gather_flat_params(), separable, hp, self._work)
            self.state[key] = st.to_dict()
            budget = hp.max_eval - 1
        elif self._new_objective is not None:
            st = LBFGSState.from_dict(self.state[key])
            self._set_flat_params(st.x0)
            loss, grad, separable = self._evaluate(closure)
            if separable != st.separable:
                raise ValueError("BatchedLBFGS: the new objective must be separable (or "
                                 "coupled) like the old one")
            restart_on_new_objective(st, loss, grad, hp, self._new_objective, self._work)
            self._new_objective = None
            self.state[key] = st.to_dict()
            budget = hp.max_eval - 1
        else:
            st = LBFGSState.from_dict(self.state[key])
            apply_lr(st, hp.lr)
            budget = hp.max_eval
        for _ in range(budget):
            self._set_flat_params(trial_point(st))
            loss, grad, _ = self._evaluate(closure)
            iterate(st, loss, grad, hp, self._work)
            self.state[key] = st.to_dict()
        self._set_flat_params(st.x0)
        return st.f0.clone()

    # ------------------------------------------------------------------ reporting
    def status(self) -> Dict[str, torch.Tensor]:
        """Per-cell ``status`` (0 active, 1 converged, 2 failed), ``n_evals``, ``n_iters``
        (``{}`` before the first step)."""
        st = self.state[self._params[0]]
        if not st:
            return {}
        return {k: st[k].clone() for k in ("status", "n_evals", "n_iters")}

    def state_dict(self) -> Dict[str, Any]:
        """``{"state": {0: state} or {}, "param_groups": [group]}`` (cloned tensors)."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._params)))
        st = self.state[self._params[0]]
        # the blocked copy of a reduced-precision history is derived data: from_dict rebuilds it
        state = {0: _tree_map(torch.clone, {k: v for k, v in st.items() if k != "syb"})} \
            if st else {}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also the layout before ``param_groups``:
        ``{"state": {...}, "defaults": {...}}``). ``ValueError`` if it does not fit."""
        sd = _upgrade_legacy(state_dict, len(self._params))
        if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
            raise ValueError("BatchedLBFGS: a state_dict needs 'state' and 'param_groups'")
        groups = sd["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"BatchedLBFGS: the state_dict has {len(groups)} parameter "
                             f"groups; this optimizer has 1")
        saved = groups[0]
        n_saved = len(saved.get("params", []))
        if n_saved != len(self._params):
            raise ValueError(f"BatchedLBFGS: the state_dict is for {n_saved} parameter "
                             f"tensors; this optimizer has {len(self._params)}")
        hp = check_hyperparameters(saved)
        m_here = self.param_groups[0]["history_size"]
        if hp.history_size != m_here:
            raise ValueError(f"BatchedLBFGS: the state_dict has history_size "
                             f"{hp.history_size}; this optimizer has {m_here}")
        state = sd["state"]
        if len(state) > 1 or (state and 0 not in state):
            raise ValueError("BatchedLBFGS: the state_dict's state must be {} or {0: {...}}")
        new = None
        if state:
            dev, dtype = self._params[0].device, self._params[0].dtype
            st = LBFGSState.from_dict(_tree_map(lambda t: t.to(dev), state[0]))
            n, p = st.x0.shape
            if n != self.n_cells:
                raise ValueError(f"BatchedLBFGS: the state_dict is for {n} cells; this "
                                 f"optimizer has {self.n_cells}")
            if p != self.n_params:
                raise ValueError(f"BatchedLBFGS: the state_dict is for {p} parameters per "
                                 f"cell; this optimizer has {self.n_params}")
            if st.history_size != hp.history_size:
                raise ValueError(f"BatchedLBFGS: the state_dict's history holds "
                                 f"{st.history_size} slots; history_size is {hp.history_size}")
            if st.x0.dtype != dtype:
                raise ValueError(f"BatchedLBFGS: the state_dict is in {st.x0.dtype}; the "
                                 f"parameters are {dtype}")
            if st.sy.dtype not in self._history_dtypes(hp):
                raise ValueError(f"BatchedLBFGS: the state_dict's history is stored in "
                                 f"{st.sy.dtype}; its history_dtype says {hp.history_dtype}")
            new = st.to_dict()
        group = self.param_groups[0]
        group.update({k: v for k, v in saved.items() if k != "params"})
        group.update(hp._asdict())
        self.state.clear()
        if new is not None:
            self.state[self._params[0]] = new


def _upgrade_legacy(sd: Any, n_tensors: int) -> Any:
    """The layout written before this optimizer followed ``torch.optim``:
    ``{"state": {flat state}, "defaults": {hyperparameters}}`` -> the current layout. It did
    not record the number of parameter tensors (``n_tensors`` is assumed); the cell and
    parameter counts are still checked against the saved tensors."""
    if not isinstance(sd, Mapping) or "param_groups" in sd or "defaults" not in sd:
        return sd
    old = dict(sd["state"])
    group = dict(sd["defaults"], params=list(range(n_tensors)))
    if old and isinstance(old.get("ls"), Mapping) and "t" in old["ls"]:
        # each search's unit first trial: the saved trial over lr (exact for the usual lr = 1;
        # used only by searches that have not begun)
        old.setdefault("t_unit", old["ls"]["t"] / float(group.get("lr", 1.0)))
    return {"state": {0: old} if old else {}, "param_groups": [group]}
