"""Images larger than memory: lazy reading, band-by-band fits equal the all-at-once fit,
the reconstruction TIFF, resume, and one-line errors for layouts that cannot be mapped."""
import json
import math
import os

import numpy as np
import pytest
import tifffile
import torch

from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.signals.image import ImageProblem
from kilonerf_lbfgs.signals.large_image import (SegmentedTiff, band_problem, fit_large_image,
                                                open_lazy, plan_bands, to_unit)


def picture(h=45, w=56, seed=0):
    """A smooth uint8 RGB picture (sizes the grid does not divide)."""
    y, x = np.mgrid[0:h, 0:w] / 20.0
    rng = np.random.default_rng(seed)
    img = np.stack([0.5 + 0.4 * np.sin(a * x + b * y) for a, b in rng.uniform(0.5, 3, (3, 2))], -1)
    return (img * 255).round().astype(np.uint8)


def make_model(n, band):
    return MultiMLP(n, 2, 3, 12, 2, generator=torch.Generator().manual_seed(100 + band))


CFG = FitConfig(max_seconds=600, max_evals=15, progress=False, keep_best=False)


def test_bands_cover_every_pixel_row_once():
    for h, rows, k in ((45, 4, 3), (100, 7, 14), (9, 9, 1)):
        bands = plan_bands(h, (rows, 1), k)
        covered = [r for b in bands for r in range(*b.samples)]
        assert covered == list(range(h))


def test_banded_fit_equals_all_at_once_with_the_same_start(tmp_path):
    img = picture()
    path = str(tmp_path / "p.tif")
    tifffile.imwrite(path, img)
    lazy = open_lazy(path)
    assert isinstance(lazy, np.memmap)
    grid = (4, 3)                                   # 45 and 56 px: uneven cells
    m = fit_large_image(lazy, grid, 3, make_model, CFG, str(tmp_path / "r.tif"),
                        str(tmp_path / "w"), log=lambda s: None)
    assert m["bands"] == 4 and m["function_evals"] == 4 * 15
    # the same cells at once, started from the bands' initial parameters
    full = ImageProblem(to_unit(img), grid)
    model = MultiMLP(12, 2, 3, 12, 2)
    with torch.no_grad():
        for b, band in enumerate(plan_bands(45, grid, 3)):
            start = make_model(3, b)
            for dst, src in zip(model.parameters(), start.parameters()):
                dst[3 * b:3 * b + 3].copy_(src)
    fit(model, full, CFG)
    recon = np.clip(full.reconstruct(model), 0, 1)
    psnr = -10 * math.log10(((recon - to_unit(img)) ** 2).mean())
    assert m["psnr"] == pytest.approx(psnr, abs=1e-3)
    # the reconstruction TIFF: the image's size and type, the same picture
    out = tifffile.imread(tmp_path / "r.tif")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (recon * 255 + 0.5).astype(int)).max() <= 1


def test_resume_reuses_finished_bands(tmp_path):
    img = picture(30, 30)
    path = str(tmp_path / "p.npy")
    np.save(path, img)
    args = (open_lazy(path), (3, 2), 2, make_model, CFG)
    first = fit_large_image(*args, str(tmp_path / "a.tif"), str(tmp_path / "w"),
                            log=lambda s: None)
    os.remove(tmp_path / "w" / "band_00002.pt")              # as if killed in the last band
    again = fit_large_image(*args, str(tmp_path / "b.tif"), str(tmp_path / "w"), resume=True,
                            log=lambda s: None)
    assert again["psnr"] == pytest.approx(first["psnr"], abs=1e-9)
    assert again["function_evals"] == first["function_evals"]


def test_band_problem_cells_are_the_whole_images_cells():
    img = picture(45, 56)
    grid = (4, 3)
    whole = ImageProblem(to_unit(img), grid)
    for band in plan_bands(45, grid, 6):
        part = band_problem(img, grid, band)
        i0, i1 = band.cells
        cells = torch.arange(i0 * 3, i1 * 3)
        sub = whole.packed.select(cells)
        assert torch.equal(part.packed.counts, sub.counts)
        for k, n in enumerate(sub.counts.tolist()):     # same local coordinates and targets
            torch.testing.assert_close(part.packed.x[k, :n], sub.x[k, :n])
            torch.testing.assert_close(part.packed.y[k, :n], sub.y[k, :n])


@pytest.mark.parametrize("make,needle", [
    (lambda p: tifffile.imwrite(p, np.zeros((5, 4, 4, 4), np.uint8)), "not an image"),
    (lambda p: tifffile.imwrite(p, np.zeros((3, 40, 40), np.uint8), compression="zlib",
                                planarconfig="separate", photometric="rgb"),
     "cannot be read lazily"),
    (lambda p: open(p, "w").write("not a tiff"), "cannot be read lazily"),
])
def test_unmappable_tiffs_give_one_line_and_write_nothing(script, tmp_path, make, needle):
    path = tmp_path / "bad.tif"
    make(str(path))
    out = tmp_path / "o"
    r = script("fit_image.py", "--image", path, "--cells_in_memory", 4, "--max_evals", 2,
               "--out_dir", out)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--image" in lines[0]
    assert needle in lines[0], lines
    assert not (out / "reconstruction.tif").exists()


def test_fit_image_script_banded(script, tmp_path):
    path = tmp_path / "p.tif"
    tifffile.imwrite(str(path), picture())
    out = tmp_path / "o"
    r = script("fit_image.py", "--image", path, "--grid", 4, 3, "--cells_in_memory", 6,
               "--width", 12, "--depth", 2, "--max_evals", 15, "--max_seconds", 600,
               "--out_dir", out, "--no_progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    # the picture's mean colour scores about 11 dB; 15 evaluations reach about 17.7
    assert m["bands"] == 2 and m["psnr"] > 15 and m["peak_rss_mb"] > 0
    assert tifffile.imread(out / "reconstruction.tif").shape == (45, 56, 3)


@pytest.mark.parametrize("layout", [dict(tile=(16, 16), compression="zlib"),
                                    dict(compression="zlib", rowsperstrip=5), dict(tile=(32, 16))])
def test_tiled_and_compressed_tiffs_read_by_rows_and_fit_the_same(tmp_path, layout):
    """A tiled or compressed TIFF is read segment by segment (SegmentedTiff): any rows equal
    the image's, and the banded fit equals the fit of the same image stored uncompressed."""
    img = picture()
    plain, packed = str(tmp_path / "plain.tif"), str(tmp_path / "packed.tif")
    tifffile.imwrite(plain, img)
    tifffile.imwrite(packed, img, **layout)
    lazy = open_lazy(packed)
    assert isinstance(lazy, SegmentedTiff) and lazy.shape == img.shape
    for r0, r1 in ((0, 45), (3, 20), (17, 18), (40, 45)):
        assert np.array_equal(lazy[r0:r1], img[r0:r1])
    fits = [fit_large_image(open_lazy(p), (4, 3), 6, make_model, CFG, str(tmp_path / f"{k}.tif"),
                            str(tmp_path / f"w{k}"), log=lambda s: None)
            for k, p in enumerate((plain, packed))]
    assert fits[0]["psnr"] == pytest.approx(fits[1]["psnr"], abs=1e-9)
