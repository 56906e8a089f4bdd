"""Audio as a 1-D grid of time cells: load, synthesise a default, choose omega_0, export.

Sample ``k`` sits at time coordinate ``k + 0.5`` in the box ``[0, T]``; the box is cut into
``n_cells`` cells of (about) equal length. Amplitudes are in [-1, 1]; PSNR uses the full range
2 as its peak (``data_range = 2``).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np
import torch

from ..grid import CellGrid
from ..io import check_input_file
from ..packing import pack_samples
from ..problems import PackedMSEProblem

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".aif", ".aiff")


def synth_audio(seconds: float = 2.0, rate: int = 16000) -> np.ndarray:
    """The bundled default: an A-major chord with vibrato and a decaying click, ``[T, 1]``."""
    t = np.arange(int(seconds * rate)) / rate
    vibrato = 0.004 * np.sin(2 * np.pi * 5.0 * t)
    wave = sum(a * np.sin(2 * np.pi * f * (t + vibrato)) for f, a in
               ((220.0, 0.35), (277.18, 0.25), (329.63, 0.25), (440.0, 0.1)))
    click = np.where(t >= seconds / 2, np.exp(-(t - seconds / 2) * 60.0), 0.0)
    wave = wave + 0.3 * click * np.sin(2 * np.pi * 1800.0 * t)
    return (0.9 * wave / np.abs(wave).max()).astype(np.float32)[:, None]


def load_audio(path: Optional[str] = None) -> Tuple[np.ndarray, int]:
    """``(samples [T, C] float32 in [-1, 1], sample rate)``; None gives :func:`synth_audio`.
    ``FileNotFoundError`` / ``ValueError`` name the file when it is missing or unreadable."""
    if path is None:
        return synth_audio(), 16000
    check_input_file(path, AUDIO_EXTS, "audio")
    import soundfile as sf
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's
        raise ValueError(f"{path} cannot be read as audio ({type(e).__name__}); "
                         f"use WAV or FLAC") from e
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the file has no samples")
    return np.clip(data, -1.0, 1.0), int(rate)


def bandwidth_fraction(wave: np.ndarray, energy: float = 0.99) -> float:
    """Fraction of the Nyquist band below which ``energy`` of the spectral energy lies."""
    spec = np.abs(np.fft.rfft(wave - wave.mean(0), axis=0)) ** 2
    cum = np.cumsum(spec.sum(1))
    k = int(np.searchsorted(cum, energy * cum[-1]))
    return max(k, 1) / max(len(cum) - 1, 1)


def omega_for_cells(wave: np.ndarray, samples_per_cell: int) -> float:
    """omega_0 for sine cells of ``samples_per_cell`` samples.

    A cell's local coordinate spans 2 units over ``N`` samples, so a frequency that is the
    fraction ``b`` of Nyquist makes ``b N / 2`` cycles there: angular frequency
    ``pi b N / 2`` in local units. SIREN's first layer reaches frequencies up to about
    ``omega_0`` (weights in ``[-1/d, 1/d]``, ``d = 1``), so that is the choice, floored at 30.
    """
    return omega_from_bandwidth(bandwidth_fraction(wave), samples_per_cell)


def omega_from_bandwidth(b: float, samples_per_cell: float) -> float:
    """:func:`omega_for_cells` from the bandwidth fraction ``b`` of Nyquist."""
    return max(30.0, math.pi * b * samples_per_cell / 2.0)


class AudioProblem(PackedMSEProblem):
    """Per-cell MSE of a grid of networks against a waveform ``[T, C]``."""

    def __init__(self, wave: np.ndarray, n_cells: int, device="cpu", dtype=torch.float32,
                 box: Optional[Tuple[float, float]] = None, offset: int = 0):
        """``box`` (default ``[0, T]``) and ``offset`` (the index of ``wave``'s first
        sample) place a stretch of a longer signal: its cells are then the longer signal's
        cells of that box, with the same local coordinates (a streamed fit)."""
        t, c = wave.shape
        if n_cells <= 0 or n_cells > t:
            raise ValueError(f"n_cells {n_cells}: must lie in [1, {t}] for {t} samples")
        self.shape = (t, c)
        lo, hi = (0.0, float(t)) if box is None else (float(box[0]), float(box[1]))
        self.grid = CellGrid([lo], [hi], [n_cells])
        coords = (torch.arange(t, dtype=torch.float64) + offset + 0.5)[:, None]
        values = torch.as_tensor(wave, dtype=torch.float64)
        super().__init__(pack_samples(coords, values, self.grid, dtype).to(device),
                         data_range=2.0)

    @torch.no_grad()
    def reconstruct(self, model) -> np.ndarray:
        return self.packed.unpack(self.predict(model).double()).cpu().numpy()


def save_wav(path: str, wave: np.ndarray, rate: int) -> None:
    """Write ``[T, C]`` amplitudes (clipped to [-1, 1]) as 32-bit float WAV at ``rate``."""
    import soundfile as sf
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, np.clip(wave, -1.0, 1.0).astype(np.float32), int(rate), subtype="FLOAT")


def save_waveform_plot(path: str, target: np.ndarray, recon: np.ndarray, rate: int) -> None:
    """PNG: target and reconstruction (channel 0) on top, the error below, against seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(target.shape[0]) / rate
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 4.5), dpi=110, sharex=True)
    ax0.plot(t, target[:, 0], lw=0.4, label="target")
    ax0.plot(t, recon[:, 0], lw=0.4, alpha=0.7, label="reconstruction")
    ax0.set_ylabel("amplitude")
    ax0.legend(fontsize=7, loc="upper right")
    ax1.plot(t, recon[:, 0] - target[:, 0], lw=0.4, color="C3")
    ax1.set_ylabel("error")
    ax1.set_xlabel("seconds")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
