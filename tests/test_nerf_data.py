"""NeRF data: Blender and instant-ngp loaders, camera rays, orbit poses, the generated demo scene."""
import json
import math
import os
import warnings

import cv2
import numpy as np
import pytest
import torch

from kilonerf_lbfgs.nerf.data.loaders import load_dataset, load_split
from kilonerf_lbfgs.nerf.data.demo_scene import (_scene, _shade, default_demo_dir,
                                                 ensure_demo_scene, generate_demo_scene)
from kilonerf_lbfgs.nerf.data.rays import camera_rays, look_at, orbit_poses, path_poses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGO = os.path.join(os.path.dirname(REPO), "shared", "data", "nerf_synthetic", "lego")


# ------------------------------------------------------------------------------- fixtures

def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _pose(seed: int) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = _rotation(seed)
    m[:3, 3] = np.random.default_rng(seed + 100).normal(size=3) * 3
    return m


def _write_png(path: str, rgba: np.ndarray) -> None:
    """Write uint8 RGB(A) ``[H, W, C]`` as PNG (OpenCV wants BGR(A))."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    order = [2, 1, 0, 3][:rgba.shape[2]]
    assert cv2.imwrite(path, np.ascontiguousarray(rgba[..., order]))


def _blender_scene(root, W=40, H=24, n=3, angle=0.7, splits=("train", "test"), seed=0,
                   channels=4, extra=None):
    """Blender-format scene with random uint8 images; returns ``{split: [images]}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        frames, imgs = [], []
        for k in range(n):
            img = rng.integers(0, 256, size=(H, W, channels), dtype=np.uint8)
            _write_png(os.path.join(root, split, f"r_{k}.png"), img)
            frames.append({"file_path": f"./{split}/r_{k}",
                           "transform_matrix": _pose(k).tolist()})
            imgs.append(img)
        meta = {"camera_angle_x": angle, "frames": frames, **(extra or {})}
        with open(os.path.join(root, f"transforms_{split}.json"), "w") as f:
            json.dump(meta, f)
        out[split] = imgs
    return out


def _one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, f"{p!r} not in {msg!r}"


# -------------------------------------------------------------------------- intrinsics

@pytest.mark.parametrize("kw, W, H", [({}, 40, 24), ({"downsample": 2}, 20, 12),
                                      ({"downsample": 4}, 10, 6),
                                      ({"img_wh": (30, 18)}, 30, 18),
                                      ({"img_wh": (20, 24)}, 20, 24)])
def test_focal_from_camera_angle_x(tmp_path, kw, W, H):
    _blender_scene(str(tmp_path), W=40, H=24, angle=0.7)
    s = load_split(str(tmp_path), "train", **kw)
    assert (s.W, s.H) == (W, H) and s.images.shape == (3, H, W, 3)
    assert s.images.dtype == torch.float32 and s.poses.shape == (3, 4, 4)
    fx = 0.5 * W / math.tan(0.35)                       # at the loaded width
    fy = 0.5 * 40 / math.tan(0.35) * H / 24             # square pixels at the original size
    expect = torch.tensor([fx, fy, W / 2, H / 2], dtype=torch.float32).expand(3, 4)
    torch.testing.assert_close(s.intrinsics, expect)
    assert (s.near, s.far) == (2.0, 6.0)
    assert s.scene_box == ((-1.5,) * 3, (1.5,) * 3)
    torch.testing.assert_close(s.poses[1], torch.tensor(_pose(1), dtype=torch.float32))


def test_json_overrides_near_far_box(tmp_path):
    _blender_scene(str(tmp_path), n=1, extra={"near": 1.0, "far": 3.5,
                                             "aabb": [[-1, -2, -3], [1, 2, 3]]})
    s = load_split(str(tmp_path), "train")
    assert (s.near, s.far) == (1.0, 3.5)
    assert s.scene_box == ((-1.0, -2.0, -3.0), (1.0, 2.0, 3.0))


