"""Posed images for NeRF: the Blender / NeRF-synthetic format and instant-ngp's transforms.json.

Blender format (``transforms_{train,val,test}.json``): ``camera_angle_x`` (horizontal field of
view, radians) and ``frames``, each with ``file_path`` (relative to the data folder; without an
extension it means ``.png``) and ``transform_matrix`` (camera-to-world, OpenGL convention: +x
right, +y up, the camera looks down -z). The focal length is ``0.5 * W / tan(0.5 *
camera_angle_x)`` at whatever width the images are loaded, with square pixels and the
principal point at the image centre.

instant-ngp format (used when ``transforms_{split}.json`` is absent and ``transforms.json``
exists): intrinsics ``fl_x, fl_y, cx, cy, w, h`` per frame or global (a frame's own keys win;
``camera_angle_x`` / ``camera_angle_y`` stand in for a missing focal; ``cx, cy`` default to the
centre; ``w, h`` to the image's size, and the intrinsics are rescaled when the image is of a
different size than ``w, h``); OpenCV lens distortion ``k1, k2, p1, p2`` (per frame or
global) goes to :attr:`NerfSplit.distortion`, and the rays undistort. Frames whose image
file is missing are skipped with one warning that counts them. The file has no splits: ``test`` and ``val`` are every 8th frame (frames 0,
8, 16, ...) and ``train`` is every other frame, so the test views are held out (the LLFF and
nerfstudio protocol).

Both formats: RGBA images are composited on ``background`` (white by default), then resampled
by area averaging when ``downsample`` or ``img_wh`` asks for another size; optional ``near``,
``far`` and ``aabb`` (``[[x0, y0, z0], [x1, y1, z1]]``) or ``aabb_scale`` (instant-ngp: a box of
half-size ``1.5 * aabb_scale``) keys override near 2, far 6 and the box ``[-1.5, 1.5]^3``.
Every problem with the input raises ``FileNotFoundError`` (a missing folder, transforms file
or image) or ``ValueError`` (bad content or arguments) with one line that names the file and
what to do.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...images import read_image, resize_area

SPLITS = ("train", "val", "test")
NGP_TEST_STRIDE = 8          # instant-ngp transforms.json: test/val = every 8th frame,
                             # train = the others
DEFAULT_NEAR, DEFAULT_FAR = 2.0, 6.0
DEFAULT_BOX = ((-1.5, -1.5, -1.5), (1.5, 1.5, 1.5))
DATA_HINT = ("get the NeRF-synthetic dataset (e.g. nerf_synthetic/lego from the original NeRF "
             "release) and point at its scene folder")

Box = Tuple[Tuple[float, float, float], Tuple[float, float, float]]


@dataclass
class NerfSplit:
    """One split of a scene, every image at one size ``H x W``.

    Attributes:
        images: ``[N, H, W, 3]`` float32 in [0, 1], RGBA composited on the background colour.
        poses: ``[N, 4, 4]`` float32 camera-to-world (OpenGL / Blender convention).
        intrinsics: ``[N, 4]`` float32 ``(fx, fy, cx, cy)`` in pixels at ``H x W``.
        near, far: ray interval.
        file_paths: ``N`` image paths as found on disk.
        scene_box: ``((x0, y0, z0), (x1, y1, z1))`` box holding the scene.
        distortion: ``[N, 4]`` float32 OpenCV lens distortion ``(k1, k2, p1, p2)``, or
            ``None`` for pinhole cameras (the rays undistort, see
            :func:`~kilonerf_lbfgs.nerf.data.rays.camera_rays`).
    """
    images: torch.Tensor
    poses: torch.Tensor
    intrinsics: torch.Tensor
    H: int
    W: int
    near: float
    far: float
    file_paths: List[str]
    scene_box: Box
    distortion: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---------------------------------------------------------------------------------- helpers

def _read_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export or re-download it") from e
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror}); check its permissions") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object with \"frames\"; it holds a "
                        f"{type(meta).__name__}")
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise ValueError(f"{path} lacks a \"frames\" list; it is not a NeRF transforms file")
    return meta


def _number(meta: dict, key: str, path: str, where: str = "") -> Optional[float]:
    """``meta[key]`` as a finite float, None when absent."""
    if key not in meta or meta[key] is None:
        return None
    try:
        v = float(meta[key])
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v):
        raise ValueError(f"{path}: {where}\"{key}\" must be a finite number, got {meta[key]!r}")
    return v


def _pose(frame: dict, path: str, i: int) -> np.ndarray:
    """``[4, 4]`` float64 camera-to-world matrix of frame ``i`` (``3 x 4`` is completed)."""
    if "transform_matrix" not in frame:
        raise ValueError(f"{path}: frame {i} lacks \"transform_matrix\"; every frame needs its "
                        f"camera-to-world matrix")
    try:
        m = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        m = np.zeros((0,))
    if m.shape == (3, 4):
        m = np.concatenate([m, [[0.0, 0.0, 0.0, 1.0]]], 0)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise ValueError(f"{path}: frame {i} \"transform_matrix\" must be a finite 4x4 (or 3x4) "
                        f"matrix, got shape {m.shape}")
    return m


def _image_path(datadir: str, frame: dict, path: str, i: int) -> str:
    """Where frame ``i``'s image should be (``.png`` added to a path without extension)."""
    rel = frame.get("file_path")
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{path}: frame {i} lacks a \"file_path\" string naming its image")
    full = os.path.normpath(os.path.join(datadir, rel))
    if os.path.splitext(full)[1] == "" or (not os.path.isfile(full)
                                           and os.path.isfile(full + ".png")):
        return full + ".png"
    return full


