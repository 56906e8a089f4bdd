"""Images as a 2-D grid of cells: load, coordinates and targets, reconstruction.

Pixel ``(r, c)`` has its centre at ``(r + 0.5, c + 0.5)`` in the box ``[0, H] x [0, W]``; the
box is cut into ``rows x cols`` cells. Sizes the grid does not divide give cells with
different pixel counts, which the packed layout handles (no cropping, no rejection).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..grid import CellGrid
from ..images import decode_image, read_image
from ..packing import pack_samples
from ..problems import PackedMSEProblem

BUILTIN_IMAGES = ("astronaut", "camera", "coffee")


def load_image(source: Optional[str] = None) -> np.ndarray:
    """An image as float32 ``[H, W, C]`` in [0, 1] (C = 1 or 3).

    ``source`` is a file path (PNG/JPEG/...; grayscale, RGB, RGBA composited on white,
    8 or 16 bit; see :func:`~kilonerf_lbfgs.images.read_image`) or the name of an image that
    ships with scikit-image (``astronaut``, ``camera``, ``coffee``); None means ``astronaut``.
    ``FileNotFoundError`` / ``ValueError`` name the file when it is missing or unreadable.
    """
    if source is None or source in BUILTIN_IMAGES:
        from skimage import data
        return decode_image(getattr(data, source or "astronaut")())
    return read_image(source)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size x size`` window (the whole image if it is smaller)."""
    h, w = img.shape[:2]
    s_h, s_w = min(size, h), min(size, w)
    r0, c0 = (h - s_h) // 2, (w - s_w) // 2
    return img[r0:r0 + s_h, c0:c0 + s_w]


def pixel_centers(h: int, w: int) -> torch.Tensor:
    """``[H * W, 2]`` float64 pixel centres ``(r + 0.5, c + 0.5)``, row-major."""
    r = torch.arange(h, dtype=torch.float64) + 0.5
    c = torch.arange(w, dtype=torch.float64) + 0.5
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr, cc], -1).reshape(-1, 2)


class ImageProblem(PackedMSEProblem):
    """Per-cell MSE of a grid of networks against an image.

    Args:
        image: ``[H, W, C]`` float in [0, 1].
        grid: ``(rows, cols)`` cells.
        row_box: for a horizontal band of a larger image: the band's extent ``(y0, y1)`` in
            the whole image's row coordinates (its cells are then exactly the whole image's
            cells of those rows), and ``row_offset`` the band's first pixel row.
    """

    def __init__(self, image: np.ndarray, grid: Sequence[int], device="cpu",
                 dtype=torch.float32, row_box: Optional[Sequence[float]] = None,
                 row_offset: int = 0):
        h, w, c = image.shape
        rows, cols = int(grid[0]), int(grid[-1])
        if row_box is None and (rows > h or cols > w):
            raise ValueError(f"grid {rows} {cols}: more cells than pixels in a "
                             f"{h}x{w} image")
        y0, y1 = (0.0, float(h)) if row_box is None else (float(row_box[0]), float(row_box[1]))
        self.shape = (h, w, c)
        self.grid = CellGrid([y0, 0.0], [y1, float(w)], [rows, cols])
        values = torch.as_tensor(image.reshape(-1, c), dtype=torch.float64)
        centres = pixel_centers(h, w)
        centres[:, 0] += row_offset
        super().__init__(pack_samples(centres, values, self.grid, dtype).to(device))

    @torch.no_grad()
    def reconstruct(self, model) -> np.ndarray:
        """The model's image ``[H, W, C]`` (float, not clipped)."""
        flat = self.packed.unpack(self.predict(model).double())
        return flat.reshape(self.shape).cpu().numpy()