def test_every_keeps_every_kth_frame(tmp_path):
    _blender_scene(str(tmp_path), n=5)
    s = load_split(str(tmp_path), "test", every=2)
    assert len(s) == 3 and [os.path.basename(p) for p in s.file_paths] == \
        ["r_0.png", "r_2.png", "r_4.png"]
    d = load_dataset(str(tmp_path), test_every=2)
    assert set(d) == {"train", "test"} and len(d["train"]) == 5 and len(d["test"]) == 3


# ---------------------------------------------------------------------------------- rays

def test_centre_pixel_looks_down_minus_z_and_origins_are_the_camera():
    poses = torch.tensor(np.stack([_pose(s) for s in range(3)]), dtype=torch.float64)
    H, W, f = 7, 9, 11.0
    K = torch.tensor([f, 1.3 * f, W / 2, H / 2], dtype=torch.float64)
    o, d = camera_rays(poses, K, H, W)
    assert o.shape == d.shape == (3, H * W, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3, H * W, dtype=torch.float64))
    torch.testing.assert_close(o, poses[:, None, :3, 3].expand(3, H * W, 3))
    centre = (H // 2) * W + W // 2
    torch.testing.assert_close(d[:, centre], -poses[:, :3, 2])
    # one pixel right: towards camera +x; one row up: towards camera +y; exact offsets
    cam = torch.einsum("nij,nmi->nmj", poses[:, :3, :3], d)         # directions in camera axes
    right, up = cam[:, centre + 1], cam[:, centre - W]
    torch.testing.assert_close(right[:, 0] / -right[:, 2], torch.full((3,), 1 / f,
                                                                    dtype=torch.float64))
    torch.testing.assert_close(up[:, 1] / -up[:, 2], torch.full((3,), 1 / (1.3 * f),
                                                              dtype=torch.float64))
    # a single pose gives [H*W, 3]
    o1, d1 = camera_rays(poses[1], K, H, W)
    assert o1.shape == (H * W, 3)
    torch.testing.assert_close(d1, d[1])


def test_loaded_camera_centre_ray(tmp_path):
    _blender_scene(str(tmp_path), W=9, H=5, n=2)
    s = load_split(str(tmp_path), "train")
    o, d = camera_rays(s.poses, s.intrinsics, s.H, s.W)
    torch.testing.assert_close(d[:, 2 * 9 + 4], -s.poses[:, :3, 2])
    torch.testing.assert_close(o[:, 0], s.poses[:, :3, 3])


def test_orbit_poses_look_at_the_centre():
    c = torch.tensor([0.3, -0.2, 0.5])
    P = orbit_poses(8, radius=3.0, elevation_deg=25.0, center=c.tolist())
    assert P.shape == (8, 4, 4) and P.dtype == torch.float32
    pos = P[:, :3, 3]
    torch.testing.assert_close((pos - c).norm(dim=-1), torch.full((8,), 3.0))
    torch.testing.assert_close(pos[:, 2] - c[2], torch.full((8,), 3.0 * math.sin(math.radians(25))))
    R = P[:, :3, :3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3).expand(8, 3, 3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(8))
    fwd = (c - pos) / 3.0
    torch.testing.assert_close(-R[:, :, 2], fwd, atol=1e-6, rtol=0)
    assert (R[:, 2, 1] > 0.5).all()                       # camera +y roughly world +z
    az = torch.atan2(pos[:, 1] - c[1], pos[:, 0] - c[0])  # evenly spaced, distinct
    steps = torch.remainder(torch.diff(az), 2 * math.pi)
    torch.testing.assert_close(steps, torch.full((7,), 2 * math.pi / 8), atol=1e-5, rtol=0)
    # the centre pixel's ray passes through the centre
    o, d = camera_rays(P, torch.tensor([10.0, 10.0, 5.5, 5.5]), 11, 11)
    torch.testing.assert_close(o[:, 60] + 3.0 * d[:, 60], c.expand(8, 3), atol=1e-5, rtol=0)
    # straight down the up axis still gives a valid rotation
    top = look_at((0.0, 0.0, 4.0))
    torch.testing.assert_close(top[:3, 2], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(torch.linalg.det(top[:3, :3]), torch.tensor(1.0))


# -------------------------------------------------------------------------------- images

@pytest.mark.parametrize("bg", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.2, 0.5, 0.9)])
def test_rgba_composited_on_background(tmp_path, bg):
    imgs = _blender_scene(str(tmp_path), W=6, H=4, n=2)["train"]
    s = load_split(str(tmp_path), "train", background=bg)
    for k, img in enumerate(imgs):
        rgb, a = img[..., :3] / np.float32(255), img[..., 3:] / np.float32(255)
        expect = rgb * a + np.asarray(bg, dtype=np.float32) * (1 - a)
        np.testing.assert_allclose(s.images[k].numpy(), expect, atol=1e-6, rtol=0)
    # fully transparent pixels are exactly the background
    img = np.zeros((4, 6, 4), np.uint8)
    img[..., :3] = 77
    _write_png(str(tmp_path / "train" / "r_0.png"), img)
    s = load_split(str(tmp_path), "train")
    assert (s.images[0] == 1.0).all()