def _target_size(W0: int, H0: int, downsample: int,
                 img_wh: Optional[Tuple[int, int]], where: str) -> Tuple[int, int]:
    if img_wh is not None:
        W, H = int(img_wh[0]), int(img_wh[1])
        if W < 1 or H < 1:
            raise ValueError(f"img_wh {W} {H}: width and height must be positive")
        return W, H
    W, H = W0 // downsample, H0 // downsample
    if W < 1 or H < 1:
        raise ValueError(f"downsample {downsample} is too large for the {W0}x{H0} images of "
                        f"{where}")
    return W, H


def _scene_box(meta: dict, path: str) -> Box:
    if "aabb" in meta:
        try:
            box = np.asarray(meta["aabb"], dtype=np.float64)
        except (TypeError, ValueError):
            box = np.zeros((0,))
        if box.shape != (2, 3) or not np.isfinite(box).all() or not (box[1] > box[0]).all():
            raise ValueError(f"{path}: \"aabb\" must be [[x0, y0, z0], [x1, y1, z1]] with "
                            f"x1 > x0, y1 > y0, z1 > z0")
        return tuple(map(float, box[0])), tuple(map(float, box[1]))  # type: ignore[return-value]
    scale = _number(meta, "aabb_scale", path)
    if scale is not None:
        if scale <= 0:
            raise ValueError(f"{path}: \"aabb_scale\" must be positive, got {scale}")
        h = 1.5 * scale
        return (-h, -h, -h), (h, h, h)
    return DEFAULT_BOX


def _near_far(meta: dict, path: str) -> Tuple[float, float]:
    near = _number(meta, "near", path)
    near = _number(meta, "near_plane", path) if near is None else near
    far = _number(meta, "far", path)
    far = _number(meta, "far_plane", path) if far is None else far
    near = DEFAULT_NEAR if near is None else near
    far = DEFAULT_FAR if far is None else far
    if not 0.0 <= near < far:
        raise ValueError(f"{path}: near ({near}) and far ({far}) must satisfy 0 <= near < far")
    return near, far


def _check_options(downsample: int, every: int) -> None:
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    if int(every) != every or every < 1:
        raise ValueError(f"test_every must be a positive integer, got {every}")


# ------------------------------------------------------------------------------ the formats

