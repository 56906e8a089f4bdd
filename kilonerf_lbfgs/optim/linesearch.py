"""Vectorised line searches: one independent line search per entry of a batch.

Each call of :func:`line_search_update` consumes one trial (``f(t)``, ``f'(t)``) for every
line and says, per line, whether the trial is accepted and, if not, which step to try next.
No Python branching on values and no host synchronisation, so thousands of cells can each
run their own search inside the same closure evaluations.

Modes:
    ``"strong_wolfe"``: sufficient decrease and ``|f'(t)| <= c2 |f'(0)|``, with bracketing and
        safeguarded cubic interpolation (Nocedal & Wright, Alg. 3.5/3.6).
    ``"armijo"``: sufficient decrease only; backtracking by safeguarded cubic interpolation.
    ``"none"``: any finite trial is accepted; a non-finite one halves the step.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

LINE_SEARCHES = ("strong_wolfe", "armijo", "none")


class LineSearchState(NamedTuple):
    """One line search per entry of a batch of ``L`` lines (``L = n_cells`` for separable
    losses, ``L = 1`` for a coupled one). Every field is ``[L]`` float64 except ``trials``.

    Attributes:
        t: the step length of the next trial (of the accepted one, where a trial was accepted).
        lo_t, lo_f, lo_gtd: step, value and slope of the best point seen so far
            (``t = 0`` at the start).
        hi_t, hi_f, hi_gtd: the other end of the bracket; ``inf`` before a bracket exists.
        trials: ``[L]`` long, trials consumed by this search.
    """
    t: torch.Tensor
    lo_t: torch.Tensor
    lo_f: torch.Tensor
    lo_gtd: torch.Tensor
    hi_t: torch.Tensor
    hi_f: torch.Tensor
    hi_gtd: torch.Tensor
    trials: torch.Tensor

    def where(self, cond: torch.Tensor, other: "LineSearchState") -> "LineSearchState":
        """Fieldwise ``cond ? self : other`` with ``cond [L]`` bool."""
        return LineSearchState(*(torch.where(cond, a, b) for a, b in zip(self, other)))


def cubic_minimizer(t1, f1, g1, t2, f2, g2):
    """Minimiser of the cubic through ``(t1, f1, g1)`` and ``(t2, f2, g2)``, clamped to the
    interval between ``t1`` and ``t2``; the midpoint where the cubic has no minimiser or any
    input is not finite. All arguments ``[L]`` float64."""
    lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (t1 - t2)
    d2_sq = d1 * d1 - g1 * g2
    d2 = torch.sqrt(d2_sq.clamp(min=0.0))
    left = t2 - (t2 - t1) * (g2 + d2 - d1) / (g2 - g1 + 2.0 * d2)   # t1 <= t2
    right = t1 - (t1 - t2) * (g1 + d2 - d1) / (g1 - g2 + 2.0 * d2)  # t1 > t2
    t = torch.where(t1 <= t2, left, right)
    ok = (d2_sq >= 0) & torch.isfinite(t)
    return torch.where(ok, t.clamp(lo, hi), 0.5 * (lo + hi))


def new_line_state(f0: torch.Tensor, gtd0: torch.Tensor, t0: torch.Tensor) -> LineSearchState:
    """Fresh search state for lines with value ``f0 [L]`` and slope ``gtd0 [L]`` at ``t = 0``,
    first trial at ``t0 [L]``. Everything float64 ``[L]`` except ``trials`` (long)."""
    inf = torch.full_like(f0, float("inf"))
    return LineSearchState(t=t0.clone(), lo_t=torch.zeros_like(f0), lo_f=f0.clone(),
                           lo_gtd=gtd0.clone(), hi_t=inf, hi_f=inf.clone(), hi_gtd=inf.clone(),
                           trials=torch.zeros_like(f0, dtype=torch.long))


def line_search_update(ls: LineSearchState, f: torch.Tensor, gtd: torch.Tensor,
                       f0: torch.Tensor, gtd0: torch.Tensor, mode: str = "strong_wolfe",
                       c1: float = 1e-4, c2: float = 0.9, extrapolation: float = 4.0
                       ) -> Tuple[torch.Tensor, torch.Tensor, LineSearchState]:
    """Consume the trial at ``ls.t`` with value ``f [L]`` and slope ``gtd [L]``.

    Non-finite ``f`` or ``gtd`` counts as a failed sufficient-decrease test.

    Args:
        ls: the searches' state (see :class:`LineSearchState`).
        f, gtd: ``[L]`` float64, value and directional derivative at the trial ``ls.t``.
        f0, gtd0: ``[L]`` float64, value and directional derivative at ``t = 0``.
        mode: one of :data:`LINE_SEARCHES`.
        c1, c2: sufficient-decrease and curvature constants, ``0 < c1 < c2 < 1``.
        extrapolation: factor by which the step grows before a bracket exists.
    Returns:
        accept: ``[L]`` bool, the trial at ``ls.t`` satisfies the conditions.
        lo_moved: ``[L]`` bool, the best point so far became this trial (keep its gradient).
        ls: the updated state; its ``t`` is the next trial (meaningful where not accepted).
    """
    t = ls.t
    finite = torch.isfinite(f) & torch.isfinite(gtd)
    if mode == "none":
        armijo = finite
        curvature = torch.ones_like(finite)
        worse = ~finite
    else:
        armijo = finite & (f <= f0 + c1 * t * gtd0)
        worse = ~armijo | (f >= ls.lo_f)
        if mode == "strong_wolfe":
            curvature = gtd.abs() <= -c2 * gtd0
        elif mode == "armijo":
            curvature = torch.ones_like(finite)
        else:
            raise ValueError(f"unknown line search {mode!r}; choose one of {LINE_SEARCHES}")
    accept = ~worse & curvature
    lo_moved = ~worse & ~curvature
    f_safe = torch.where(finite, f, torch.full_like(f, float("inf")))
    gtd_safe = torch.where(finite, gtd, torch.full_like(gtd, float("inf")))

    # bracket bookkeeping (Nocedal & Wright's zoom rules)
    flip = lo_moved & (gtd * (ls.hi_t - ls.lo_t) >= 0)
    hi_t = torch.where(worse, t, torch.where(flip, ls.lo_t, ls.hi_t))
    hi_f = torch.where(worse, f_safe, torch.where(flip, ls.lo_f, ls.hi_f))
    hi_gtd = torch.where(worse, gtd_safe, torch.where(flip, ls.lo_gtd, ls.hi_gtd))
    lo_t = torch.where(lo_moved, t, ls.lo_t)
    lo_f = torch.where(lo_moved, f, ls.lo_f)
    lo_gtd = torch.where(lo_moved, gtd, ls.lo_gtd)

    # next trial: interpolate inside a bracket, extrapolate before one exists
    bracketed = torch.isfinite(hi_t)
    if mode == "none":
        t_next = torch.where(worse, 0.5 * t, t)
    else:
        t_int = cubic_minimizer(lo_t, lo_f, lo_gtd, hi_t, hi_f, hi_gtd)
        width = (hi_t - lo_t).abs()
        left = torch.minimum(lo_t, hi_t) + 0.1 * width
        right = torch.maximum(lo_t, hi_t) - 0.1 * width
        t_int = torch.minimum(torch.maximum(t_int, left), right)
        t_next = torch.where(bracketed, t_int, extrapolation * lo_t)
    out = LineSearchState(t=torch.where(accept, t, t_next), lo_t=lo_t, lo_f=lo_f,
                          lo_gtd=lo_gtd, hi_t=hi_t, hi_f=hi_f, hi_gtd=hi_gtd,
                          trials=ls.trials + 1)
    return accept, lo_moved, out
