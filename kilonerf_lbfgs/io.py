"""Outputs of a run: atomic checkpoints, metrics.json, pictures and plots."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch


def check_input_file(path: str, exts: Sequence[str], kind: str) -> str:
    """``path``'s lower-case extension, after checking that the file exists
    (``FileNotFoundError``) and that the extension is one of ``exts`` (``ValueError``);
    ``kind`` names what the file should hold ("audio", "mesh", ...)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such {kind} file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in exts:
        raise ValueError(f"{path}: unsupported {kind} format {ext or '(none)'}; use "
                         f"{', '.join(exts)}")
    return ext


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, payload: Dict) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a run killed mid-write leaves the previous checkpoint intact."""
    _atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str, map_location="cpu") -> Dict:
    """A checkpoint written by :func:`save_checkpoint`. ``FileNotFoundError`` when there is
    none at ``path``, ``ValueError`` when the file cannot be read as one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train first or pass the right path")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged file is the file's problem
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _clean(o):
    """Replace non-finite floats by None (JSON has no inf/nan)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def save_json(path: str, data: Dict) -> None:
    text = json.dumps(_clean(data), indent=1, default=_json_default)
    _atomic_write(path, lambda f: f.write(text.encode()))


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str, img: np.ndarray) -> None:
    """Save a float image in [0, 1], ``[H, W]`` or ``[H, W, C]``."""
    import imageio.v3 as iio

    img = to_uint8(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    iio.imwrite(path, img)


class _Cv2VideoWriter:
    """imageio's ``append_data`` interface over OpenCV's MP4 writer (codec mp4v)."""

    def __init__(self, path: str, fps: float):
        self.path, self.fps, self._w = path, float(fps), None

    def append_data(self, frame: np.ndarray) -> None:
        import cv2
        frame = np.asarray(frame)
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, axis=2)
        if self._w is None:
            h, w = frame.shape[:2]
            self._w = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._w.isOpened():
                raise OSError(f"{self.path}: OpenCV cannot write MP4 here; "
                              "pip install imageio-ffmpeg")
        self._w.write(np.ascontiguousarray(frame[..., 2::-1]))   # RGB -> BGR

    def __enter__(self):
        return self

    def close(self) -> None:
        if self._w is not None:
            self._w.release()
            self._w = None

    def __exit__(self, *exc):
        self.close()


class _EvenFrames:
    """Pads each frame to even height and width (repeating the last row or column): H.264
    in yuv420p refuses odd sizes."""

    def __init__(self, writer):
        self.writer = writer

    def append_data(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        pad = ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2)) + ((0, 0),) * (frame.ndim - 2)
        self.writer.append_data(np.pad(frame, pad, mode="edge") if any(sum(p) for p in pad)
                                else frame)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.writer.close()


def video_writer(path: str, fps: float, **ffmpeg_kw):
    """An MP4 writer (``with video_writer(p, 30) as w: w.append_data(uint8 [H, W, 3])``);
    frames of odd size are padded by one edge row or column.

    imageio's ffmpeg plugin (H.264) when imageio-ffmpeg is installed, else OpenCV's MP4 writer
    (mp4v; opencv-python-headless ships its own FFmpeg), so a machine without imageio-ffmpeg
    still writes videos.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return _EvenFrames(_Cv2VideoWriter(path, fps))
    import imageio.v2 as iio2
    return _EvenFrames(iio2.get_writer(path, format="ffmpeg", fps=fps, macro_block_size=1,
                                       **ffmpeg_kw))


def plot_convergence(path: str, curves: Dict[str, Sequence[Sequence[float]]],
                     ylabel: str = "PSNR (dB)", title: str = "",
                     targets: Optional[Iterable[float]] = None) -> None:
    """Quality against optimiser seconds, one line per named history ``[[s, q], ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, hist in curves.items():
        if len(hist):
            h = np.asarray(hist, dtype=np.float64)
            ax.plot(h[:, 0], h[:, 1], label=name, lw=1.4)
    for t in targets or []:
        ax.axhline(t, color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("optimiser seconds")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def __getattr__(name: str):
    # ``UserError`` moved to the command-line layer (kilonerf_lbfgs.config); this name stays
    # for the modules that still import it from here.
    if name == "UserError":
        from .config import UserError
        return UserError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