def _blender_frames(datadir: str, path: str, meta: dict):
    """Per frame: ``(image path, pose [4,4], intrinsics fn (W0, H0) -> (fx, fy, cx, cy))``."""
    angle = _number(meta, "camera_angle_x", path)
    if angle is None:
        raise ValueError(f"{path} lacks \"camera_angle_x\" (the horizontal field of view in "
                        f"radians) needed for the focal length")
    if not 0.0 < angle < math.pi:
        raise ValueError(f"{path}: \"camera_angle_x\" must be in (0, pi) radians, got {angle}")

    def intr(W0: int, H0: int) -> Tuple[float, float, float, float]:
        f = 0.5 * W0 / math.tan(0.5 * angle)
        return f, f, 0.5 * W0, 0.5 * H0

    out = []
    for i, fr in enumerate(meta["frames"]):
        if not isinstance(fr, dict):
            raise ValueError(f"{path}: frame {i} is not a JSON object")
        img = _image_path(datadir, fr, path, i)
        if not os.path.isfile(img):
            raise FileNotFoundError(f"{path}: frame {i}'s image {img} does not exist; restore the "
                            f"image or remove the frame")
        out.append((img, _pose(fr, path, i), intr))
    return out, 0


def _ngp_frames(datadir: str, path: str, meta: dict, split: str):
    """Like ``_blender_frames`` for instant-ngp's transforms.json; also the missing count."""
    out, missing = [], 0
    for i, fr in enumerate(meta["frames"]):
        if (split == "train") == (i % NGP_TEST_STRIDE == 0):      # test frames held out
            continue
        if not isinstance(fr, dict):
            raise ValueError(f"{path}: frame {i} is not a JSON object")
        img = _image_path(datadir, fr, path, i)
        if not os.path.isfile(img):
            missing += 1
            continue
        vals = {}
        for key in ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y"):
            v = _number(fr, key, path, f"frame {i} ")
            vals[key] = _number(meta, key, path) if v is None else v
        if vals["fl_x"] is None and vals["fl_y"] is None and vals["camera_angle_x"] is None \
                and vals["camera_angle_y"] is None:
            raise ValueError(f"{path} gives no focal length for frame {i}: add \"fl_x\" (pixels) "
                            f"or \"camera_angle_x\" (radians), globally or per frame")

        def intr(W0: int, H0: int, v=dict(vals)) -> Tuple[float, float, float, float]:
            w = v["w"] if v["w"] is not None else W0
            h = v["h"] if v["h"] is not None else H0
            fx, fy = v["fl_x"], v["fl_y"]
            if fx is None and v["camera_angle_x"] is not None:
                fx = 0.5 * w / math.tan(0.5 * v["camera_angle_x"])
            if fy is None and v["camera_angle_y"] is not None:
                fy = 0.5 * h / math.tan(0.5 * v["camera_angle_y"])
            fx = fy if fx is None else fx
            fy = fx if fy is None else fy
            cx = 0.5 * w if v["cx"] is None else v["cx"]
            cy = 0.5 * h if v["cy"] is None else v["cy"]
            sx, sy = W0 / w, H0 / h                  # intrinsics given for another image size
            return fx * sx, fy * sy, cx * sx, cy * sy

        dist = []                                   # OpenCV k1 k2 p1 p2 (0: none)
        for key in ("k1", "k2", "p1", "p2"):
            v = _number(fr, key, path, f"frame {i} ")
            v = _number(meta, key, path) if v is None else v
            dist.append(0.0 if v is None else v)
        out.append((img, _pose(fr, path, i), intr, dist))
    return out, missing


# -------------------------------------------------------------------------------- public API

