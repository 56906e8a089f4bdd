"""Recordings longer than memory: read a stretch at a time, fit it, append its reconstruction.

The audio file is read through ``soundfile`` a group of cells at a time (seek and read, no
whole-file load); each group's cells are the whole recording's cells of that stretch
(:class:`~kilonerf_lbfgs.signals.audio.AudioProblem` with the stretch's box), fitted by
:func:`~kilonerf_lbfgs.streaming.fit_groups`, and the reconstruction is appended to a float
WAV as it goes (written under a temporary name, renamed at the end). Peak memory is set by
``cells_in_memory``, not by the recording's length.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict

import numpy as np
import torch

from ..fitting import FitConfig
from ..io import check_input_file
from ..streaming import Group, fit_groups, plan_groups
from .audio import AUDIO_EXTS, AudioProblem


def audio_info(path: str):
    """``soundfile.info`` of ``path``; ``ValueError`` names the file when it cannot be read."""
    check_input_file(path, AUDIO_EXTS, "audio")
    import soundfile as sf
    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's
        raise ValueError(f"{path} cannot be read as audio ({type(e).__name__}); "
                         f"use WAV or FLAC") from None
    if info.frames <= 0:
        raise ValueError(f"{path}: the file has no samples")
    return info


def read_stretch(path: str, start: int, stop: int) -> np.ndarray:
    """Samples ``[start, stop)`` of ``path`` as ``[stop - start, C]`` float32 in [-1, 1]."""
    import soundfile as sf
    with sf.SoundFile(path) as f:
        f.seek(start)
        data = f.read(stop - start, dtype="float32", always_2d=True)
    return np.clip(data, -1.0, 1.0)


def streamed_bandwidth_fraction(path: str, block: int = 1 << 16, energy: float = 0.99) -> float:
    """:func:`~kilonerf_lbfgs.signals.audio.bandwidth_fraction` estimated block by block
    (the mean power spectrum of ``block``-sample stretches, Welch's method without overlap),
    so the whole recording is never in memory."""
    info = audio_info(path)
    power, n = None, 0
    for start in range(0, info.frames, block):
        x = read_stretch(path, start, min(info.frames, start + block))
        if x.shape[0] < 16:
            continue
        spec = np.abs(np.fft.rfft(x - x.mean(0), n=block, axis=0)) ** 2
        power = spec.sum(1) if power is None else power + spec.sum(1)
        n += 1
    if power is None:
        return 1.0
    cum = np.cumsum(power)
    k = int(np.searchsorted(cum, energy * cum[-1]))
    return max(k, 1) / max(len(cum) - 1, 1)


def fit_long_audio(path: str, samples_per_cell: int, cells_in_memory: int,
                   make_model: Callable[[int, int], torch.nn.Module], cfg: FitConfig,
                   out_path: str, weights_dir: str, resume: bool = False, device="cpu",
                   log: Callable[[str], None] = print) -> Dict:
    """Fit the recording at ``path`` in groups of ``cells_in_memory`` cells of
    ``samples_per_cell`` samples; write the reconstruction to ``out_path`` (float WAV) and
    each group's weights to ``weights_dir/stretch_NNNNN.pt``. Returns PSNR (peak 2, the
    [-1, 1] range), seconds, evaluations, peak memory."""
    import soundfile as sf
    info = audio_info(path)
    total, channels = int(info.frames), int(info.channels)
    n_cells = max(1, math.ceil(total / samples_per_cell))
    groups = plan_groups(total, n_cells, cells_in_memory)
    tmp = out_path + ".part.wav"

    def load(g: Group) -> AudioProblem:
        (c0, c1), (s0, s1) = g.cells, g.samples
        return AudioProblem(read_stretch(path, s0, s1), c1 - c0, device=device,
                            box=(c0 * total / n_cells, c1 * total / n_cells), offset=s0)

    with sf.SoundFile(tmp, "w", samplerate=info.samplerate, channels=channels,
                      subtype="FLOAT", format="WAV") as out:
        def write(g: Group, recon: np.ndarray, target: np.ndarray) -> None:
            out.write(np.clip(recon, -1.0, 1.0).astype(np.float32))

        m = fit_groups(groups, load, make_model, cfg, weights_dir, write, n_cells,
                       (-1.0, 1.0), resume, device, log, unit="stretch")
    os.replace(tmp, out_path)
    m.update(samples=total, channels=channels, sample_rate=int(info.samplerate),
             seconds_of_audio=total / info.samplerate)
    return m


__all__ = ["audio_info", "read_stretch", "streamed_bandwidth_fraction", "fit_long_audio"]
