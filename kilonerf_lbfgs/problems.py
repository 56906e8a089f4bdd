"""Generic cell problems on packed samples (images, audio and video are all this)."""
from __future__ import annotations

from typing import Optional

import torch

from .fitting import CellProblem
from .metrics import psnr_from_mse
from .packing import PackedSamples, global_mse, per_cell_mse


class PackedMSEProblem(CellProblem):
    """Per-cell mean squared error of a :class:`~kilonerf_lbfgs.multinet.MultiMLP` on packed
    samples; quality is the PSNR of the whole signal (``data_range`` peak).

    Args:
        packed: the samples, grouped by cell.
        cells: optional ``[k]`` long: the problem covers only these cells of the model
            (``packed`` then holds just their samples, in this order).
    """

    quality_name = "psnr"

    def __init__(self, packed: PackedSamples, data_range: float = 1.0,
                 cells: Optional[torch.Tensor] = None):
        self.packed = packed
        self.data_range = data_range
        self.cells = cells
        x = packed.x
        # equal cells see the same local coordinates: evaluate them as one shared set
        self.x_eval = x[:1] if packed.mask is None and bool((x == x[:1]).all()) else x

    @property
    def n_cells(self) -> int:
        return self.packed.n_cells

    def predict(self, model) -> torch.Tensor:
        """``[n_cells, P, C]`` predictions in the packed layout."""
        return model.forward_dense(self.x_eval, self.cells)

    def cell_losses(self, model) -> torch.Tensor:
        return per_cell_mse(self.predict(model), self.packed)

    def quality(self, cell_losses: torch.Tensor) -> float:
        return psnr_from_mse(global_mse(cell_losses.double(), self.packed), self.data_range)

    def subset(self, cells: torch.Tensor) -> "PackedMSEProblem":
        """The same problem restricted to ``cells``, for a model that holds only those cells
        (row ``i`` of the result belongs to the model's cell ``i``)."""
        return PackedMSEProblem(self.packed.select(cells), self.data_range)
