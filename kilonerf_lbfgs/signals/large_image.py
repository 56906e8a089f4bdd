"""Images larger than memory: read lazily, fit band by band, write the reconstruction as it
goes.

The image is opened lazily through ``tifffile`` (which microscopy and remote-sensing users
already use): an uncompressed TIFF or a ``.npy`` file as a memory map, a tiled or compressed
TIFF by decoding only the tiles or strips a band crosses, so only the pixels of the band
being fitted are read. The grid's cells are fitted in bands of whole cell rows, at
most ``cells_in_memory`` cells at a time: load the band's pixels, build its cells' networks,
fit them, write their weights and the band's reconstruction (into a TIFF memory map of the
image's size), move on. Cells are independent, so a band's cells are exactly the whole
image's cells of those rows and a banded fit equals the all-at-once fit with the same
initial parameters and evaluation budget. PSNR is accumulated band by band (exact); SSIM is
the pixel-weighted mean of the bands' SSIMs (windows do not cross band borders). Peak memory
is set by the band, not by the image.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from ..fitting import FitConfig
from ..streaming import Group, fit_groups, plan_groups
from .image import ImageProblem

LAZY_EXTS = (".tif", ".tiff", ".npy")


def open_lazy(path: str) -> np.ndarray:
    """A lazy ``[H, W]`` or ``[H, W, C]`` image: a read-only memory map of an uncompressed
    TIFF or a ``.npy`` file, or a :class:`SegmentedTiff` for a tiled or compressed TIFF.
    ``ValueError`` names the file for a layout that cannot be read lazily (more than one
    image or plane, channels first, not an image)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in LAZY_EXTS:
        raise ValueError(f"{path}: a large image must be a TIFF or a .npy file")
    if ext == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:  # noqa: BLE001 - any parser failure is the user's file
            raise ValueError(f"{path} is not a readable .npy array ({type(e).__name__})") \
                from None
    else:
        import tifffile
        try:
            arr = tifffile.memmap(path, mode="r")
        except Exception as e:  # noqa: BLE001
            arr = SegmentedTiff.open(path)      # tiled or compressed: decoded band by band
            if arr is None:
                raise ValueError(f"{path} cannot be read lazily ({type(e).__name__}: {e}); "
                                 f"save it as a TIFF of one image (uncompressed, tiled or "
                                 f"compressed, channels last) or as .npy") from None
    if arr.ndim == 3 and arr.shape[2] > 4 and arr.shape[0] <= 4:
        raise ValueError(f"{path}: planar layout {arr.shape} (channels first) is not supported;"
                         f" store the image as [H, W, C]")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) \
            or min(arr.shape[:2]) < 1:
        raise ValueError(f"{path}: shape {arr.shape} is not an image [H, W] or [H, W, C] with "
                         f"C in 1, 3, 4")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{path}: pixel type {arr.dtype} is not an image type")
    return arr


