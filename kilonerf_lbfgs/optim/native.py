"""BatchedLBFGS's history work per evaluation as one C kernel per cell (CPU).

After the line-search trial, the torch path (:mod:`.lbfgs`) makes two passes over every
cell's history, the projection ``[S;Y]^T g`` and the combination ``coef . [S;Y]``, with the
Gram update and the compact coefficients between them as batched operations over all cells.
When the histories outgrow the CPU's last-level cache (57 MB in bfloat16 at 64 cells x 2241
parameters x 100 pairs) each pass streams them from memory and evicts the Gram matrices on
the way. :func:`cell_step` does the same arithmetic cell by cell instead (``lbfgs_cell.c``):
projection, pair write, Gram update, coefficients and combination back to back, so a cell's
pairs come from memory once and everything else stays in the cache. Cells are split between
``torch.get_num_threads()`` threads of PyTorch's own OpenMP pool (``ctypes`` releases the GIL
during the call).

It serves float32 parameters on the CPU with a float32 or bfloat16 history
(:func:`serves`); the C file is built at first use (:func:`~kilonerf_lbfgs.backends.native_library`;
``KILONERF_NATIVE=0`` turns it off). The torch path stays the reference twin and the path
for every other case; ``tests/test_native.py`` compares the two.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Tuple

import torch

from ..backends import native_library

SOURCE = Path(__file__).with_name("lbfgs_cell.c")
_KERNELS = {torch.bfloat16: "lbfgs_cells_bf16", torch.float32: "lbfgs_cells_f32"}


class CellArgs(ctypes.Structure):
    """The C ``CellArgs`` (see ``lbfgs_cell.c`` for shapes): sizes and data pointers."""
    _fields_ = [(name, ctypes.c_int64) for name in ("n", "m", "p", "slots_used")] + [
        (name, ctypes.c_void_p) for name in (
            "sy", "hs", "hy", "g", "sty", "yty", "valid", "ptr", "gamma", "proj0", "dgamma",
            "dcoef", "t_acc", "pair_sy", "pair_yy", "accept", "keep", "renew", "proj", "coef",
            "d")]


@functools.lru_cache(maxsize=None)
def _kernel(storage: torch.dtype):
    lib = native_library(str(SOURCE))
    if lib is None:
        return None
    fn = getattr(lib, _KERNELS[storage])
    fn.argtypes = (ctypes.POINTER(CellArgs), ctypes.c_int64)
    fn.restype = None
    return fn


def serves(device: torch.device, param_dtype: torch.dtype, storage: torch.dtype) -> bool:
    """Whether :func:`cell_step` runs histories of ``storage`` dtype for ``param_dtype``
    parameters on ``device`` (builds the kernel on first call)."""
    return (torch.device(device).type == "cpu" and param_dtype == torch.float32
            and storage in _KERNELS and _kernel(storage) is not None)


def cpu_path() -> str:
    """Which path BatchedLBFGS takes on the CPU with float32 parameters: ``"native"`` or
    ``"torch"`` (the benchmarks record it beside their timings)."""
    return "native" if serves(torch.device("cpu"), torch.float32, torch.float32) else "torch"


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def cell_step(st, stored: Tuple[torch.Tensor, torch.Tensor], pair_sy: torch.Tensor,
              pair_yy: torch.Tensor, keep: torch.Tensor, accept: torch.Tensor,
              renew: torch.Tensor, t_acc: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One evaluation's history work of every cell, updating ``st`` in place.

    Args:
        st: the :class:`~.lbfgs.LBFGSState`, with ``g0`` the gradient each cell now stands
            at (the new one where the step was accepted) and the old direction's ``proj0``,
            ``dgamma``, ``dcoef``; ``valid`` and ``gamma`` already reset for cells that restart.
        stored: the new pair ``(s, y)`` ``[n, p]`` each in the history's dtype.
        pair_sy, pair_yy: ``[n]`` float64, ``s.y`` and ``y.y`` of the stored pair.
        keep: ``[n]`` bool, cells whose pair enters the history (slot ``ptr``).
        accept: ``[n]`` bool, cells that moved (their projection is recomputed).
        renew: ``[n]`` bool, cells that take a new direction.
        t_acc: ``[n]`` float64, the accepted step lengths.
    Updates ``st.sy``, ``sty``, ``yty``, ``valid``, ``ptr``, ``gamma`` (not ``slots_used``).
    Returns:
        proj ``[n, 2m]`` float64, ``[S;Y]^T g0`` after the write (``proj0`` where not
        accepted); coef ``[n, 2m]`` float64 and d ``[n, p]`` (the parameters' dtype),
        ``d = -(gamma g0 + coef . [S;Y])``, for the cells in ``renew`` (zero elsewhere).
    """
    n, m, _, p = st.sy.shape
    f64 = dict(dtype=torch.float64, device=st.sy.device)
    c = lambda t, dt=None: (t if dt is None else t.to(dt)).contiguous()  # noqa: E731
    st.valid, st.ptr, st.gamma = c(st.valid), c(st.ptr), c(st.gamma)
    hold = dict(hs=c(stored[0]), hy=c(stored[1]), g=c(st.g0), proj0=c(st.proj0),
                dgamma=c(st.dgamma), dcoef=c(st.dcoef), t_acc=c(t_acc, torch.float64),
                pair_sy=c(pair_sy, torch.float64), pair_yy=c(pair_yy, torch.float64),
                accept=c(accept), keep=c(keep), renew=c(renew),
                proj=torch.empty(n, 2 * m, **f64), coef=torch.empty(n, 2 * m, **f64),
                d=torch.empty(n, p, dtype=st.g0.dtype, device=st.sy.device))
    for name in ("sy", "sty", "yty"):              # written in place through their pointers
        if not getattr(st, name).is_contiguous():
            setattr(st, name, getattr(st, name).contiguous())
    sy = st.sy
    args = CellArgs(n, m, p, st.slots_used, _ptr(sy), *(
        _ptr(t) for t in (hold["hs"], hold["hy"], hold["g"], st.sty, st.yty, st.valid, st.ptr,
                          st.gamma, hold["proj0"], hold["dgamma"], hold["dcoef"],
                          hold["t_acc"], hold["pair_sy"], hold["pair_yy"], hold["accept"],
                          hold["keep"], hold["renew"], hold["proj"], hold["coef"],
                          hold["d"])))
    _kernel(sy.dtype)(ctypes.byref(args), max(1, min(torch.get_num_threads(), n)))
    return hold["proj"], hold["coef"], hold["d"]
