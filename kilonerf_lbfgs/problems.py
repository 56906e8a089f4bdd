"""Generic cell problems on packed samples (images, audio and video are all this)."""
from __future__ import annotations

from typing import Optional

import torch

from .fitting import CellProblem
from .metrics import psnr_from_mse
from .packing import (GroupedSamples, PackedSamples, global_mse, grouped_cell_sse,
                      per_cell_mse, regroup)


class PackedMSEProblem(CellProblem):
    """Per-cell mean squared error of a :class:`~kilonerf_lbfgs.multinet.MultiMLP` on packed
    samples; quality is the PSNR of the whole signal (``data_range`` peak).

    Args:
        packed: the samples, grouped by cell.
        cells: optional ``[k]`` long: the problem covers only these cells of the model
            (``packed`` then holds just their samples, in this order).
        chunk_cells: if set, :meth:`loss_and_backward` runs forward and backward over
            ``chunk_cells`` cells at a time, so the autograd tape never holds more than one
            chunk's activations (memory bounded for long signals such as video); the losses
            and gradients are the same as in one pass.

    When the cells' sample counts are uneven (the padded layout holds more than
    ``REGROUP_WASTE`` times the real samples, e.g. a shape's near-surface samples) and no
    chunking is asked for, the losses are computed on :func:`regroup`'s bounded groups
    instead (same losses and gradients, about the real sample count of work).
    """

    REGROUP_WASTE = 1.5
    shardable = True            # quality from the per-cell losses (and sample counts) alone

    quality_name = "psnr"

    def __init__(self, packed: PackedSamples, data_range: float = 1.0,
                 cells: Optional[torch.Tensor] = None, chunk_cells: Optional[int] = None):
        self.data_range = data_range
        self.cells = cells
        self.chunk_cells = chunk_cells
        self.set_packed(packed)

    def set_packed(self, packed: PackedSamples) -> None:
        """Replace the samples (e.g. a fresh draw from the same distribution; the number of
        samples per cell may change, the cells may not)."""
        if hasattr(self, "packed") and packed.n_cells != self.packed.n_cells:
            raise ValueError(f"set_packed: {packed.n_cells} cells, the problem has "
                             f"{self.packed.n_cells}")
        self.packed = packed
        self.version = getattr(self, "version", -1) + 1     # which draw of samples this is
        x = packed.x
        # equal cells see the same local coordinates: evaluate them as one shared set
        self.x_eval = x[:1] if packed.mask is None and bool((x == x[:1]).all()) else x
        self.groups: Optional[GroupedSamples] = None
        real = int(packed.counts.sum())
        chunk_cells = self.chunk_cells
        if packed.mask is not None and (chunk_cells is None or chunk_cells >= packed.n_cells) \
                and packed.mask.numel() > self.REGROUP_WASTE * max(real, 1):
            self.groups = regroup(packed)

    @property
    def n_cells(self) -> int:
        return self.packed.n_cells

    def predict(self, model) -> torch.Tensor:
        """``[n_cells, P, C]`` predictions in the packed layout."""
        return model.forward_dense(self.x_eval, self.cells)

    def cell_losses(self, model) -> torch.Tensor:
        if self.groups is not None:
            g = self.groups
            cells = g.cells if self.cells is None else self.cells[g.cells]
            sse = grouped_cell_sse(model.forward_dense(g.x, cells), g, self.n_cells)
            denom = (self.packed.counts * self.packed.y.shape[-1]).clamp(min=1)
            return sse / denom.to(sse.dtype)
        if self.chunk_cells is None or self.chunk_cells >= self.n_cells:
            return per_cell_mse(self.predict(model), self.packed)
        return torch.cat([self._chunk_losses(model, rows) for rows in self._chunks()])

    def _chunks(self):
        """Row ranges ``[k]`` (long) of at most ``chunk_cells`` cells each."""
        dev = self.packed.x.device
        for start in range(0, self.n_cells, self.chunk_cells):
            yield torch.arange(start, min(start + self.chunk_cells, self.n_cells), device=dev)

    def _chunk_losses(self, model, rows: torch.Tensor) -> torch.Tensor:
        """Per-cell MSE ``[k]`` of the problem's rows ``rows [k]``."""
        sub = self.packed.select(rows)
        x = self.x_eval if self.x_eval.shape[0] == 1 else sub.x
        cells = rows if self.cells is None else self.cells[rows]
        return per_cell_mse(model.forward_dense(x, cells), sub)

    def loss_and_backward(self, model) -> torch.Tensor:
        if self.chunk_cells is None or self.chunk_cells >= self.n_cells:
            return super().loss_and_backward(model)
        out = []
        for rows in self._chunks():          # one chunk's tape at a time
            losses = self._chunk_losses(model, rows)
            losses.sum().backward()
            out.append(losses.detach())
        return torch.cat(out)

    def quality(self, cell_losses: torch.Tensor) -> float:
        return psnr_from_mse(global_mse(cell_losses.double(), self.packed), self.data_range)

    def subset(self, cells: torch.Tensor) -> "PackedMSEProblem":
        """The same problem restricted to ``cells``, for a model that holds only those cells
        (row ``i`` of the result belongs to the model's cell ``i``)."""
        return PackedMSEProblem(self.packed.select(cells), self.data_range,
                                chunk_cells=self.chunk_cells)
