"""Samples grouped by cell in a padded layout, and the per-cell losses on it.

Every modality turns its signal into global coordinates ``[M, d]`` and target values
``[M, c]``; :func:`pack_samples` sorts them into ``[n_cells, P, ...]`` (``P`` the largest
per-cell count) so that a :class:`~kilonerf_lbfgs.multinet.MultiMLP` evaluates them with
batched matmuls and a loss vector ``[n_cells]`` comes out for a per-cell optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .grid import CellGrid
from .multinet import pack_by_cell


@dataclass
class PackedSamples:
    """Samples of one signal grouped by cell.

    Attributes:
        x: ``[n_cells, P, d]`` local coordinates in [-1, 1] (zero in padding).
        y: ``[n_cells, P, c]`` targets (zero in padding).
        mask: ``[n_cells, P]`` 1 for a real sample, 0 for padding (``None``: no padding).
        counts: ``[n_cells]`` samples per cell.
        index: ``[n_cells, P]`` long, the sample's row in the original ``[M, ...]`` arrays
            (-1 in padding), to put predictions back in signal order.
        n_samples: ``M``.
    """
    x: torch.Tensor
    y: torch.Tensor
    mask: Optional[torch.Tensor]
    counts: torch.Tensor
    index: torch.Tensor
    n_samples: int

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "PackedSamples":
        return PackedSamples(self.x.to(device), self.y.to(device),
                             None if self.mask is None else self.mask.to(device),
                             self.counts.to(device), self.index.to(device), self.n_samples)

    def unpack(self, pred: torch.Tensor) -> torch.Tensor:
        """``pred [n_cells, P, c]`` -> ``[M, c]`` in the original sample order."""
        out = pred.new_zeros(self.n_samples, pred.shape[-1])
        keep = self.index >= 0
        out[self.index[keep]] = pred[keep]
        return out

    def select(self, cells: torch.Tensor) -> "PackedSamples":
        """The samples of the listed cells only (rows in the order of ``cells``)."""
        return PackedSamples(self.x[cells], self.y[cells],
                             None if self.mask is None else self.mask[cells],
                             self.counts[cells], self.index[cells], self.n_samples)


def pack_samples(coords: torch.Tensor, values: torch.Tensor, grid: CellGrid,
                 dtype: torch.dtype = torch.float32) -> PackedSamples:
    """Group samples by the grid's cells.

    Args:
        coords: ``[M, d]`` global coordinates inside the grid's box.
        values: ``[M, c]`` targets.
        grid: the cell grid.
    """
    if coords.shape[0] != values.shape[0]:
        raise ValueError("pack_samples: coords and values must have the same number of rows")
    cell = grid.cell_of(coords)
    local = grid.to_local(coords.to(torch.float64), cell).to(dtype)
    packing = pack_by_cell(cell, grid.n_cells, max_group=0)
    n, width = grid.n_cells, packing.width
    group_cells = packing.cells[packing.group]          # cell id of each sorted sample
    x = torch.zeros(n, width, coords.shape[1], dtype=dtype)
    y = torch.zeros(n, width, values.shape[1], dtype=dtype)
    index = torch.full((n, width), -1, dtype=torch.long)
    x[group_cells, packing.slot] = local[packing.order]
    y[group_cells, packing.slot] = values[packing.order].to(dtype)
    index[group_cells, packing.slot] = packing.order
    counts = torch.bincount(cell, minlength=n)
    mask = None if bool((counts == width).all()) else (index >= 0).to(dtype)
    return PackedSamples(x, y, mask, counts, index, coords.shape[0])


def per_cell_sse(pred: torch.Tensor, packed: PackedSamples) -> torch.Tensor:
    """Sum of squared errors per cell: ``pred [n, P, c]`` -> ``[n]``."""
    err = (pred - packed.y) ** 2
    if packed.mask is not None:
        err = err * packed.mask[..., None]
    return err.sum(dim=(1, 2))


def per_cell_mse(pred: torch.Tensor, packed: PackedSamples) -> torch.Tensor:
    """Mean squared error per cell (0 for empty cells): ``[n, P, c]`` -> ``[n]``."""
    denom = (packed.counts * packed.y.shape[-1]).clamp(min=1).to(pred.dtype)
    return per_cell_sse(pred, packed) / denom


def global_mse(cell_mse: torch.Tensor, packed: PackedSamples) -> torch.Tensor:
    """The whole signal's MSE from per-cell MSEs ``[n]`` (weights = samples per cell)."""
    w = packed.counts.to(cell_mse.dtype)
    return (cell_mse * w).sum() / w.sum()


@dataclass
class GroupedSamples:
    """The real samples of a :class:`PackedSamples` in groups of at most ``max_group``, each
    group holding one cell's samples (a large cell spans several groups), so uneven cells
    cost about the real sample count, not ``n_cells x`` the largest count.

    Attributes:
        x: ``[G, W, d]``; y: ``[G, W, c]``; mask: ``[G, W]`` (1 real, 0 padding).
        cells: ``[G]`` long, the packed row (cell) each group belongs to.
    """
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    cells: torch.Tensor


def regroup(packed: PackedSamples, max_group: Optional[int] = None) -> GroupedSamples:
    """Regroup ``packed``'s real samples; ``max_group`` defaults to a quarter of the mean
    count per non-empty cell (at least 32), which bounds the padding by about a quarter of
    the real samples plus one group per cell."""
    keep = packed.index >= 0
    n, width = keep.shape
    rows = torch.arange(n, device=keep.device)[:, None].expand(n, width)[keep]
    x, y = packed.x[keep], packed.y[keep]
    if max_group is None:
        nonempty = max(int((packed.counts > 0).sum()), 1)
        max_group = max(32, -(-rows.numel() // (4 * nonempty)))
    p = pack_by_cell(rows, n, max_group=max_group)
    g, w = p.n_groups, p.width
    xg = x.new_zeros(g, w, x.shape[1])
    yg = y.new_zeros(g, w, y.shape[1])
    mask = x.new_zeros(g, w)
    xg[p.group, p.slot] = x[p.order]
    yg[p.group, p.slot] = y[p.order]
    mask[p.group, p.slot] = 1.0
    return GroupedSamples(xg, yg, mask, p.cells)


def grouped_cell_sse(pred: torch.Tensor, groups: GroupedSamples, n_cells: int) -> torch.Tensor:
    """Sum of squared errors per cell from group predictions ``pred [G, W, c]`` -> ``[n]``."""
    err = (((pred - groups.y) ** 2) * groups.mask[..., None]).sum(dim=(1, 2))
    return err.new_zeros(n_cells).index_add(0, groups.cells, err)
