"""Own photos: COLMAP models -> transforms.json, and the pose comparison (Umeyama)."""
import json
import math
import os

import numpy as np
import pytest

from conftest import SHARED_DATA
from kilonerf_lbfgs.nerf.data.colmap import (camera_intrinsics, compare_poses, poses_by_name,
                                             umeyama)


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 3))
    r, s, t = random_rotation(rng), 2.7, np.array([1.0, -2.0, 0.5])
    s2, r2, t2 = umeyama(src, s * src @ r.T + t)
    assert s2 == pytest.approx(s) and np.allclose(r2, r) and np.allclose(t2, t)


def test_compare_poses_is_zero_for_a_similar_copy_and_sees_a_tilted_camera():
    rng = np.random.default_rng(1)
    ref = {}
    for i in range(8):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = random_rotation(rng), rng.normal(size=3) * 3
        ref[f"{i:04d}.jpg"] = m
    r, s, t = random_rotation(rng), 0.4, np.array([5.0, 1.0, -1.0])
    ours = {}
    for k, m in ref.items():                         # the same rig in another frame
        o = np.eye(4)
        o[:3, :3], o[:3, 3] = r.T @ m[:3, :3], r.T @ (m[:3, 3] - t) / s
        ours[k] = o
    out = compare_poses(ours, ref)
    assert out["rotation_deg_max"] < 1e-4 and out["centre_err_max"] < 1e-9
    assert out["scale"] == pytest.approx(s)
    a = math.radians(3.0)                            # tilt one camera by 3 degrees
    tilt = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ours["0003.jpg"] = ours["0003.jpg"].copy()
    ours["0003.jpg"][:3, :3] = ours["0003.jpg"][:3, :3] @ tilt
    assert compare_poses(ours, ref)["rotation_deg_max"] == pytest.approx(3.0, abs=1e-6)


def test_camera_models_map_to_transforms_keys():
    class Cam:
        def __init__(self, model, params):
            self.model, self.params, self.width, self.height = model, params, 640, 480
    out = camera_intrinsics(Cam("SIMPLE_RADIAL", [500.0, 320.0, 240.0, 0.01]))
    assert (out["fl_x"], out["fl_y"], out["cx"], out["k1"], out["p1"]) == (500, 500, 320, 0.01, 0)
    out = camera_intrinsics(Cam("OPENCV", [500.0, 501.0, 320.0, 240.0, 0.1, -0.2, 0.001, 0.002]))
    assert (out["fl_y"], out["k2"], out["p2"]) == (501.0, -0.2, 0.002)
    with pytest.raises(ValueError, match="FISHEYE"):
        camera_intrinsics(Cam("FISHEYE", [1.0]))


@pytest.mark.realdata
def test_colmap_on_fox_photos_agrees_with_the_given_poses(tmp_path, script):
    """COLMAP on 12 of the fox photos: every one registered, and after a similarity
    alignment the poses agree with instant-ngp's COLMAP poses within 2 degrees and 1% of the
    scene; the written transforms.json loads with a held-out test split."""
    pytest.importorskip("pycolmap")
    fox = os.path.join(SHARED_DATA, "nerf_real", "fox")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in sorted(os.listdir(os.path.join(fox, "images")))[:12]:
        os.symlink(os.path.join(fox, "images", name), photos / name)
    out = tmp_path / "scene"
    r = script("colmap2nerf.py", "--images", photos, "--out", out, "--max_image_size", 800,
               "--compare", os.path.join(fox, "transforms.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    agreement = json.loads((out / "pose_agreement.json").read_text())
    assert agreement["registered"] == 12
    assert agreement["rotation_deg_median"] < 2.0 and agreement["centre_err_median"] < 0.01
    from kilonerf_lbfgs.nerf.data.loaders import load_dataset
    data = load_dataset(str(out), downsample=8)
    assert len(data["train"]) + len(data["test"]) == 12 and len(data["test"]) >= 1
    meta = json.loads((out / "transforms.json").read_text())
    assert poses_by_name(meta).keys() == {f.name for f in photos.iterdir()}
