"""kilonerf_lbfgs: grids of tiny coordinate networks trained with a batched per-cell L-BFGS."""
from .grid import CellGrid
from .multinet import MultiMLP
from .optim import BatchedLBFGS
from .packing import PackedSamples, pack_samples, per_cell_mse
from .problems import PackedMSEProblem
from .fitting import (Callback, CellProblem, CosineLR, ExactQuality, FitConfig, FitResult,
                      FitState, fit)
from .signals.image import ImageProblem, load_image

__all__ = ["CellGrid", "MultiMLP", "BatchedLBFGS", "PackedSamples", "pack_samples",
           "per_cell_mse", "PackedMSEProblem", "CellProblem", "FitConfig", "FitResult", "fit",
           "FitState", "Callback", "CosineLR", "ExactQuality",
           "ImageProblem", "load_image"]
__version__ = "0.1.0"
