"""Video as a 3-D grid of space-time cells: load, synthesise a default, export.

Pixel ``(r, c)`` of frame ``t`` sits at ``(t + 0.5, r + 0.5, c + 0.5)`` in the box
``[0, T] x [0, H] x [0, W]``; the box is cut into ``(frames, rows, cols)`` cells, so a cell is
a block of a few frames of a few pixels. Values are RGB (or gray) in [0, 1]. The fit runs
chunk by chunk of cells (``chunk_cells``), so the autograd tape never spans the whole clip.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..grid import CellGrid
from ..images import decode_image, read_image, resize_area
from ..io import check_input_file, save_png, to_uint8, video_writer
from ..metrics import psnr, ssim
from ..packing import pack_samples
from ..problems import PackedMSEProblem

FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".gif", ".avi", ".mov", ".mkv", ".webm")


def synth_video(frames: int = 16, size: int = 64) -> np.ndarray:
    """The bundled default ``[T, H, W, 3]`` float32 in [0, 1]: a drifting colour gradient
    with a red disc moving right and a blue square moving down, soft-edged."""
    t = np.arange(frames, dtype=np.float64)[:, None, None] / max(frames, 1)
    r = (np.arange(size) + 0.5)[None, :, None] / size
    c = (np.arange(size) + 0.5)[None, None, :] / size
    bg = np.stack(np.broadcast_arrays(0.5 + 0.3 * np.sin(2 * np.pi * (c + 0.3 * t)),
                                      0.5 + 0.3 * np.cos(2 * np.pi * (r - 0.2 * t)),
                                      0.4 + 0 * t * r * c), -1)
    soft = 0.02                                                      # edge width (box units)
    disc = np.hypot(r - 0.35, c - (0.2 + 0.6 * t)) - 0.15
    a_disc = 1.0 / (1.0 + np.exp(disc / soft))
    square = np.maximum(np.abs(r - (0.2 + 0.5 * t)), np.abs(c - 0.7)) - 0.12
    a_sq = 1.0 / (1.0 + np.exp(square / soft))
    img = bg * (1 - a_disc[..., None]) + np.array([0.9, 0.15, 0.1]) * a_disc[..., None]
    img = img * (1 - a_sq[..., None]) + np.array([0.1, 0.2, 0.9]) * a_sq[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def _read_frames(path: str, frames: Optional[int]) -> List[np.ndarray]:
    """Decoded frames (float32 ``[H, W, C]`` in [0, 1]) of a folder or a video file."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTS))
        names = names[:frames] if frames else names
        return [read_image(os.path.join(path, n)) for n in names]
    import imageio.v2 as iio2
    reader = iio2.get_reader(path, "ffmpeg" if os.path.splitext(path)[1].lower() != ".gif"
                             else None)
    out = []
    try:
        for f in reader:
            out.append(decode_image(np.asarray(f)))
            if frames and len(out) >= frames:
                break
    finally:
        reader.close()
    return out


def _resize(frame: np.ndarray, resize: Sequence[float]) -> np.ndarray:
    """``resize``: ``[factor]`` or ``[W, H]``."""
    h, w = frame.shape[:2]
    if len(resize) == 1:
        return resize_area(frame, max(1, round(w * resize[0])), max(1, round(h * resize[0])))
    return resize_area(frame, int(resize[0]), int(resize[1]))


def load_video(path: Optional[str] = None, frames: Optional[int] = None,
               resize: Optional[Sequence[float]] = None) -> np.ndarray:
    """A clip as float32 ``[T, H, W, C]`` in [0, 1] (C = 1 or 3).

    Args:
        path: MP4/GIF/... file or folder of frame images (sorted by name); None gives
            :func:`synth_video`.
        frames: keep the first ``frames`` frames (None: all).
        resize: ``[factor]`` or ``[W, H]`` (None: original size), area interpolation.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing, of an
    unsupported format, unreadable, empty, or holds frames of different sizes.
    """
    if path is None:
        clip = synth_video()
        clip = clip[:frames] if frames else clip
        return np.stack([_resize(f, resize) for f in clip]) if resize else clip
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such video file or folder: {path}")
    if not os.path.isdir(path):
        check_input_file(path, VIDEO_EXTS, "video")
    try:
        out = _read_frames(path, frames)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} cannot be read as video ({type(e).__name__}: {detail}); "
                         f"use MP4, GIF or a folder of PNG/JPEG frames") from e
    if not out:
        raise ValueError(f"{path}: no frames found")
    if resize:
        out = [_resize(f, resize) for f in out]
    if len({f.shape for f in out}) != 1:
        raise ValueError(f"{path}: frames have different sizes; resize them to one W H")
    return np.stack(out)


