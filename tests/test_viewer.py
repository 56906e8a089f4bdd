"""The web viewer: camera conversion, overlays, its renders equal the test-view renderer,
and a real headless browser shows the scene (skips with one line where none is installed)."""
import io
import math
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import REPO
from kilonerf_lbfgs.nerf.data.demo_scene import generate_demo_scene
from kilonerf_lbfgs.nerf.data.rays import camera_rays, look_at
from kilonerf_lbfgs.nerf.evaluate import render_view
from kilonerf_lbfgs.nerf.fields.kilonerf import KiloNeRFField
from kilonerf_lbfgs.nerf.render.marcher import Marcher
from kilonerf_lbfgs.nerf.render.occupancy import OccupancyGrid
from kilonerf_lbfgs.nerf.render.rendering import RenderSettings
from kilonerf_lbfgs.nerf.viewer import (cell_grid_segments, fov_intrinsics,
                                        occupied_voxel_centres, pose_from_viser)

BOX = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]


def viser_camera(eye, centre, fov=0.8, aspect=1.5):
    """A viser-style camera (OpenCV axes: x right, y down, z forward; wxyz camera to
    world) at ``eye`` looking at ``centre`` with world +z up, built independently of the
    module under test."""
    fwd = np.asarray(centre, float) - np.asarray(eye, float)
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    R = np.stack([right, down, fwd], 1)                       # columns: camera axes in world
    x, y, z, w = Rotation.from_matrix(R).as_quat()
    return SimpleNamespace(wxyz=(w, x, y, z), position=tuple(map(float, eye)), fov=fov,
                           aspect=aspect)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_viser_camera_becomes_the_look_at_pose():
    for eye in [(3.0, -2.0, 1.5), (-1.0, 4.0, -2.0), (0.5, 0.2, 3.0)]:
        cam = viser_camera(eye, (0.1, -0.2, 0.3))
        pose = pose_from_viser(cam.wxyz, cam.position)
        ref = look_at(eye, (0.1, -0.2, 0.3))
        assert torch.allclose(pose, ref.float(), atol=1e-5), (pose, ref)