def transforms_file(datadir: str, split: str) -> Tuple[str, str]:
    """``(path, format)`` of the transforms file for ``split``; format is ``"blender"`` or
    ``"ngp"``. Raises ``FileNotFoundError`` when the folder or the file is missing."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not os.path.isdir(datadir):
        raise FileNotFoundError(f"data folder {datadir} does not exist; {DATA_HINT}")
    path = os.path.join(datadir, f"transforms_{split}.json")
    if os.path.isfile(path):
        return path, "blender"
    ngp = os.path.join(datadir, "transforms.json")
    if os.path.isfile(ngp):
        return ngp, "ngp"
    raise FileNotFoundError(f"{path} does not exist (nor {ngp}); the data folder must be a scene "
                    f"folder holding transforms_{split}.json, e.g. nerf_synthetic/lego")


def load_split(datadir: str, split: str, downsample: int = 1,
               img_wh: Optional[Tuple[int, int]] = None,
               background: Sequence[float] = (1.0, 1.0, 1.0), every: int = 1) -> NerfSplit:
    """Load one split (``"train"``, ``"val"`` or ``"test"``) of the scene in ``datadir``.

    Args:
        downsample: integer factor; images become ``(W0 // downsample) x (H0 // downsample)``.
        img_wh: ``(W, H)`` to load the images at instead (wins over ``downsample``).
        background: RGB colour in [0, 1] the alpha channel is composited on.
        every: keep frames ``0, every, 2 * every, ...`` (after instant-ngp's test stride).

    Returns:
        :class:`NerfSplit` with ``images [N, H, W, 3]``, ``poses [N, 4, 4]``,
        ``intrinsics [N, 4]``.
    """
    _check_options(downsample, every)
    if len(tuple(background)) != 3:
        raise ValueError(f"background must be an RGB triple, got {background!r}")
    path, fmt = transforms_file(datadir, split)
    meta = _read_json(path)
    if fmt == "blender":
        frames, missing = _blender_frames(datadir, path, meta)
    else:
        frames, missing = _ngp_frames(datadir, path, meta, split)
    if missing:
        warnings.warn(f"{path}: skipped {missing} frame(s) of split {split!r} whose image file "
                      f"is missing", stacklevel=2)
    frames = frames[::every]
    if not frames:
        raise ValueError(f"{path} has no usable frames for split {split!r}; it needs frames "
                        f"whose image files exist")

    images, poses, intrinsics, paths, dists = [], [], [], [], []
    first: Optional[Tuple[str, int, int]] = None
    W = H = 0
    for img_path, pose, intr, *dist in frames:
        dists.append(tuple(dist[0]) if dist and dist[0] is not None else (0.0,) * 4)
        img = read_image(img_path, background, rgb=True)
        H0, W0 = img.shape[:2]
        if first is None:
            first = (img_path, W0, H0)
            W, H = _target_size(W0, H0, downsample, img_wh, path)
        elif (W0, H0) != first[1:]:
            raise ValueError(f"image {img_path} is {W0}x{H0} but {first[0]} is "
                            f"{first[1]}x{first[2]}; every image of a scene must have one size")
        fx, fy, cx, cy = intr(W0, H0)
        sx, sy = W / W0, H / H0
        intrinsics.append((fx * sx, fy * sy, cx * sx, cy * sy))
        images.append(resize_area(img, W, H))
        poses.append(pose)
        paths.append(img_path)
    near, far = _near_far(meta, path)
    return NerfSplit(images=torch.from_numpy(np.stack(images)).float(),
                     poses=torch.from_numpy(np.stack(poses)).float(),
                     intrinsics=torch.tensor(intrinsics, dtype=torch.float32),
                     H=int(H), W=int(W), near=near, far=far, file_paths=paths,
                     scene_box=_scene_box(meta, path),
                     distortion=torch.tensor(dists, dtype=torch.float32)
                     if any(any(d) for d in dists) else None)


def load_dataset(datadir: str, downsample: int = 1, img_wh: Optional[Tuple[int, int]] = None,
                 background: Sequence[float] = (1.0, 1.0, 1.0),
                 test_every: int = 1) -> Dict[str, NerfSplit]:
    """``{"train", "test"}`` splits, plus ``"val"`` when a Blender scene has
    ``transforms_val.json`` (an instant-ngp scene's val would repeat its test split).

    ``test_every`` thins the test and val splits (every k-th frame); train keeps every frame.
    A missing-image warning is given per split.
    """
    _check_options(downsample, test_every)
    kw = dict(downsample=downsample, img_wh=img_wh, background=background)
    out = {"train": load_split(datadir, "train", **kw)}
    _, fmt = transforms_file(datadir, "test")
    if fmt == "ngp":                 # val would repeat test
        out["test"] = load_split(datadir, "test", every=test_every, **kw)
        return out
    out["test"] = load_split(datadir, "test", every=test_every, **kw)
    if os.path.isfile(os.path.join(datadir, "transforms_val.json")):
        out["val"] = load_split(datadir, "val", every=test_every, **kw)
    return out