def test_rgb_and_gray_images_load(tmp_path):
    imgs = _blender_scene(str(tmp_path), W=6, H=4, n=2, channels=3)["train"]
    s = load_split(str(tmp_path), "train")
    np.testing.assert_allclose(s.images[1].numpy(), imgs[1] / np.float32(255), atol=1e-6)


def test_downsample_averages_areas(tmp_path):
    # 2x2 blocks of four known values: the downsampled pixel is their mean, per channel
    H, W = 6, 8
    base = np.array([[0, 40], [100, 255]], np.float64)
    img = np.zeros((H, W, 3), np.uint8)
    for c, shift in enumerate((0, 1, 2)):
        blk = np.roll(base, shift)
        img[..., c] = np.tile(blk, (H // 2, W // 2)).astype(np.uint8)
    img[:2, :2] = 17                                   # one flat block
    _write_png(str(tmp_path / "train" / "r_0.png"), img)
    with open(tmp_path / "transforms_train.json", "w") as f:
        json.dump({"camera_angle_x": 1.0, "frames": [
            {"file_path": "train/r_0.png", "transform_matrix": np.eye(4).tolist()}]}, f)
    s = load_split(str(tmp_path), "train", downsample=2)
    expect = img.astype(np.float64).reshape(H // 2, 2, W // 2, 2, 3).mean((1, 3)) / 255
    assert s.images.shape == (1, 3, 4, 3)
    np.testing.assert_allclose(s.images[0].numpy(), expect, atol=1e-6, rtol=0)
    assert abs(float(s.images[0, 0, 0, 0]) - 17 / 255) < 1e-6
    # img_wh with the same factor gives the same result
    s2 = load_split(str(tmp_path), "train", img_wh=(4, 3))
    torch.testing.assert_close(s2.images, s.images)


# ------------------------------------------------------------------------- instant-ngp

def _ngp_scene(root, n=10, missing=(3, 7), W=16, H=12):
    rng = np.random.default_rng(1)
    frames = []
    for k in range(n):
        if k not in missing:
            _write_png(os.path.join(root, "images", f"{k:03d}.png"),
                       rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))
        fr = {"file_path": f"images/{k:03d}.png", "transform_matrix": _pose(k).tolist()}
        if k % 2:
            fr.update(fl_x=30.0 + k, cx=7.5)           # per-frame intrinsics win
        frames.append(fr)
    meta = {"fl_x": 20.0, "fl_y": 21.0, "cx": 8.0, "cy": 6.5, "w": W, "h": H,
            "aabb_scale": 2, "frames": frames}
    with open(os.path.join(root, "transforms.json"), "w") as f:
        json.dump(meta, f)


def test_instant_ngp_transforms(tmp_path):
    _ngp_scene(str(tmp_path))
    with pytest.warns(UserWarning) as rec:
        s = load_split(str(tmp_path), "train", downsample=2)
    msgs = [str(r.message) for r in rec if issubclass(r.category, UserWarning)]
    assert len(msgs) == 1 and "2 frame" in msgs[0] and "transforms.json" in msgs[0], msgs
    kept = [k for k in range(10) if k not in (3, 7) and k % 8]     # test frames held out
    assert len(s) == 6 and (s.W, s.H) == (8, 6)
    assert [os.path.basename(p) for p in s.file_paths] == [f"{k:03d}.png" for k in kept]
    expect = [((30.0 + k) / 2, 21.0 / 2, 7.5 / 2, 6.5 / 2) if k % 2 else
              (20.0 / 2, 21.0 / 2, 8.0 / 2, 6.5 / 2) for k in kept]
    torch.testing.assert_close(s.intrinsics, torch.tensor(expect))
    torch.testing.assert_close(s.poses[2], torch.tensor(_pose(kept[2]), dtype=torch.float32))
    assert s.scene_box == ((-3.0,) * 3, (3.0,) * 3)
    t = load_split(str(tmp_path), "test")                  # every 8th frame: 0 and 8
    assert [os.path.basename(p) for p in t.file_paths] == ["000.png", "008.png"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        d = load_dataset(str(tmp_path))
    assert set(d) == {"train", "test"} and len(d["test"]) == 2
    assert len([r for r in rec if "missing" in str(r.message)]) == 1   # none among the tests
    # no test view is a training view
    assert not set(d["test"].file_paths) & set(d["train"].file_paths)
    train_poses = {tuple(p.flatten().tolist()) for p in d["train"].poses}
    assert not any(tuple(p.flatten().tolist()) in train_poses for p in d["test"].poses)


def test_instant_ngp_camera_angle_fallback(tmp_path):
    _ngp_scene(str(tmp_path), n=2, missing=())
    path = tmp_path / "transforms.json"
    meta = json.loads(path.read_text())
    for key in ("fl_x", "fl_y", "cx", "cy", "w", "h"):
        del meta[key]
    meta["frames"] = [{k: v for k, v in fr.items() if k in ("file_path", "transform_matrix")}
                      for fr in meta["frames"]]
    meta["camera_angle_x"] = 0.9
    path.write_text(json.dumps(meta))
    s = load_split(str(tmp_path), "train")
    f = 0.5 * 16 / math.tan(0.45)
    torch.testing.assert_close(s.intrinsics[0], torch.tensor([f, f, 8.0, 6.0]))


# ------------------------------------------------------------------------------ errors

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(str(tmp_path / "nope"))
    _one_line_error(e, tmp_path / "nope", "NeRF-synthetic")
    assert "--" not in str(e.value)          # the library names no flag


def test_folder_without_transforms(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_split(str(tmp_path), "train")
    _one_line_error(e, "transforms_train.json")


@pytest.mark.parametrize("content, words", [
    ("{not json", ["not valid JSON"]),
    (json.dumps({"camera_angle_x": 0.7}), ["\"frames\""]),
    (json.dumps([1, 2]), ["\"frames\""]),
    (json.dumps({"frames": []}), ["camera_angle_x"]),
])
def test_bad_transforms_file(tmp_path, content, words):
    _blender_scene(str(tmp_path), n=1)
    path = tmp_path / "transforms_train.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_split(str(tmp_path), "train")
    _one_line_error(e, path, *words)


def test_bad_frames(tmp_path):
    _blender_scene(str(tmp_path), n=2)
    path = tmp_path / "transforms_train.json"
    meta = json.loads(path.read_text())
    for bad, word in [({"file_path": "./train/r_0"}, "transform_matrix"),
                      ({"file_path": "./train/r_0", "transform_matrix": [[1, 0]]}, "4x4"),
                      ({"file_path": "./train/gone", "transform_matrix": np.eye(4).tolist()},
                       "gone.png")]:
        path.write_text(json.dumps({**meta, "frames": [meta["frames"][0], bad]}))
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            load_split(str(tmp_path), "train")
        _one_line_error(e, path, word)
    path.write_text(json.dumps({**meta, "frames": []}))
    with pytest.raises(ValueError) as e:
        load_split(str(tmp_path), "train")
    _one_line_error(e, path, "no usable frames")


def test_image_of_another_size(tmp_path):
    _blender_scene(str(tmp_path), W=8, H=6, n=3)
    _write_png(str(tmp_path / "train" / "r_2.png"), np.zeros((6, 10, 4), np.uint8))
    with pytest.raises(ValueError) as e:
        load_split(str(tmp_path), "train")
    _one_line_error(e, os.path.join(str(tmp_path), "train", "r_2.png"), "10x6", "8x6")


def test_unreadable_image(tmp_path):
    _blender_scene(str(tmp_path), n=2)
    (tmp_path / "train" / "r_1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError) as e:
        load_split(str(tmp_path), "train")
    _one_line_error(e, "r_1.png")


def test_ngp_without_usable_frames(tmp_path):
    _ngp_scene(str(tmp_path), n=3, missing=(0, 1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as e:
            load_split(str(tmp_path), "train")
    _one_line_error(e, tmp_path / "transforms.json", "no usable frames")


@pytest.mark.parametrize("kw", [{"downsample": 0}, {"every": 0}, {"downsample": 100},
                                {"img_wh": (0, 5)}])
def test_bad_options(tmp_path, kw):
    _blender_scene(str(tmp_path), n=1)
    with pytest.raises(ValueError) as e:
        load_split(str(tmp_path), "train", **kw)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- demo scene

def test_demo_scene(tmp_path):
    root = str(tmp_path / "demo")
    assert generate_demo_scene(root, size=24, n_train=6, n_test=4, seed=3) == root
    d = load_dataset(root)
    assert set(d) == {"train", "test", "val"}
    assert [len(d[k]) for k in ("train", "test", "val")] == [6, 4, 2]
    for s in d.values():
        assert (s.H, s.W) == (24, 24) and s.images.shape[1:] == (24, 24, 3)
        assert s.scene_box == ((-1.0,) * 3, (1.0,) * 3) and (s.near, s.far) == (2.0, 6.0)
        torch.testing.assert_close(s.poses[:, :3, 3].norm(dim=-1), torch.full((len(s),), 4.0))
        assert (s.poses[:, 2, 3] > 0).all()                       # upper hemisphere
    imgs = d["train"].images
    bg = (imgs == 1.0).all(-1)
    assert 0.5 < bg.float().mean() < 0.95                        # background and object
    obj = imgs[~bg]
    assert obj.std(0).min() > 0.1 and (obj.max(-1).values - obj.min(-1).values).mean() > 0.2
    import imageio.v3 as iio
    alpha = iio.imread(os.path.join(root, "train", "r_0.png"))[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255 and ((alpha > 0) & (alpha < 255)).any()
    # data and rays agree: the loaded cameras' pixel-centre rays hit the object in the pixels
    # the PNGs show fully covered and miss it in the transparent ones
    s = d["test"]
    o, dirs = camera_rays(s.poses.double(), s.intrinsics.double(), s.H, s.W)
    hit, _ = _shade(o.reshape(-1, 3), dirs.reshape(-1, 3), _scene())
    alpha = torch.tensor(np.stack([iio.imread(p)[..., 3] for p in s.file_paths])).reshape(-1)
    full, empty = alpha == 255, alpha == 0
    assert full.sum() > 100 and empty.sum() > 100
    assert hit[full].float().mean() > 0.99 and (~hit[empty]).float().mean() > 0.99
    # deterministic; ensure_demo_scene reuses the scene
    root2 = str(tmp_path / "demo2")
    generate_demo_scene(root2, size=24, n_train=6, n_test=4, seed=3)
    for split in ("train", "test"):
        for k in range(4):
            rel = os.path.join(split, f"r_{k}.png")
            assert open(os.path.join(root, rel), "rb").read() == \
                open(os.path.join(root2, rel), "rb").read()
    stamp = os.path.getmtime(os.path.join(root, "transforms_train.json"))
    assert ensure_demo_scene(root, size=24) == root
    assert os.path.getmtime(os.path.join(root, "transforms_train.json")) == stamp


def test_demo_scene_default_folder(tmp_path, monkeypatch):
    """Without a folder the demo scene goes to the user cache, whatever the working folder."""
    monkeypatch.delenv("KILONERF_LBFGS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_demo_dir(24) == str(tmp_path / "xdg" / "kilonerf_lbfgs" / "demo_scene_24")
    monkeypatch.setenv("KILONERF_LBFGS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    root = ensure_demo_scene(size=8, n_train=2, n_test=2)
    assert root == str(tmp_path / "cache" / "demo_scene_8")
    assert len(load_split(root, "train")) == 2


# ----------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_lego_downsampled():
    if not os.path.isfile(os.path.join(LEGO, "transforms_test.json")):
        pytest.skip(f"needs the lego scene in {LEGO}")
    s = load_split(LEGO, "test", downsample=4, every=8)
    assert len(s) == 25 and (s.H, s.W) == (100, 100) and s.images.shape == (25, 100, 100, 3)
    angle = json.load(open(os.path.join(LEGO, "transforms_test.json")))["camera_angle_x"]
    f = 0.5 * 100 / math.tan(0.5 * angle)
    torch.testing.assert_close(s.intrinsics, torch.tensor([f, f, 50.0, 50.0]).expand(25, 4))
    assert abs(f - 138.89) < 0.01
    assert (s.near, s.far) == (2.0, 6.0) and s.scene_box == ((-1.5,) * 3, (1.5,) * 3)
    white = (s.images > 0.99).all(-1).float().mean()
    assert 0.5 < white < 0.95                        # white background around the model
    # every camera looks roughly at the origin
    o, d = camera_rays(s.poses, s.intrinsics, s.H, s.W)
    centre = 50 * 100 + 50
    closest = o[:, centre] - (o[:, centre] * d[:, centre]).sum(-1, keepdim=True) * d[:, centre]
    assert closest.norm(dim=-1).max() < 0.5


FOX_DIST = (0.0578421, -0.0805099, -0.000980296, 0.00015575)   # the fox capture's lens


@pytest.mark.parametrize("dist", [FOX_DIST, (-0.2, 0.05, 0.002, -0.001)])
def test_undistort_matches_opencv_and_inverts_distort(dist):
    from kilonerf_lbfgs.nerf.data.rays import distort, undistort
    K = np.array([[300.0, 0, 160.0], [0, 310.0, 120.0], [0, 0, 1]])
    px = np.stack(np.meshgrid(np.linspace(0, 320, 9), np.linspace(0, 240, 7)), -1).reshape(-1, 2)
    ref = cv2.undistortPoints(px[:, None, :].astype(np.float64), K, np.array(dist),
                              criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100,
                                        1e-12))[:, 0]
    xd = torch.tensor((px[:, 0] - 160.0) / 300.0)
    yd = torch.tensor((px[:, 1] - 120.0) / 310.0)
    d = torch.tensor(dist, dtype=torch.float64)
    x, y = undistort(xd, yd, d, iters=100)
    np.testing.assert_allclose(np.stack([x, y], -1), ref, atol=1e-9)
    xr, yr = distort(x, y, d)
    np.testing.assert_allclose(xr, xd, atol=1e-9)
    np.testing.assert_allclose(yr, yd, atol=1e-9)


def test_distorted_camera_rays_project_back_onto_their_pixels():
    """A ray of a camera with lens distortion, projected by OpenCV's model (pinhole, then the
    distortion), lands on the centre of the pixel it was made for."""
    H, W = 12, 16
    K = (20.0, 21.0, 8.3, 5.9)
    pose = torch.eye(4, dtype=torch.float64)
    o, d = camera_rays(pose, torch.tensor(K, dtype=torch.float64), H, W,
                       torch.tensor(FOX_DIST, dtype=torch.float64) * 4)
    cam = d.numpy() * np.array([1.0, -1.0, -1.0])          # OpenGL -> OpenCV camera axes
    A = np.array([[K[0], 0, K[2]], [0, K[1], K[3]], [0, 0, 1]])
    px, _ = cv2.projectPoints(cam, np.zeros(3), np.zeros(3), A, np.array(FOX_DIST) * 4)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    np.testing.assert_allclose(px[:, 0], np.stack([xx.ravel(), yy.ravel()], -1), atol=1e-5)
    plain = camera_rays(pose, torch.tensor(K, dtype=torch.float64), H, W)[1]
    assert (plain - d).abs().max() > 1e-3                  # the lens does move the rays


def test_instant_ngp_lens_distortion_reaches_the_split_and_its_rays(tmp_path):
    _ngp_scene(str(tmp_path), missing=())
    plain = load_split(str(tmp_path), "train")
    assert plain.distortion is None                        # no k1..p2: a pinhole camera
    path = tmp_path / "transforms.json"
    meta = json.loads(path.read_text())
    meta.update(k1=FOX_DIST[0], k2=FOX_DIST[1], p1=FOX_DIST[2], p2=FOX_DIST[3])
    meta["frames"][1]["k1"] = 0.2                          # a frame's own key wins
    path.write_text(json.dumps(meta))
    s = load_split(str(tmp_path), "train", downsample=2)
    assert s.distortion.shape == (len(s), 4)
    kept = [k for k in range(10) if k % 8]                 # frames 1..7, 9
    assert kept[0] == 1 and float(s.distortion[0, 0]) == pytest.approx(0.2)
    torch.testing.assert_close(s.distortion[1], torch.tensor(FOX_DIST))
    from kilonerf_lbfgs.nerf.data.rays import RayBank
    _, d = camera_rays(s.poses, s.intrinsics, s.H, s.W, s.distortion)
    torch.testing.assert_close(RayBank(s).dirs, d.reshape(-1, 3))     # training rays bend
    _, d0 = camera_rays(s.poses, s.intrinsics, s.H, s.W)
    assert (d - d0).abs().max() > 1e-4


def test_path_poses_glide_through_the_cameras_in_a_chain():
    # four cameras on a line, listed out of order: the path visits them end to end
    eyes = [(0.0, -4.0, 0.0), (2.0, -4.0, 0.0), (1.0, -4.0, 0.0), (3.0, -4.0, 1.0)]
    poses = torch.stack([look_at(e, (e[0], 0.0, 0.0)) for e in eyes])
    path = path_poses(poses, 7)                    # knots at frames 0, 2, 4, 6
    assert path.shape == (7, 4, 4)
    for frame, cam in [(0, 0), (2, 2), (4, 1), (6, 3)]:
        assert torch.allclose(path[frame], poses[cam], atol=1e-5)
    assert torch.allclose(path[1, :3, 3], torch.tensor([0.5, -4.0, 0.0]), atol=1e-5)
    R = path[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(7, 3, 3), atol=1e-5)
    with pytest.raises(ValueError, match="n_frames"):
        path_poses(poses, 0)
