"""Camera poses from your own photos: structure from motion with COLMAP (``pycolmap``), written
as an instant-ngp / nerfstudio ``transforms.json``, and compared with known poses.

:func:`run_sfm` runs COLMAP in-process on the CPU (SIFT features, exhaustive matching,
incremental mapping; one shared OpenCV camera, so the lens distortion ``k1 k2 p1 p2`` is
estimated). :func:`transforms_from_reconstruction` turns the largest model into the
``transforms.json`` layout the loaders read: camera-to-world matrices in the OpenGL/Blender
convention (x right, y up, looking down -z), the intrinsics and distortion, a scene box
(``aabb``) from robust percentiles of the sparse points, and ``near``/``far`` from the points'
depths. :func:`compare_poses` aligns two sets of poses with a similarity transform (Umeyama)
and reports rotation errors in degrees and camera-centre errors as a fraction of the scene.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

# COLMAP camera models -> the transforms.json keys of their parameters, in COLMAP's order
CAMERA_PARAMS = {
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fl_x", "fl_y", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k1"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fl_x", "fl_y", "cx", "cy", "k1", "k2", "p1", "p2"),
}
# COLMAP/OpenCV cameras look down +z with y down; OpenGL/Blender ones down -z with y up
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def run_sfm(image_dir: str, work_dir: str, max_image_size: int = 1600,
            max_features: int = 8192, threads: int = -1):
    """COLMAP on the photos in ``image_dir`` (database and sparse models in ``work_dir``);
    returns the reconstruction with the most registered images. ``ValueError`` when
    nothing could be reconstructed."""
    import pycolmap
    os.makedirs(work_dir, exist_ok=True)
    db = os.path.join(work_dir, "database.db")
    if os.path.exists(db):
        os.remove(db)
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = int(max_image_size)
    extraction.sift.max_num_features = int(max_features)
    extraction.num_threads = int(threads)
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "OPENCV"
    pycolmap.extract_features(db, image_dir, camera_mode=pycolmap.CameraMode.SINGLE,
                              reader_options=reader, extraction_options=extraction,
                              device=pycolmap.Device.cpu)
    pycolmap.match_exhaustive(db)
    models = pycolmap.incremental_mapping(db, image_dir, os.path.join(work_dir, "sparse"))
    if not models:
        raise ValueError(f"{image_dir}: COLMAP registered no images (too few photos, too "
                         f"little overlap or texture)")
    return max(models.values(), key=lambda r: r.num_reg_images())


def load_reconstruction(sparse_dir: str):
    """An existing COLMAP sparse model (``cameras``, ``images``, ``points3D`` .bin or .txt)."""
    import pycolmap
    try:
        return pycolmap.Reconstruction(sparse_dir)
    except Exception as e:  # noqa: BLE001 - any reader failure is the folder's
        raise ValueError(f"{sparse_dir} is not a COLMAP sparse model ({e})") from None


def camera_intrinsics(camera) -> Dict[str, float]:
    """``fl_x fl_y cx cy w h`` (and ``k1 k2 p1 p2`` where the model has them) of a COLMAP
    camera; ``ValueError`` for a model without a ``transforms.json`` equivalent."""
    name = camera.model.name if hasattr(camera.model, "name") else str(camera.model)
    if name not in CAMERA_PARAMS:
        raise ValueError(f"COLMAP camera model {name} is not supported; use one of "
                         f"{', '.join(CAMERA_PARAMS)}")
    vals = dict(zip(CAMERA_PARAMS[name], (float(v) for v in camera.params)))
    if "f" in vals:
        vals["fl_x"] = vals["fl_y"] = vals.pop("f")
    out = {"camera_model": "OPENCV", "w": int(camera.width), "h": int(camera.height),
           **{k: vals[k] for k in ("fl_x", "fl_y", "cx", "cy")}}
    for k in ("k1", "k2", "p1", "p2"):
        out[k] = vals.get(k, 0.0)
    return out


def _c2w_opengl(image) -> np.ndarray:
    """``[4, 4]`` camera-to-world in the OpenGL convention from a COLMAP image."""
    pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
    w2c = np.eye(4)
    w2c[:3, :4] = np.asarray(pose.matrix())
    return np.linalg.inv(w2c) @ OPENCV_TO_OPENGL


def transforms_from_reconstruction(rec, image_prefix: str = "images",
                                   percentiles: Sequence[float] = (2.0, 98.0),
                                   margin: float = 0.1) -> Dict:
    """The reconstruction as a ``transforms.json`` dict (frames sorted by file name).

    The box: per axis the ``percentiles`` of the sparse points (robust to stray points),
    widened by ``margin`` of its size on each side. ``near``/``far``: half the 1st and
    1.5x the 99th percentile of the points' depths in the cameras that see them."""
    cams = list(rec.cameras.values())
    if len(cams) != 1:
        raise ValueError(f"the model has {len(cams)} cameras; colmap2nerf writes one shared "
                         f"camera (run it with one camera for all photos)")
    meta = camera_intrinsics(cams[0])
    frames, depths = [], []
    pts = np.asarray([p.xyz for p in rec.points3D.values()], dtype=np.float64)
    for image in sorted(rec.images.values(), key=lambda im: im.name):
        if hasattr(image, "has_pose") and not image.has_pose:
            continue
        c2w = _c2w_opengl(image)
        frames.append({"file_path": f"{image_prefix}/{image.name}",
                       "transform_matrix": c2w.tolist()})
        if len(pts):
            rel = pts - c2w[:3, 3]
            d = rel @ -c2w[:3, 2]                   # depth along the viewing direction
            depths.append(d[d > 0])
    if not frames:
        raise ValueError("the model has no registered images")
    if len(pts) >= 8:
        lo, hi = np.percentile(pts, percentiles[0], axis=0), np.percentile(pts, percentiles[1],
                                                                          axis=0)
        pad = margin * (hi - lo)
        meta["aabb"] = [(lo - pad).tolist(), (hi + pad).tolist()]
    dep = np.concatenate(depths) if depths else np.zeros(0)
    if dep.size >= 8:
        meta["near"] = float(0.5 * np.percentile(dep, 1.0))
        meta["far"] = float(1.5 * np.percentile(dep, 99.0))
    meta["frames"] = frames
    return meta


