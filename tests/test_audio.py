"""The audio adapter: round trip, omega_0 rule, and a small end-to-end fit."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.metrics import snr_db
from kilonerf_lbfgs.multinet import MultiMLP
from conftest import SHARED_DATA
from kilonerf_lbfgs.signals.audio import (AudioProblem, bandwidth_fraction, load_audio,
                                          omega_for_cells, synth_audio)


def test_every_sample_in_exactly_one_cell_and_back():
    wave = synth_audio(0.05, 8000)                       # 400 samples, 7 uneven cells
    prob = AudioProblem(wave, 7)
    idx = prob.packed.index[prob.packed.index >= 0]
    assert sorted(idx.tolist()) == list(range(wave.shape[0]))
    back = prob.packed.unpack(prob.packed.y.double()).numpy()
    np.testing.assert_array_equal(back, wave)


def test_float_wav_round_trip(tmp_path):
    wave = synth_audio(0.1, 8000)
    sf.write(tmp_path / "a.wav", wave, 8000, subtype="FLOAT")
    got, rate = load_audio(str(tmp_path / "a.wav"))
    assert rate == 8000 and got.shape == wave.shape
    np.testing.assert_allclose(got, wave, atol=1e-7)


def test_bandwidth_of_a_pure_tone():
    rate, f = 8000, 1000.0
    t = np.arange(8000) / rate
    tone = np.sin(2 * np.pi * f * t)[:, None]
    assert abs(bandwidth_fraction(tone) - f / (rate / 2)) < 0.01
    # 1000 Hz over 64-sample cells at 8 kHz: 8 cycles per cell -> pi * 0.25 * 64 / 2 = 8 pi
    assert omega_for_cells(tone, 640) == np.pi * bandwidth_fraction(tone) * 640 / 2


def test_small_audio_fit_reaches_stated_snr():
    """0.1 s of the bundled chord at 8 kHz (800 samples), 25 cells of 32 samples, sine 2x16."""
    wave = synth_audio(0.1, 8000)
    prob = AudioProblem(wave, 25)
    omega = omega_for_cells(wave, 32)
    model = MultiMLP(25, 1, 1, 16, 2, omega_0=omega, generator=torch.Generator().manual_seed(0))
    res = fit(model, prob, FitConfig(optimizer="lbfgs", max_seconds=600, max_evals=60,
                                     target=50.0,
                                     progress=False))
    assert res.reached_target, res.quality
    assert snr_db(prob.reconstruct(model), wave) > 30.0


def test_stereo_wav_at_another_rate_round_trips(tmp_path):
    wave = np.concatenate([synth_audio(0.05, 11025), -synth_audio(0.05, 11025)], 1)
    sf.write(tmp_path / "s.flac", wave, 11025)
    got, rate = load_audio(str(tmp_path / "s.flac"))
    assert rate == 11025 and got.shape == wave.shape
    prob = AudioProblem(got, 5)
    back = prob.packed.unpack(prob.packed.y.double()).numpy()
    np.testing.assert_array_equal(back, got)


def test_fit_audio_script_outputs(script, tmp_path):
    """A stereo 22.05 kHz file in, a WAV at the same rate and channel count out."""
    wave = np.concatenate([synth_audio(0.1, 22050)] * 2, 1)
    sf.write(tmp_path / "in.wav", wave, 22050, subtype="PCM_16")
    out = tmp_path / "run"
    r = script("fit_audio.py", "--audio", tmp_path / "in.wav", "--samples_per_cell", 128,
               "--width", 16, "--max_seconds", 2, "--out_dir", out, "--no_progress")
    assert r.returncode == 0, r.stderr
    for f in ("metrics.json", "reconstruction.wav", "waveform.png", "checkpoint.pt"):
        assert os.path.isfile(out / f), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["modality"] == "audio" and m["psnr"] > 20 and "snr_db" in m
    assert m["omega_0"] >= 30
    rec, rate = sf.read(out / "reconstruction.wav", always_2d=True)
    assert rate == 22050 and rec.shape == wave.shape


@pytest.mark.realdata
def test_real_recording_loads():
    wave, rate = load_audio(os.path.join(SHARED_DATA, "audio", "gt_bach.wav"))
    assert rate == 44100 and wave.shape[1] == 1 and wave.shape[0] > 44100
