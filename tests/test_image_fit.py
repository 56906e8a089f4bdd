"""End-to-end image fits and the image adapter."""
import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.metrics import psnr
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.signals.image import ImageProblem, load_image


def smooth_image(h, w, c=3, seed=0):
    """A smooth synthetic colour image (sums of random low-frequency sinusoids)."""
    rng = np.random.default_rng(seed)
    r, q = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.zeros((h, w, c))
    for ch in range(c):
        for _ in range(4):
            fr, fq, ph = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6.28)]
            img[..., ch] += np.sin(2 * np.pi * (fr * r + fq * q) + ph)
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def test_reconstruct_round_trip_on_uneven_grid():
    img = smooth_image(13, 10)
    prob = ImageProblem(img, (3, 4))         # 13x10 pixels: cells of unequal size
    assert prob.packed.mask is not None
    assert int(prob.packed.counts.sum()) == 13 * 10
    flat = prob.packed.unpack(prob.packed.y.double())
    np.testing.assert_array_equal(flat.reshape(13, 10, 3).numpy(), img)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_small_fit_reaches_stated_psnr(optimizer):
    """A 16x16 image on 2x2 cells (192 values, 339 parameters per cell): L-BFGS reaches
    40 dB, Adam 30 dB."""
    torch.manual_seed(0)
    img = smooth_image(16, 16)
    prob = ImageProblem(img, (2, 2))
    model = MultiMLP(prob.n_cells, 2, 3, 16, 2, generator=torch.Generator().manual_seed(0))
    target = 40.0 if optimizer == "lbfgs" else 30.0
    cfg = FitConfig(optimizer=optimizer, lr=None if optimizer == "lbfgs" else 3e-3,
                    max_seconds=600, max_evals=250, target=target, progress=False)
    res = fit(model, prob, cfg)
    assert res.reached_target, res.quality
    recon = prob.reconstruct(model)
    assert psnr(recon, img) >= target - 1e-6  # the loop's PSNR is the image's PSNR


def test_lbfgs_beats_constant_adam_at_equal_evaluations():
    """Same model, same 120 evaluations: per-cell L-BFGS gets a far better fit than Adam."""
    img = smooth_image(16, 16, c=1, seed=3)
    prob = ImageProblem(img, (2, 2))
    out = {}
    for name in ("lbfgs", "adam"):
        model = MultiMLP(prob.n_cells, 2, 1, 16, 2, generator=torch.Generator().manual_seed(1))
        if name == "lbfgs":
            from kilonerf_lbfgs.optim import BatchedLBFGS
            opt = BatchedLBFGS(model.parameters(), max_eval=120)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)

        def closure():
            opt.zero_grad()
            l = prob.cell_losses(model)
            l.sum().backward()
            return l.detach()
        for _ in range(1 if name == "lbfgs" else 120):
            opt.step(closure)
        with torch.no_grad():
            out[name] = prob.quality(prob.cell_losses(model))
    assert out["lbfgs"] > out["adam"] + 10, out


def test_load_image_formats(tmp_path):
    rgb = (smooth_image(9, 7) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    iio.imwrite(tmp_path / "gray.png", rgb[..., 0])
    rgba = np.concatenate([rgb, np.zeros((9, 7, 1), np.uint8)], -1)   # fully transparent
    iio.imwrite(tmp_path / "rgba.png", rgba)
    assert load_image(str(tmp_path / "rgb.png")).shape == (9, 7, 3)
    assert load_image(str(tmp_path / "gray.png")).shape == (9, 7, 1)
    np.testing.assert_allclose(load_image(str(tmp_path / "rgba.png")), 1.0)  # on white


def test_decoder_dtypes_alpha_and_area_resize(tmp_path):
    """One decoder for every loader: 8/16-bit to [0, 1], alpha on the background, gray to RGB
    on request; one area resize."""
    import cv2

    from kilonerf_lbfgs.images import decode_image, read_image, resize_area

    rgba16 = np.zeros((2, 3, 4), np.uint16)
    rgba16[..., 0] = 65535                                   # red ...
    rgba16[..., 3] = 32768                                   # ... half transparent
    cv2.imwrite(str(tmp_path / "r16.png"), rgba16[..., [2, 1, 0, 3]])   # OpenCV writes BGRA
    got = read_image(str(tmp_path / "r16.png"), background=(0.0, 0.0, 1.0))
    a = 32768 / 65535
    np.testing.assert_allclose(got[0, 0], [a, 0.0, 1.0 - a], atol=1e-6)   # 16 bits kept
    gray_alpha = np.stack([np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8)], -1)
    assert decode_image(gray_alpha, background=0.25).shape == (2, 2, 1)
    np.testing.assert_allclose(decode_image(gray_alpha, background=0.25), 0.25)
    assert decode_image(np.zeros((2, 2), np.uint8), rgb=True).shape == (2, 2, 3)
    with pytest.raises(ValueError):
        decode_image(np.zeros((2, 2, 5)))
    img = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    np.testing.assert_allclose(resize_area(img, 2, 2)[..., 0], [[2.5, 4.5], [10.5, 12.5]])
    assert resize_area(img, 4, 4) is img


def test_library_errors_name_the_file_not_a_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(str(tmp_path / "nope.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png") as e:
        load_image(str(tmp_path / "bad.png"))
    assert "--" not in str(e.value)


def test_fit_image_script_outputs_and_resume(script, tmp_path):
    img = (smooth_image(48, 40) * 255).astype(np.uint8)
    path = tmp_path / "img.png"
    iio.imwrite(path, img)
    out = tmp_path / "run"
    args = ["--image", path, "--grid", 3, 2, "--width", 16, "--depth", 2, "--out_dir", out,
            "--no_progress"]
    # a target with a generous budget: the test does not depend on how busy the machine is
    r = script("fit_image.py", *args, "--max_seconds", 60, "--target_psnr", 25)
    assert r.returncode == 0, r.stderr
    for f in ("metrics.json", "reconstruction.png", "convergence.png", "checkpoint.pt"):
        assert os.path.isfile(out / f), f
    m = json.loads((out / "metrics.json").read_text())
    for key in ("modality", "optimizer", "device", "seed", "train_seconds", "iterations",
                "function_evals", "psnr", "ssim", "history", "n_cells", "params_per_cell",
                "params_total"):
        assert key in m, key
    assert m["n_cells"] == 6 and m["psnr"] > 20
    assert iio.imread(out / "reconstruction.png").shape == (48, 40, 3)
    # resume: continues the clock and the history from the checkpoint
    r2 = script("fit_image.py", *args, "--max_seconds", 120, "--target_psnr", 30, "--resume")
    assert r2.returncode == 0, r2.stderr
    assert "resuming from" in r2.stdout
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["function_evals"] > m["function_evals"]
    assert m2["history"][:len(m["history"])] == m["history"]
    assert m2["psnr"] >= m["psnr"] - 0.01
    # --max_evals: a budget in function evaluations (counted over the resumed run too)
    budget = m2["function_evals"] + 10
    r3 = script("fit_image.py", *args, "--max_seconds", 600, "--max_evals", budget, "--resume")
    assert r3.returncode == 0, r3.stderr
    m3 = json.loads((out / "metrics.json").read_text())
    assert budget <= m3["function_evals"] <= budget + 4        # L-BFGS steps of 5 evaluations