class SegmentedTiff:
    """Rows of a tiled or compressed TIFF (one image, channels last), read and decoded one
    segment (tile or strip) at a time: ``image[r0:r1]`` decodes only the segments those rows
    cross, so memory follows the rows asked for, not the image. ``shape``, ``dtype`` and
    ``ndim`` as for an array."""

    def __init__(self, tif, page):
        self._tif, self._page = tif, page
        self.shape, self.dtype = tuple(page.shape), page.dtype
        self.ndim = len(self.shape)
        self._seg_h, self._seg_w = page.chunks[:2]
        self._seg_rows, self._seg_cols = page.chunked[:2]
        self._cached = None         # (segment row, its decoded pixels)

    @classmethod
    def open(cls, path: str):
        """The reader, or ``None`` when the file is not one contiguous image (several
        pages or planes, planar layout, unreadable)."""
        import tifffile
        try:
            tif = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001 - not a TIFF at all
            return None
        page = tif.pages[0]
        ok = len(tif.pages) == 1 and len(page.shape) in (2, 3) and \
            getattr(page, "planarconfig", 1) == 1 and len(page.chunked) >= 2 and \
            (len(page.shape) == 2 or page.chunked[2:3] in ((), (1,)))
        if not ok:
            tif.close()
            return None
        return cls(tif, page)

    def _segment_row(self, sr: int) -> np.ndarray:
        """Segment row ``sr`` decoded, ``[rows, W(, C)]``; the last one is kept, since bands
        thinner than a tile read the same segment row several times in turn."""
        if self._cached is not None and self._cached[0] == sr:
            return self._cached[1]
        fh, page = self._tif.filehandle, self._page
        sh, sw, w = self._seg_h, self._seg_w, self.shape[1]
        h = min(sh, self.shape[0] - sr * sh)
        out = np.empty((h,) + self.shape[1:], self.dtype)
        for sc in range(self._seg_cols):
            k = sr * self._seg_cols + sc
            x0 = sc * sw
            fh.seek(page.dataoffsets[k])
            seg = page.decode(fh.read(page.databytecounts[k]), k)[0]
            seg = seg.reshape(seg.shape[-3], seg.shape[-2], -1)[:h, :min(w, x0 + sw) - x0]
            out[:, x0:x0 + seg.shape[1]] = seg if self.ndim == 3 else seg[..., 0]
        self._cached = (sr, out)
        return out

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("SegmentedTiff: index with a row slice, image[r0:r1]")
        r0, r1, _ = rows.indices(self.shape[0])
        out = np.empty((max(r1 - r0, 0),) + self.shape[1:], self.dtype)
        sh = self._seg_h
        for sr in range(r0 // sh, (r1 - 1) // sh + 1 if r1 > r0 else 0):
            y0 = sr * sh
            a, b = max(r0, y0), min(r1, y0 + sh)
            out[a - r0:b - r0] = self._segment_row(sr)[a - y0:b - y0]
        return out


def to_unit(block: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1] ``[h, w, C]``: integers divided by their type's maximum,
    floats as they are; an alpha channel is dropped."""
    if block.ndim == 2:
        block = block[:, :, None]
    if block.shape[2] == 4:
        block = block[:, :, :3]
    if np.issubdtype(block.dtype, np.integer):
        return (block.astype(np.float32) / np.iinfo(block.dtype).max).astype(np.float32)
    return np.asarray(block, dtype=np.float32)


def from_unit(block: np.ndarray, dtype) -> np.ndarray:
    """The inverse of :func:`to_unit` for writing (clipped, rounded)."""
    block = np.clip(block, 0.0, 1.0)
    if np.issubdtype(dtype, np.integer):
        return (block * np.iinfo(dtype).max + 0.5).astype(dtype)
    return block.astype(dtype)


def plan_bands(h: int, grid: Sequence[int], cells_in_memory: int) -> List[Group]:
    """Bands of whole cell rows with at most ``cells_in_memory`` cells (at least one row):
    :class:`~kilonerf_lbfgs.streaming.Group` s whose ``cells`` are cell rows and whose
    ``samples`` are pixel rows."""
    rows, cols = int(grid[0]), int(grid[-1])
    return plan_groups(h, rows, max(1, int(cells_in_memory) // cols))


def band_problem(image: np.ndarray, grid: Sequence[int], band: Group, device="cpu"
                 ) -> ImageProblem:
    """The band's cells as an :class:`ImageProblem` (the band's pixels read here)."""
    h = image.shape[0]
    rows, cols = int(grid[0]), int(grid[-1])
    (i0, i1), (r0, r1) = band.cells, band.samples
    pixels = to_unit(np.asarray(image[r0:r1]))
    return ImageProblem(pixels, (i1 - i0, cols), device=device,
                        row_box=(i0 * h / rows, i1 * h / rows), row_offset=r0)


def fit_large_image(image: np.ndarray, grid: Sequence[int], cells_in_memory: int,
                    make_model: Callable[[int, int], torch.nn.Module], cfg: FitConfig,
                    out_path: str, weights_dir: str, resume: bool = False, device="cpu",
                    log: Callable[[str], None] = print) -> Dict:
    """Fit ``image`` (a lazy ``[H, W(, C)]`` array) band by band
    (:func:`~kilonerf_lbfgs.streaming.fit_groups`); write the reconstruction to ``out_path``
    (TIFF of the image's size and type; written to a temporary name and renamed at the end,
    so it is never half-written) and each band's weights to ``weights_dir/band_NNNNN.pt``.
    ``make_model(n_cells, band_index)`` builds a band's networks; ``cfg`` is each band's fit
    (its ``max_seconds`` is the whole budget and is shared out by cells). With ``resume``,
    bands whose weights exist are reconstructed from them instead of fitted again. Returns
    PSNR, SSIM, seconds, evaluations, peak memory."""
    import tifffile
    from skimage.metrics import structural_similarity
    h, w = image.shape[:2]
    c = 1 if image.ndim == 2 else min(image.shape[2], 3)
    rows, cols = int(grid[0]), int(grid[-1])
    if rows > h or cols > w:
        raise ValueError(f"grid {rows} {cols}: more cells than pixels in a {h}x{w} image")
    bands = plan_bands(h, grid, cells_in_memory)
    tmp = out_path + ".part.tif"
    out = tifffile.memmap(tmp, shape=(h, w, c) if c > 1 else (h, w), dtype=image.dtype,
                          photometric="rgb" if c == 3 else "minisblack")
    ssim_sum = [0.0]

    def write(band: Group, recon: np.ndarray, target: np.ndarray) -> None:
        r0, r1 = band.samples
        block = from_unit(recon, image.dtype)
        out[r0:r1] = block if c > 1 else block[:, :, 0]
        if min(recon.shape[:2]) >= 7:
            ssim_sum[0] += structural_similarity(np.clip(recon, 0, 1), target, data_range=1.0,
                                                 channel_axis=2) * recon.shape[0]

    m = fit_groups(bands, lambda band: band_problem(image, grid, band, device), make_model,
                   cfg, weights_dir, write, rows * cols, (0.0, 1.0), resume, device, log,
                   unit="band")
    out.flush()
    out = None                  # unmap before the rename
    os.replace(tmp, out_path)
    m.update(ssim=ssim_sum[0] / h, bands=m.pop("groups"), image_shape=[h, w, c])
    return m


__all__ = ["open_lazy", "SegmentedTiff", "to_unit", "from_unit", "plan_bands", "band_problem",
           "fit_large_image"]
