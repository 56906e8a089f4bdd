"""Images as a 2-D grid of cells: load, coordinates and targets, reconstruction.

Pixel ``(r, c)`` has its centre at ``(r + 0.5, c + 0.5)`` in the box ``[0, H] x [0, W]``; the
box is cut into ``rows x cols`` cells. Sizes the grid does not divide give cells with
different pixel counts, which the packed layout handles (no cropping, no rejection).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..grid import CellGrid
from ..io import UserError
from ..packing import pack_samples
from ..problems import PackedMSEProblem

BUILTIN_IMAGES = ("astronaut", "camera", "coffee")


def load_image(source: Optional[str] = None) -> np.ndarray:
    """An image as float32 ``[H, W, C]`` in [0, 1] (C = 1 or 3).

    ``source`` is a file path (PNG/JPEG/...; grayscale, RGB, RGBA composited on white,
    8 or 16 bit) or the name of an image that ships with scikit-image (``astronaut``,
    ``camera``, ``coffee``); None means ``astronaut``.
    """
    if source is None or source in BUILTIN_IMAGES:
        from skimage import data
        img = getattr(data, source or "astronaut")()
    else:
        if not os.path.isfile(source):
            raise UserError(f"--image {source}: no such file")
        import imageio.v3 as iio
        try:
            img = iio.imread(source)
        except Exception as e:  # noqa: BLE001 - any decoder failure is the user's file
            raise UserError(f"--image {source}: cannot be read as an image "
                            f"({type(e).__name__}); use a PNG or JPEG") from e
    img = np.asarray(img)
    if img.ndim == 4:           # animated image: first frame
        img = img[0]
    if img.ndim not in (2, 3) or img.size == 0 or min(img.shape[:2]) < 1:
        raise UserError(f"--image {source}: expected a 2-D grayscale or colour image, "
                        f"got an array of shape {img.shape}")
    if np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float32) / float(np.iinfo(img.dtype).max)
    else:
        img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] in (2, 4):  # gray+alpha or RGBA: composite on white
        alpha = img[..., -1:]
        img = img[..., :-1] * alpha + (1.0 - alpha)
    if img.shape[2] not in (1, 3):
        raise UserError(f"--image {source}: {img.shape[2]} channels; expected 1 to 4")
    return np.clip(img, 0.0, 1.0)


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
    """

    def __init__(self, image: np.ndarray, grid: Sequence[int], device="cpu",
                 dtype=torch.float32):
        h, w, c = image.shape
        rows, cols = int(grid[0]), int(grid[-1])
        if rows > h or cols > w:
            raise UserError(f"--grid {rows} {cols}: more cells than pixels in a "
                            f"{h}x{w} image")
        self.shape = (h, w, c)
        self.grid = CellGrid([0.0, 0.0], [float(h), float(w)], [rows, cols])
        values = torch.as_tensor(image.reshape(-1, c), dtype=torch.float64)
        super().__init__(pack_samples(pixel_centers(h, w), values, self.grid, dtype).to(device))

    @torch.no_grad()
    def reconstruct(self, model) -> np.ndarray:
        """The model's image ``[H, W, C]`` (float, not clipped)."""
        flat = self.packed.unpack(self.predict(model).double())
        return flat.reshape(self.shape).cpu().numpy()