def video_fps(path: Optional[str], default: float = 25.0) -> float:
    """Frames per second of a video file (``default`` for folders, GIFs without it, None)."""
    if path is None or os.path.isdir(path):
        return default
    try:
        import imageio.v2 as iio2
        with iio2.get_reader(path) as r:
            fps = r.get_meta_data().get("fps")
            if fps is None and r.get_meta_data().get("duration"):
                fps = 1000.0 / float(r.get_meta_data()["duration"])   # GIF: ms per frame
        return float(fps) if fps and np.isfinite(fps) and fps > 0 else default
    except Exception:  # noqa: BLE001 - the frames were readable; fps is cosmetic
        return default


def voxel_centers(t: int, h: int, w: int) -> torch.Tensor:
    """``[T * H * W, 3]`` float64 centres ``(t + .5, r + .5, c + .5)``, frame-major."""
    axes = [torch.arange(n, dtype=torch.float64) + 0.5 for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


class VideoProblem(PackedMSEProblem):
    """Per-cell MSE of a grid of networks against a clip ``[T, H, W, C]``.

    Args:
        grid: ``(frames, rows, cols)`` cells.
        chunk_cells: cells per forward/backward chunk (bounds the autograd memory).
    """

    def __init__(self, video: np.ndarray, grid: Sequence[int], chunk_cells: int = 64,
                 device="cpu", dtype=torch.float32):
        t, h, w, c = video.shape
        res = [int(g) for g in grid]
        if len(res) != 3 or any(g > n for g, n in zip(res, (t, h, w))):
            raise ValueError(f"grid {res}: need FRAMES ROWS COLS, each at most the clip's "
                             f"{t} frames x {h} x {w} pixels")
        self.shape = (t, h, w, c)
        self.grid = CellGrid([0.0, 0.0, 0.0], [float(t), float(h), float(w)], res)
        values = torch.as_tensor(video.reshape(-1, c))
        packed = pack_samples(voxel_centers(t, h, w), values, self.grid, dtype)
        super().__init__(packed.to(device), chunk_cells=chunk_cells)

    @torch.no_grad()
    def reconstruct(self, model) -> np.ndarray:
        """The model's clip ``[T, H, W, C]`` (float, not clipped), built chunk by chunk."""
        out = torch.zeros(self.packed.n_samples, self.shape[3], dtype=torch.float32)
        for rows in self._chunks() if self.chunk_cells else [None]:
            sub = self.packed if rows is None else self.packed.select(rows)
            x = self.x_eval if self.x_eval.shape[0] == 1 else sub.x
            pred = model.forward_dense(x, rows).float().cpu()
            keep = sub.index.cpu() >= 0
            out[sub.index.cpu()[keep]] = pred[keep]
        return out.reshape(self.shape).numpy()


def frame_metrics(recon: np.ndarray, video: np.ndarray) -> dict:
    """Means over frames of PSNR and SSIM (``recon`` clipped to [0, 1])."""
    recon = np.clip(recon, 0, 1)
    ps = [psnr(a, b) for a, b in zip(recon, video)]
    ss = [ssim(a[..., 0] if a.shape[2] == 1 else a, b[..., 0] if b.shape[2] == 1 else b)
          for a, b in zip(recon, video)]
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)),
            "psnr_per_frame": ps, "ssim_per_frame": ss}


def save_mp4(path: str, video: np.ndarray, fps: float = 25.0) -> None:
    """Write ``[T, H, W, C]`` in [0, 1] as H.264 MP4 (odd sizes padded by one edge pixel)."""
    frames = to_uint8(video)
    if frames.shape[3] == 1:
        frames = np.repeat(frames, 3, axis=3)
    with video_writer(path, fps, codec="libx264", quality=8, ffmpeg_log_level="error") as w:
        for f in frames:
            w.append_data(f)


def save_side_by_side(path: str, target: np.ndarray, recon: np.ndarray, n: int = 4) -> None:
    """A still of ``n`` evenly spaced frames: one row per frame, target | reconstruction."""
    idx = np.unique(np.linspace(0, target.shape[0] - 1, min(n, target.shape[0])).round()
                    .astype(int))
    gap = np.ones((target.shape[1], 4, target.shape[3]), np.float32)
    rows = [np.concatenate([target[i], gap, np.clip(recon[i], 0, 1)], 1) for i in idx]
    hgap = np.ones((4,) + rows[0].shape[1:], np.float32)
    save_png(path, np.concatenate(sum(([r, hgap] for r in rows), [])[:-1], 0))
