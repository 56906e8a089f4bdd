"""Recordings longer than memory: the streamed fit equals the all-at-once fit of the same
cells from the same start, and the script writes a WAV of the recording's length."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.signals.audio import AudioProblem, bandwidth_fraction, synth_audio
from kilonerf_lbfgs.signals.long_audio import fit_long_audio, streamed_bandwidth_fraction
from kilonerf_lbfgs.streaming import plan_groups

CFG = FitConfig(max_seconds=600, max_evals=10, progress=False, keep_best=False)


def make_model(n, group):
    return MultiMLP(n, 1, 1, 12, 2, omega_0=30.0,
                    generator=torch.Generator().manual_seed(100 + group))


@pytest.fixture
def recording(tmp_path):
    wave = synth_audio(0.26, 8000)                  # 2080 samples
    path = str(tmp_path / "r.wav")
    sf.write(path, wave, 8000, subtype="FLOAT")
    return path, wave


def test_groups_cover_every_sample_once():
    for length, n, per in ((2080, 21, 4), (1000, 7, 3), (50, 50, 50)):
        groups = plan_groups(length, n, per)
        assert [s for g in groups for s in range(*g.samples)] == list(range(length))
        assert [c for g in groups for c in range(*g.cells)] == list(range(n))


def test_streamed_fit_equals_all_at_once_with_the_same_start(tmp_path, recording):
    path, wave = recording
    m = fit_long_audio(path, 99, 4, make_model, CFG, str(tmp_path / "out.wav"),
                       str(tmp_path / "w"), log=lambda s: None)
    n = -(-len(wave) // 99)                         # 22 cells, the last one short
    assert m["cells"] == n and m["groups"] == 6 and m["function_evals"] == 6 * 10
    whole = AudioProblem(wave, n)
    model = MultiMLP(n, 1, 1, 12, 2, omega_0=30.0)
    with torch.no_grad():
        for g in plan_groups(len(wave), n, 4):
            start = make_model(g.cells[1] - g.cells[0], g.index)
            for dst, src in zip(model.parameters(), start.parameters()):
                dst[g.cells[0]:g.cells[1]].copy_(src)
    fit(model, whole, CFG)
    recon = np.clip(whole.reconstruct(model), -1, 1)
    psnr = 10 * np.log10(4.0 / ((recon - wave) ** 2).mean())
    assert m["psnr"] == pytest.approx(psnr, abs=1e-3) and m["psnr"] > 15
    out, rate = sf.read(tmp_path / "out.wav", dtype="float32", always_2d=True)
    assert rate == 8000 and out.shape == wave.shape
    np.testing.assert_allclose(out, recon, atol=1e-5)


def test_streamed_bandwidth_is_close_to_the_whole_signals(recording):
    path, wave = recording
    assert streamed_bandwidth_fraction(path, block=1024) == pytest.approx(
        bandwidth_fraction(wave), rel=0.25)


def test_fit_audio_script_streamed(script, tmp_path, recording):
    path, _ = recording
    out = tmp_path / "o"
    r = script("fit_audio.py", "--audio", path, "--samples_per_cell", 99,
               "--cells_in_memory", 8, "--width", 12, "--max_evals", 10, "--max_seconds", 600,
               "--out_dir", out, "--no_progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["groups"] == 3 and m["psnr"] > 12 and m["peak_rss_mb"] > 0
    assert sf.info(str(out / "reconstruction.wav")).frames == 2080
