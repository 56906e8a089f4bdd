"""BatchedLBFGS: one L-BFGS per cell, all cells in the same tensor operations.

Every parameter's dim 0 indexes the cell. The closure returns either

* a loss vector ``[n_cells]``: the cells are independent problems. Each cell keeps its own
  curvature history, runs its own line search and converges (or fails) on its own. Cells
  advance asynchronously: every closure evaluation is one line-search trial for every active
  cell, so a cell that must backtrack never makes the others wait, and N cells optimised
  together follow exactly the iterates of N separate runs.
* a scalar: the loss couples the cells (volume rendering). Curvature stays per cell
  (block-diagonal), the step length comes from one shared line search.

All state is fixed-shape tensors (ring buffers ``[n_cells, m, 2, p]`` for the ``s`` and ``y``
pairs, Gram matrices ``[n_cells, m, m]``); an iteration does no host synchronisation. A
non-finite trial is rejected for its cell (the step shrinks) and never enters the history.
A pair with non-positive curvature is skipped. When a cell's line search fails, its history
is dropped and it retries steepest descent; if that fails too the cell is frozen.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer

from .compact import chronological_order, compact_coefficients
from .linesearch import LINE_SEARCHES, line_search_update, new_line_state

ACTIVE, CONVERGED, FAILED = 0, 1, 2


def _project(sy: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
    """``[S^T v, Y^T v]`` over the first ``k`` slots: ``sy [n, m, 2, p]``, ``v [n, p]`` ->
    ``[n, 2m]`` float64 (zero beyond slot ``k``).

    Written as ``v^T [S;Y]^T`` because CPU ``bmm`` is several times faster in that layout.
    """
    n, m = sy.shape[:2]
    out = v.new_zeros(n, m, 2, dtype=torch.float64)
    if k > 0:
        flat = sy[:, :k].reshape(n, 2 * k, -1)
        out[:, :k] = torch.bmm(v[:, None, :], flat.transpose(1, 2))[:, 0].double() \
            .view(n, k, 2)
    return out.transpose(1, 2).reshape(n, 2 * m)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-cell dot products ``a [n, p] . b [n, p] -> [n]`` float64.

    One batched matrix product in the parameters' dtype: a single pass over both operands
    (an elementwise product in float64 costs ~12x more on CPU, and these run ~7 times per
    evaluation). The curvature projections in :func:`_project` accumulate the same way.
    """
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1).double()


def _combine(sy: torch.Tensor, coef: torch.Tensor, k: int) -> torch.Tensor:
    """``coef[:, :m] S + coef[:, m:] Y`` over the first ``k`` slots -> ``[n, p]``."""
    n, m = sy.shape[:2]
    if k == 0:
        return sy.new_zeros(n, sy.shape[-1])
    c = torch.stack([coef[:, :k], coef[:, m:m + k]], -1).reshape(n, 1, 2 * k).to(sy.dtype)
    return torch.bmm(c, sy[:, :k].reshape(n, 2 * k, -1))[:, 0]