def test_fov_intrinsics_spans_the_vertical_field_of_view():
    fov, W, H = 0.9, 64, 40
    K = fov_intrinsics(fov, W, H)
    o, d = camera_rays(torch.eye(4), K, H, W)
    d = d.view(H, W, 3)
    # the rays through the top and bottom image edges (pixel centres, extrapolated half a
    # pixel) are fov apart; the centre ray looks down -z
    top = math.atan2(float(d[0, W // 2, 1]), -float(d[0, W // 2, 2]))
    step = math.atan2(float(d[0, W // 2, 1]), -float(d[0, W // 2, 2])) - math.atan2(
        float(d[1, W // 2, 1]), -float(d[1, W // 2, 2]))
    assert abs(2 * (top + 0.5 * step) - fov) < 1e-3
    with pytest.raises(ValueError, match="fov_y"):
        fov_intrinsics(0.0, W, H)


def test_cell_grid_segments_are_the_lattice_lines():
    segs = cell_grid_segments([0, 0, 0, 2, 4, 6], (2, 4, 3))
    assert segs.shape == (5 * 4 + 3 * 4 + 3 * 5, 2, 3)     # lines along x, y, z
    moved = np.abs(segs[:, 1] - segs[:, 0])
    assert ((moved > 0).sum(1) == 1).all()                       # axis-aligned
    full = np.array([2, 4, 6])
    assert np.allclose(moved.max(1), full[moved.argmax(1)])       # spanning the box
    # every endpoint coordinate sits on the lattice of its axis (cells of size 1, 1, 2)
    assert np.allclose(segs[..., 0] % 1, 0) and np.allclose(segs[..., 1] % 1, 0)
    assert np.allclose(segs[..., 2] % 2, 0)
    assert len(np.unique(segs.reshape(len(segs), -1), axis=0)) == len(segs)


def test_occupied_voxel_centres_map_back_to_their_voxels():
    grid = OccupancyGrid(BOX, 8)
    grid.binary.zero_()
    idx = torch.tensor([[0, 0, 0], [7, 3, 5], [2, 6, 1]])
    grid.binary[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    c = torch.as_tensor(occupied_voxel_centres(grid))
    assert c.shape == (3, 3)
    assert torch.equal(grid.voxel_index(c).sort(0)[0], idx.sort(0)[0])


def small_scene():
    occ = torch.zeros(27, dtype=torch.bool)
    occ[[4, 13, 22]] = True
    field = KiloNeRFField(BOX, 3, occ, width=8, depth=2, feature_dim=4, head_width=8,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                   # make it dense enough to see
        field.trunk.biases[-1][:, 0] += 3.0
    marcher = Marcher(BOX, 16)
    rs = RenderSettings(near=1e-3, far=1e4, step_size=0.02,
                        background=torch.tensor([1.0, 1.0, 1.0]))
    return field, marcher, rs


def test_viewer_renders_what_the_test_view_renderer_renders():
    pytest.importorskip("viser")
    from kilonerf_lbfgs.nerf.viewer import NerfViewer
    field, marcher, rs = small_scene()
    viewer = NerfViewer(BOX, rs, grid_res=3, port=free_port(), resolution=32)
    try:
        assert viewer.render(viser_camera((3, -2, 1), (0, 0, 0)), 24) is None   # no field yet
        viewer.set_field(field, marcher)
        cam = viser_camera((3.0, -2.0, 1.0), (0.0, 0.0, 0.0), fov=0.7, aspect=1.5)
        img = viewer.render(cam, 24)
        assert img.shape == (24, 36, 3) and img.dtype == np.uint8
        ref = render_view(field, marcher, look_at((3.0, -2.0, 1.0), (0, 0, 0)),
                          fov_intrinsics(0.7, 36, 24), 24, 36, rs)
        ref = (ref.numpy() * 255 + 0.5).astype(np.uint8)
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1
        assert img.std() > 5                                   # the field is in view
    finally:
        viewer.close()


def test_training_reports_to_the_viewer_and_takes_its_lock(tmp_path):
    pytest.importorskip("viser")
    from kilonerf_lbfgs.nerf.data.loaders import load_dataset
    from kilonerf_lbfgs.nerf.data.rays import RayBank
    from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions, NerfPipeline
    from kilonerf_lbfgs.nerf.viewer import NerfViewer
    scene = generate_demo_scene(str(tmp_path / "scene"), size=16, n_train=4, n_test=1)
    train = load_dataset(scene)["train"]
    opts = NerfOptions(route="direct", optimizer="adam", grid_res=2, occ_res=16,
                       batch_rays=256, max_seconds=1e9, max_steps=6, progress=False,
                       near=train.near, far=train.far)
    pipe = NerfPipeline(opts, RayBank(train), "cpu", str(tmp_path / "ckpt.pt"))
    viewer = NerfViewer(opts.aabb, pipe.rs, grid_res=2, port=free_port())
    acquired, inner = [], viewer.lock

    class CountingLock:
        def __enter__(self):
            acquired.append(1)
            return inner.__enter__()

        def __exit__(self, *exc):
            return inner.__exit__(*exc)

    try:
        pipe.viewer = viewer
        viewer.lock = CountingLock()            # count who takes it
        pipe.run()
        assert "step 6" in viewer.status and "PSNR" in viewer.status, viewer.status
        assert len(acquired) == 1 + 6           # set_field once, then each of the 6 steps
    finally:
        viewer.close()


def test_train_nerf_serves_the_viewer_while_it_trains(script, tmp_path):
    pytest.importorskip("viser")
    scene = generate_demo_scene(str(tmp_path / "scene"), size=16, n_train=4, n_test=1)
    r = script("train_nerf.py", "--datadir", scene, "--route", "direct", "--grid_res", "2",
               "--occ_res", "16", "--batch_rays", "256", "--max_steps", "5", "--no_progress",
               "--viewer", "--viewer_port", str(free_port()), "--out_dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "viewer at http://127.0.0.1:" in r.stdout and "viewer closed" in r.stdout, r.stdout


def _chrome_driver():
    """A headless Chromium through selenium, or a skip reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        return None, "no Chromium and chromedriver here (apt install chromium chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=900,600", "--use-angle=swiftshader",
                 "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=opts), None


def colourful_fraction(png: bytes) -> float:
    """Fraction of pixels in the middle of a screenshot (rows 20-80%, columns 20-60%: where
    the scene is, clear of the panel, the notices and the axes gizmo in the corners) whose
    channels differ by more than 60: the demo scene's textures, where the viewer's own page
    is white and grey."""
    import imageio.v3 as iio
    img = iio.imread(io.BytesIO(png))[..., :3].astype(int)
    H, W = img.shape[:2]
    img = img[int(0.2 * H):int(0.8 * H), int(0.2 * W):int(0.6 * W)]
    return float(((img.max(-1) - img.min(-1)) > 60).mean())


def test_view_script_shows_the_scene_in_a_headless_browser(script, tmp_path):
    pytest.importorskip("viser")
    driver, why = _chrome_driver()
    if driver is None:
        pytest.skip(why)
    try:
        scene = generate_demo_scene(str(tmp_path / "scene"), size=24, n_train=20, n_test=2)
        out = tmp_path / "run"
        r = script("train_nerf.py", "--datadir", scene, "--route", "direct", "--optimizer",
                   "adam", "--grid_res", "4", "--occ_res", "32", "--batch_rays", "1024",
                   "--direct_lr", "2e-3", "--max_seconds", "600", "--max_steps", "120",
                   "--no_progress", "--out_dir", out)
        assert r.returncode == 0, r.stderr[-2000:]
        port = free_port()
        proc = subprocess.Popen([sys.executable, f"{REPO}/scripts/view.py", "--ckpt",
                                 str(out / "checkpoint.pt"), "--port", str(port),
                                 "--resolution", "128", "--seconds", "300"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            seen = ""
            while "viewer at" not in seen and proc.poll() is None:   # viser prints a banner
                seen += proc.stdout.readline()
            assert "viewer at" in seen, seen + proc.stdout.read()
            driver.get(f"http://127.0.0.1:{port}")
            frac, t0 = 0.0, time.monotonic()
            blank = colourful_fraction(driver.get_screenshot_as_png())
            while time.monotonic() - t0 < 90:
                time.sleep(2)
                png = driver.get_screenshot_as_png()
                frac = colourful_fraction(png)
                if frac > 0.01:
                    break
            (tmp_path / "screenshot.png").write_bytes(png)
            assert frac > 0.01, (f"the page shows no rendered scene ({frac:.4f} of the view "
                                 f"colourful; at first load {blank:.4f}); see "
                                 f"{tmp_path / 'screenshot.png'}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        driver.quit()
