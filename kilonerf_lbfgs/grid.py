"""A regular grid of cells over an axis-aligned box, in any dimension.

Every signal (image, audio, video, shape, radiance field) is cut into cells by a
``CellGrid``; each cell owns one tiny network that sees the cell in its own local
coordinates ``[-1, 1]^d``.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

Number = Union[int, float]


def in_box(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` -> ``[...]`` bool: the point lies in the closed box ``[lo, hi]``
    (``lo``, ``hi``: ``[d]``). The one box test of the package."""
    return ((x >= lo) & (x <= hi)).all(dim=-1)


class CellGrid:
    """Regular grid of ``prod(resolution)`` cells covering the box ``[lo, hi]``.

    Cell ids are row-major over the axes in the given order (the last axis varies
    fastest), so for an image grid ``(rows, cols)`` cell ``r * cols + c``.

    Args:
        lo: lower corner, ``d`` numbers.
        hi: upper corner, ``d`` numbers (``hi > lo`` on every axis).
        resolution: cells per axis, ``d`` positive ints (an int means the same on every axis).
    """

    def __init__(self, lo: Sequence[Number], hi: Sequence[Number],
                 resolution: Union[int, Sequence[int]]):
        lo_t = torch.as_tensor(lo, dtype=torch.float64).flatten()
        hi_t = torch.as_tensor(hi, dtype=torch.float64).flatten()
        if lo_t.shape != hi_t.shape or lo_t.numel() == 0:
            raise ValueError("CellGrid: lo and hi must have the same non-zero length")
        d = lo_t.numel()
        if isinstance(resolution, int):
            resolution = [resolution] * d
        res = [int(r) for r in resolution]
        if len(res) != d:
            raise ValueError(f"CellGrid: resolution has {len(res)} entries, box has {d} dims")
        if any(r <= 0 for r in res):
            raise ValueError(f"CellGrid: resolution must be positive, got {res}")
        if not bool((hi_t > lo_t).all()):
            raise ValueError("CellGrid: hi must be greater than lo on every axis")
        self.lo, self.hi, self.resolution = lo_t, hi_t, tuple(res)
        self.dim = d
        self.n_cells = 1
        for r in res:
            self.n_cells *= r
        self.cell_size = (hi_t - lo_t) / torch.tensor(res, dtype=torch.float64)
        # strides for row-major ids (last axis fastest)
        strides = [1] * d
        for a in range(d - 2, -1, -1):
            strides[a] = strides[a + 1] * res[a + 1]
        self._strides = torch.tensor(strides, dtype=torch.long)

    def __repr__(self) -> str:
        return (f"CellGrid(lo={self.lo.tolist()}, hi={self.hi.tolist()}, "
                f"resolution={list(self.resolution)})")

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, d]`` -> ``[M]`` bool: the point lies in the closed box."""
        return in_box(x, self.lo.to(x), self.hi.to(x))

    def cell_index(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, d]`` -> per-axis integer cell coordinates ``[M, d]`` (long).

        Points on the upper face belong to the last cell; points outside the box get
        indices out of ``[0, res)`` (use :meth:`cell_of` to have them reported).
        """
        lo = self.lo.to(device=x.device, dtype=torch.float64)
        size = self.cell_size.to(device=x.device)
        res = torch.tensor(self.resolution, device=x.device)
        x64 = x.to(torch.float64)
        idx = torch.floor((x64 - lo) / size).long()
        # inside the box (upper face included) rounding must never push a point out
        inside = (x64 >= lo) & (x64 <= self.hi.to(device=x.device))
        return torch.where(inside, torch.minimum(torch.maximum(idx, torch.zeros_like(idx)),
                                                 res - 1), idx)

    def cell_of(self, x: torch.Tensor, outside: str = "raise") -> torch.Tensor:
        """``x [M, d]`` -> cell id ``[M]`` (long).

        Points outside the box are never wrapped: with ``outside="raise"`` they raise a
        ``ValueError`` that counts them; with ``outside="mark"`` their id is ``-1``.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"CellGrid: points have {x.shape[-1]} dims, grid has {self.dim}")
        ijk = self.cell_index(x)
        res = torch.tensor(self.resolution, device=x.device)
        ok = ((ijk >= 0) & (ijk < res)).all(dim=-1)
        ids = (ijk.clamp(min=0) * self._strides.to(x.device)).sum(-1)
        if not bool(ok.all()):
            if outside == "raise":
                raise ValueError(f"CellGrid: {int((~ok).sum())} of {x.shape[0]} points lie "
                                 f"outside the box {self.lo.tolist()}..{self.hi.tolist()}")
            ids = torch.where(ok, ids, torch.full_like(ids, -1))
        return ids

    def cell_coords(self, cell: torch.Tensor) -> torch.Tensor:
        """cell id ``[M]`` -> per-axis integer coordinates ``[M, d]``."""
        res = torch.tensor(self.resolution, device=cell.device)
        return (cell[:, None] // self._strides.to(cell.device)) % res

    def cell_bounds(self, cell: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """cell id ``[M]`` -> (lower corner ``[M, d]``, upper corner ``[M, d]``), float64."""
        ijk = self.cell_coords(cell).to(torch.float64)
        size = self.cell_size.to(cell.device)
        lo = self.lo.to(cell.device) + ijk * size
        return lo, lo + size

    def to_local(self, x: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Points ``x [M, d]`` in cells ``cell [M]`` -> local coordinates ``[M, d]`` in [-1, 1]."""
        lo, hi = self.cell_bounds(cell)
        local = 2.0 * (x.to(torch.float64) - lo) / (hi - lo) - 1.0
        return local.clamp(-1.0, 1.0).to(x.dtype)

    def to_global(self, x_local: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_local`: ``[M, d]`` local -> ``[M, d]`` global."""
        lo, hi = self.cell_bounds(cell)
        return (lo + (x_local.to(torch.float64) + 1.0) * 0.5 * (hi - lo)).to(x_local.dtype)

    def centers(self) -> torch.Tensor:
        """Centres of all cells, ``[n_cells, d]`` float64."""
        lo, hi = self.cell_bounds(torch.arange(self.n_cells))
        return 0.5 * (lo + hi)