def umeyama(src: np.ndarray, dst: np.ndarray):
    """Similarity ``(s, R, t)`` minimising ``|| s R src_i + t - dst_i ||^2`` over points
    ``[N, 3]`` (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[2, 2] = -1.0
    r = u @ fix @ vt
    var = (a ** 2).sum() / len(src)
    s = float(np.trace(np.diag(sig) @ fix) / max(var, 1e-300))
    return s, r, mu_d - s * r @ mu_s


def compare_poses(ours: Dict[str, np.ndarray], reference: Dict[str, np.ndarray]) -> Dict:
    """Camera-to-world ``[4, 4]`` matrices by file name (both in one camera convention):
    the similarity that best maps our camera centres onto the reference's, then per camera
    the rotation error (degrees) and the centre error as a fraction of the scene size (the
    diagonal of the reference centres' bounding box)."""
    names = sorted(set(ours) & set(reference))
    if len(names) < 3:
        raise ValueError(f"only {len(names)} cameras in common; need at least 3")
    c_ours = np.stack([ours[n][:3, 3] for n in names])
    c_ref = np.stack([reference[n][:3, 3] for n in names])
    s, r, t = umeyama(c_ours, c_ref)
    size = float(np.linalg.norm(c_ref.max(0) - c_ref.min(0)))
    rot_err, pos_err = [], []
    for n, co, cr in zip(names, c_ours, c_ref):
        r_al = r @ ours[n][:3, :3]
        cos = (np.trace(reference[n][:3, :3].T @ r_al) - 1.0) / 2.0
        rot_err.append(math.degrees(math.acos(min(1.0, max(-1.0, cos)))))
        pos_err.append(float(np.linalg.norm(s * r @ co + t - cr)) / max(size, 1e-300))
    rot, pos = np.asarray(rot_err), np.asarray(pos_err)
    return {"cameras": len(names), "scale": s, "scene_size": size,
            "rotation_deg_median": float(np.median(rot)), "rotation_deg_max": float(rot.max()),
            "centre_err_median": float(np.median(pos)), "centre_err_max": float(pos.max())}


def poses_by_name(transforms: Dict, names_only: Optional[List[str]] = None
                  ) -> Dict[str, np.ndarray]:
    """``{file name: [4, 4] camera-to-world}`` of a ``transforms.json`` dict."""
    out = {}
    for f in transforms["frames"]:
        name = os.path.basename(f["file_path"])
        if names_only is None or name in names_only:
            out[name] = np.asarray(f["transform_matrix"], dtype=np.float64)
    return out


__all__ = ["run_sfm", "load_reconstruction", "camera_intrinsics",
           "transforms_from_reconstruction", "umeyama", "compare_poses", "poses_by_name"]