class BatchedLBFGS(Optimizer):
    """Per-cell L-BFGS in the ``torch.optim`` style.

    Args:
        params: parameters whose dim 0 is the cell index (all the same size there).
        lr: first trial step of each line search (1 is right for quasi-Newton steps).
        history_size: pairs kept per cell (``m``); memory ``n_cells * 2m * p * 4`` bytes in fp32.
        max_eval: closure evaluations per :meth:`step` call.
        line_search: ``"strong_wolfe"`` (default), ``"armijo"`` or ``None`` (fixed step ``lr``).
        tolerance_grad: a cell whose gradient max-norm falls to this is converged.
        tolerance_change: a cell whose accepted step changes no parameter by more than this is
            converged.
        max_ls: trials per line search before it gives up.
        c1, c2: the sufficient-decrease and curvature constants.
        curvature_eps: a pair is kept only if ``s.y > curvature_eps * y.y``.
    """

    def __init__(self, params, lr: float = 1.0, history_size: int = 100, max_eval: int = 20,
                 line_search: Optional[str] = "strong_wolfe", tolerance_grad: float = 1e-12,
                 tolerance_change: float = 1e-12, max_ls: int = 25, c1: float = 1e-4,
                 c2: float = 0.9, curvature_eps: float = 1e-10):
        mode = "none" if line_search is None else line_search
        if mode not in LINE_SEARCHES:
            raise ValueError(f"line_search must be one of 'strong_wolfe', 'armijo' or None, "
                             f"got {line_search!r}")
        if int(history_size) < 1 or int(max_eval) < 1 or lr <= 0:
            raise ValueError("BatchedLBFGS: history_size, max_eval and lr must be positive")
        defaults = dict(lr=lr, history_size=int(history_size), max_eval=int(max_eval),
                        line_search=mode, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, max_ls=int(max_ls), c1=c1, c2=c2,
                        curvature_eps=curvature_eps)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("BatchedLBFGS supports a single parameter group")
        self._params: List[torch.Tensor] = self.param_groups[0]["params"]
        if not self._params or any(p.dim() == 0 for p in self._params):
            raise ValueError("BatchedLBFGS: every parameter needs a dim 0 (the cell index)")
        sizes = {p.shape[0] for p in self._params}
        if len(sizes) != 1:
            raise ValueError("BatchedLBFGS: every parameter needs the same dim 0 (the cell index)")
        self.n_cells = sizes.pop()
        self._numels = [p[0].numel() for p in self._params]
        self.n_params = sum(self._numels)
        self._work: Dict[str, torch.Tensor] = {}   # scratch buffers, not part of the state

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
    @property
    def _st(self) -> Dict[str, torch.Tensor]:
        return self.state[self._params[0]]

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

    def _line_values(self, loss: torch.Tensor, per_cell: torch.Tensor, separable: bool):
        """Per-line loss and per-line sum of a per-cell quantity."""
        if separable:
            return loss.double(), per_cell
        return loss.double().reshape(1), per_cell.sum().reshape(1)

    def _init_state(self, loss, grad, separable) -> None:
        n, p, m = self.n_cells, self.n_params, self.defaults["history_size"]
        dev, dt = grad.device, grad.dtype
        f64 = dict(device=dev, dtype=torch.float64)
        st = self.state[self._params[0]]
        st.update({
            "separable": bool(separable),
            "sy": torch.zeros(n, m, 2, p, device=dev, dtype=dt),
            "slots_used": 0,
            "sty": torch.zeros(n, m, m, **f64), "yty": torch.zeros(n, m, m, **f64),
            "valid": torch.zeros(n, m, dtype=torch.bool, device=dev),
            "ptr": torch.zeros(n, dtype=torch.long, device=dev),
            "gamma": torch.ones(n, **f64),
            "x0": self._gather_flat_params(), "g0": grad, "lo_g": grad.clone(),
            "f0": loss.clone(),
            "status": torch.full((n,), ACTIVE, dtype=torch.long, device=dev),
            "n_evals": torch.ones(n, dtype=torch.long, device=dev),
            "n_iters": torch.zeros(n, dtype=torch.long, device=dev),
        })
        # a cell that starts at a stationary point is converged, not failed
        stationary = grad.abs().amax(1) <= self.defaults["tolerance_grad"]
        if not separable:  # a coupled problem converges as a whole
            stationary = stationary.all().expand(n)
        st["status"] = torch.where(stationary, torch.full_like(st["status"], CONVERGED),
                                   st["status"])
        proj = torch.zeros(n, 2 * m, **f64)
        self._new_direction(grad, proj, reset=torch.zeros(n, dtype=torch.bool, device=dev))

    def _new_direction(self, grad: torch.Tensor, proj: torch.Tensor, reset: torch.Tensor,
                       where: Optional[torch.Tensor] = None) -> None:
        """Set ``d``, ``gtd0``, ``proj0`` and a fresh line search for the cells in ``where``
        (all cells if None) from their gradient ``grad [n, p]`` and ``proj = [S;Y] grad``."""
        st, g = self._st, self.defaults
        separable = st["separable"]
        valid = st["valid"] & ~reset[:, None]
        st["valid"] = valid
        st["gamma"] = torch.where(reset, torch.ones_like(st["gamma"]), st["gamma"])
        order = chronological_order(st["ptr"], g["history_size"])
        coef = compact_coefficients(proj, st["sty"], st["yty"], st["gamma"], valid, order,
                                    self._work)
        d = -(st["gamma"].to(grad.dtype)[:, None] * grad
              + _combine(st["sy"], coef, st["slots_used"]))
        gtd_cell = _dot(grad, d)
        # not a descent direction (rounding, bad pairs): drop the history, use -grad
        bad = ~(gtd_cell < 0) | ~torch.isfinite(gtd_cell)
        if where is not None:
            bad = bad & where
        d = torch.where(bad[:, None], -grad, d)
        st["valid"] = valid & ~bad[:, None]
        # d = -(dgamma * grad + dcoef . [S;Y]): kept to get s^T Y without a pass over Y
        dgamma = torch.where(bad, torch.ones_like(st["gamma"]), st["gamma"])
        dcoef = torch.where(bad[:, None], torch.zeros_like(coef), coef)
        gtd_cell = _dot(grad, d)
        f0_line, gtd0 = self._line_values(st["f0"], gtd_cell, separable)
        # no history (first step, or after a reset): scale the step to at most lr in l1 norm
        gnorm1 = grad.abs().sum(1).double()
        if not separable:
            gnorm1 = gnorm1.sum().reshape(1)
        no_hist_line = ~st["valid"].any(1)
        if not separable:
            no_hist_line = no_hist_line.all().reshape(1)
        t0 = torch.full_like(gtd0, g["lr"])
        t0 = torch.where(no_hist_line,
                         t0 * torch.clamp(1.0 / gnorm1.clamp(min=1e-300), max=1.0), t0)
        fresh = new_line_state(f0_line, gtd0, t0)
        if where is None:
            st.update({"d": d, "gtd0": gtd0, "proj0": proj, "dgamma": dgamma, "dcoef": dcoef})
            st["ls"] = fresh
        else:
            w_line = where if separable else where.any().reshape(1)
            st["d"] = torch.where(where[:, None], d, st["d"])
            st["proj0"] = torch.where(where[:, None], proj, st["proj0"])
            st["dgamma"] = torch.where(where, dgamma, st["dgamma"])
            st["dcoef"] = torch.where(where[:, None], dcoef, st["dcoef"])
            st["gtd0"] = torch.where(w_line, gtd0, st["gtd0"])
            st["ls"] = {k: torch.where(w_line, fresh[k], v) for k, v in st["ls"].items()}

    def _cell_of_line(self, line_vals: torch.Tensor) -> torch.Tensor:
        return line_vals if self._st["separable"] else line_vals.expand(self.n_cells)

    @torch.no_grad()
    def _trial_params(self) -> torch.Tensor:
        st = self._st
        t = self._cell_of_line(st["ls"]["t"])
        t = torch.where(st["status"] == ACTIVE, t, torch.zeros_like(t))
        return st["x0"] + t.to(st["x0"].dtype)[:, None] * st["d"]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable) -> torch.Tensor:
        """Run ``max_eval`` closure evaluations; return the loss at the accepted points
        (``[n_cells]`` or scalar). The parameters are left at the accepted points."""
        if closure is None:
            raise ValueError("BatchedLBFGS.step needs a closure")
        g = self.defaults
        m = g["history_size"]
        if "x0" not in self._st:
            loss, grad, separable = self._evaluate(closure)
            self._init_state(loss, grad, separable)
            budget = g["max_eval"] - 1
        else:
            budget = g["max_eval"]
        st = self._st
        separable = st["separable"]
        n = self.n_cells
        rows = torch.arange(n, device=st["x0"].device)
        for _ in range(budget):
            x_trial = self._trial_params()
            self._set_flat_params(x_trial)
            loss, grad, _ = self._evaluate(closure)
            active = st["status"] == ACTIVE
            st["n_evals"] += active.long()
            gtd_cell = _dot(grad, st["d"])
            f_line, gtd_line = self._line_values(loss, gtd_cell, separable)
            if separable:  # non-finite gradient in a cell makes its trial fail
                gtd_line = torch.where(torch.isfinite(grad).all(1), gtd_line,
                                       torch.full_like(gtd_line, float("nan")))
            else:
                gtd_line = torch.where(torch.isfinite(grad).all(), gtd_line,
                                       torch.full_like(gtd_line, float("nan")))
            ls_old = st["ls"]
            accept_l, lo_moved_l, ls = line_search_update(
                ls_old, f_line, gtd_line, self._line_values(st["f0"], gtd_cell, separable)[0],
                st["gtd0"], g["line_search"], g["c1"], g["c2"])
            # give up: too many trials or a bracket too narrow to matter
            dmax = st["d"].abs().amax(1).double()
            dmax_line = dmax if separable else dmax.max().reshape(1)
            narrow = torch.isfinite(ls["hi_t"]) & \
                ((ls["hi_t"] - ls["lo_t"]).abs() * dmax_line < 1e-3 * g["tolerance_change"])
            give_up = ~accept_l & ((ls["trials"] >= g["max_ls"]) | narrow)
            fallback_l = give_up & (ls["lo_t"] > 0)           # accept the best point seen
            failed_l = give_up & ~fallback_l
            accept = self._cell_of_line(accept_l | fallback_l) & active
            fallback = self._cell_of_line(fallback_l)
            failed = self._cell_of_line(failed_l) & active
            lo_moved = self._cell_of_line(lo_moved_l)
            st["lo_g"] = torch.where(lo_moved[:, None], grad, st["lo_g"])
            st["ls"] = ls

            # ---- accepted cells: new point, curvature pair, new direction
            t_acc = self._cell_of_line(torch.where(fallback_l, ls["lo_t"], ls_old["t"]))
            g_new = torch.where(fallback[:, None], st["lo_g"], grad)
            if separable:
                f_new = torch.where(fallback_l, ls["lo_f"].to(loss.dtype), loss)
            else:
                f_new = torch.where(fallback_l[0], ls["lo_f"][0].to(loss.dtype), loss)
            s = t_acc.to(grad.dtype)[:, None] * st["d"]
            x_new = st["x0"] + s
            y = g_new - st["g0"]
            sy = _dot(s, y)
            yy = _dot(y, y)
            keep = accept & (sy > g["curvature_eps"] * yy) & (yy > 0) & \
                torch.isfinite(sy) & torch.isfinite(yy)
            proj_new = _project(st["sy"], g_new, st["slots_used"])              # [S;Y]_old g
            sty_col = proj_new[:, :m] - st["proj0"][:, :m]                       # S_old^T y
            yty_col = proj_new[:, m:] - st["proj0"][:, m:]                       # Y_old^T y
            j = st["ptr"]
            kj = keep[:, None]
            st["sy"][rows, j, 0] = torch.where(kj, s, st["sy"][rows, j, 0])
            st["sy"][rows, j, 1] = torch.where(kj, y, st["sy"][rows, j, 1])
            # slots are written in order from 0, at most one per evaluation
            st["slots_used"] = min(m, st["slots_used"] + 1)
            # s^T Y_old from the Gram matrices: s = -t (dgamma g0 + dcoef . [S;Y])
            dc = st["dcoef"]
            sty_row = -t_acc.double()[:, None] * (
                st["dgamma"][:, None] * st["proj0"][:, m:]
                + torch.bmm(dc[:, None, :m], st["sty"])[:, 0]
                + torch.bmm(dc[:, None, m:], st["yty"])[:, 0])
            onehot = torch.nn.functional.one_hot(j, m).bool()
            sty_row = torch.where(onehot, sy[:, None], sty_row)                  # s^T Y_new
            sty_col = torch.where(onehot, sy[:, None], sty_col)
            yty_col = torch.where(onehot, yy[:, None], yty_col)
            sty, yty = st["sty"], st["yty"]
            sty[rows, :, j] = torch.where(kj, sty_col, sty[rows, :, j])
            sty[rows, j, :] = torch.where(kj, sty_row, sty[rows, j, :])
            yty[rows, :, j] = torch.where(kj, yty_col, yty[rows, :, j])
            yty[rows, j, :] = torch.where(kj, yty_col, yty[rows, j, :])
            st["valid"][rows, j] = st["valid"][rows, j] | keep
            st["ptr"] = torch.where(keep, (j + 1) % m, j)
            st["gamma"] = torch.where(keep, sy / yy.clamp(min=1e-300), st["gamma"])
            # [S;Y]_new g: patch the rewritten slot
            sg = _dot(s, g_new)
            yg = _dot(y, g_new)
            proj_new[rows, j] = torch.where(keep, sg, proj_new[rows, j])
            proj_new[rows, m + j] = torch.where(keep, yg, proj_new[rows, m + j])

            # convergence of accepted cells
            gmax = g_new.abs().amax(1)
            smax = s.abs().amax(1)
            converged = accept & ((gmax <= g["tolerance_grad"]) |
                                  (smax <= g["tolerance_change"]))
            if not separable:  # a coupled problem converges as a whole
                converged = converged.all().expand(n) & accept
            # failed search: retry from steepest descent once, freeze if it had no history
            had_history = st["valid"].any(1)
            frozen_fail = failed & ~had_history
            retry = failed & had_history
            st["status"] = torch.where(converged, torch.full_like(st["status"], CONVERGED),
                                       st["status"])
            st["status"] = torch.where(frozen_fail, torch.full_like(st["status"], FAILED),
                                       st["status"])
            st["n_iters"] += accept.long()
            st["x0"] = torch.where(accept[:, None], x_new, st["x0"])
            st["g0"] = torch.where(accept[:, None], g_new, st["g0"])
            st["lo_g"] = torch.where(accept[:, None], g_new, st["lo_g"])
            st["f0"] = torch.where(accept, f_new, st["f0"]) if separable else \
                torch.where(accept.any(), f_new, st["f0"])
            renew = (accept | retry) & (st["status"] == ACTIVE)
            self._new_direction(st["g0"], torch.where(accept[:, None], proj_new, st["proj0"]),
                                reset=retry, where=renew)
        self._set_flat_params(st["x0"])
        return st["f0"].clone()

    # ------------------------------------------------------------------ reporting
    def status(self) -> Dict[str, torch.Tensor]:
        """Per-cell ``status`` (0 active, 1 converged, 2 failed), ``n_evals``, ``n_iters``."""
        st = self._st
        if "x0" not in st:
            return {}
        return {k: st[k].clone() for k in ("status", "n_evals", "n_iters")}

    def state_dict(self):
        st = {k: ({kk: vv.clone() for kk, vv in v.items()} if isinstance(v, dict)
                  else v.clone() if torch.is_tensor(v) else v)
              for k, v in self._st.items()}
        return {"state": st, "defaults": dict(self.defaults)}

    def load_state_dict(self, state_dict) -> None:
        dev = self._params[0].device
        st = {}
        for k, v in state_dict["state"].items():
            st[k] = ({kk: vv.to(dev) for kk, vv in v.items()} if isinstance(v, dict)
                     else v.to(dev) if torch.is_tensor(v) else v)
        self.state[self._params[0]] = st
        self.defaults.update(state_dict.get("defaults", {}))
        self.param_groups[0].update(state_dict.get("defaults", {}))
