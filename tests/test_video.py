"""The video adapter: round trip, chunked backward = one pass, a tiny fit, the script."""
import json
import os

import imageio.v2 as iio2
import pytest
import numpy as np
import torch

from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.signals.video import VideoProblem, frame_metrics, load_video, synth_video


def test_every_voxel_in_exactly_one_cell_and_back():
    clip = synth_video(5, 12)[:, :, :11]                 # 5 x 12 x 11: uneven cells
    prob = VideoProblem(clip, (2, 3, 2), chunk_cells=4)
    idx = prob.packed.index[prob.packed.index >= 0]
    assert sorted(idx.tolist()) == list(range(clip[..., 0].size))
    back = prob.packed.unpack(prob.packed.y.double()).numpy().reshape(clip.shape)
    np.testing.assert_array_equal(back, clip)


def test_chunked_backward_matches_one_pass():
    clip = synth_video(4, 16)
    grads = []
    for chunk in (None, 3):
        prob = VideoProblem(clip, (2, 2, 2), chunk_cells=chunk or 64)
        model = MultiMLP(8, 3, 3, 8, 2, generator=torch.Generator().manual_seed(0))
        losses = prob.loss_and_backward(model)
        grads.append((losses, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_tiny_video_fit_reaches_30_db():
    """4 frames of 16x16 on 1x2x2 cells (4x8x8 px each), sine 2x32: 32 dB in the loop,
    30 dB as the mean over frames."""
    clip = synth_video(4, 16)
    prob = VideoProblem(clip, (1, 2, 2), chunk_cells=2)
    model = MultiMLP(prob.n_cells, 3, 3, 32, 2, generator=torch.Generator().manual_seed(0))
    res = fit(model, prob, FitConfig(max_seconds=600, max_evals=100, target=32.0, progress=False))
    assert res.reached_target, res.quality
    assert frame_metrics(prob.reconstruct(model), clip)["psnr"] > 30.0


def test_load_gif_folder_frames_and_resize(tmp_path):
    clip = (synth_video(6, 20) * 255).astype(np.uint8)
    iio2.mimwrite(tmp_path / "c.gif", list(clip))
    os.makedirs(tmp_path / "frames")
    for i, f in enumerate(clip):
        iio2.imwrite(tmp_path / "frames" / f"{i:03d}.png", f)
    assert load_video(str(tmp_path / "c.gif"), frames=4).shape == (4, 20, 20, 3)
    got = load_video(str(tmp_path / "frames"), resize=[0.5])
    assert got.shape == (6, 10, 10, 3)
    assert load_video(str(tmp_path / "frames"), resize=[8, 6]).shape == (6, 6, 8, 3)


def test_fit_video_script_outputs(script, tmp_path):
    out = tmp_path / "run"
    r = script("fit_video.py", "--frames", 6, "--resize", 0.5, "--grid", 1, 2, 2, "--width", 16,
               "--depth", 2, "--max_seconds", 2, "--out_dir", out, "--no_progress")
    assert r.returncode == 0, r.stderr
    for f in ("metrics.json", "reconstruction.mp4", "frames.png", "checkpoint.pt"):
        assert os.path.isfile(out / f), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["modality"] == "video" and m["psnr"] > 15 and 0 < m["ssim"] <= 1
    frames = [f for f in iio2.get_reader(str(out / "reconstruction.mp4"), "ffmpeg")]
    assert len(frames) == 6 and frames[0].shape == (32, 32, 3)


@pytest.mark.parametrize("backend", ["imageio-ffmpeg", "opencv"])
def test_video_writer_pads_odd_frames_on_either_backend(tmp_path, monkeypatch, backend):
    import builtins
    import imageio.v3 as iio
    from kilonerf_lbfgs.io import video_writer
    if backend == "opencv":                   # as on a machine without imageio-ffmpeg
        real_import = builtins.__import__

        def no_ffmpeg(name, *a, **kw):
            if name == "imageio_ffmpeg":
                raise ImportError("no imageio_ffmpeg")
            return real_import(name, *a, **kw)
        monkeypatch.setattr(builtins, "__import__", no_ffmpeg)
    frames = np.zeros((4, 33, 41, 3), np.uint8)
    frames[:, 10:20, 5:30] = [200, 40, 20]
    with video_writer(str(tmp_path / "v.mp4"), 10) as w:
        for f in frames:
            w.append_data(f)
    monkeypatch.undo()
    v = iio.imread(tmp_path / "v.mp4")
    assert v.shape == (4, 34, 42, 3)
    assert abs(int(v[0, 15, 15, 0]) - 200) < 30 and int(v[0, 2, 2].max()) < 30   # the picture
