"""Camera rays in the OpenGL / Blender convention, and camera paths.

A camera-to-world pose ``[4, 4]`` maps camera coordinates to the world: the camera looks down
its own ``-z`` axis, ``+x`` points right in the image and ``+y`` points up. Pixel ``(row r,
column c)`` has its centre at ``(x, y) = (c + 0.5, r + 0.5)`` in pixel units, and the camera
direction through image point ``(x, y)`` is ``((x - cx) / fx, -(y - cy) / fy, -1)``: the image
centre ``(cx, cy) = (W / 2, H / 2)`` looks exactly along the camera's ``-z`` axis, image rows go
downwards (hence the minus on y). Rays are ordered row-major (row, then column), the order of
``images.reshape(N, H * W, 3)``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:
    from .loaders import NerfSplit


def distort(x: torch.Tensor, y: torch.Tensor, dist: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenCV lens distortion of normalised image points ``x, y [...]`` (y down) with
    ``dist [..., 4] = (k1, k2, p1, p2)``: the points where the lens images them."""
    k1, k2, p1, p2 = dist.unbind(-1)
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def undistort(xd: torch.Tensor, yd: torch.Tensor, dist: torch.Tensor, iters: int = 20
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`distort` by fixed-point iteration (as OpenCV's
    ``undistortPoints``): the ideal pinhole points whose distorted images are ``xd, yd``."""
    k1, k2, p1, p2 = dist.unbind(-1)
    x, y = xd, yd
    for _ in range(iters):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        x, y = (xd - dx) / radial, (yd - dy) / radial
    return x, y


def _directions(poses: torch.Tensor, intrinsics: torch.Tensor,
                x: torch.Tensor, y: torch.Tensor,
                distortion: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unit world directions ``[..., 3]`` through image points ``x, y [...]``.

    ``poses [..., 4, 4]``, ``intrinsics [..., 4]`` and ``distortion [..., 4]`` (OpenCV
    ``k1 k2 p1 p2``, optional) broadcast against ``x`` and ``y``.
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    xn, yn = (x - cx) / fx, (y - cy) / fy
    if distortion is not None:
        xn, yn = undistort(xn, yn, distortion)
    u, v = torch.broadcast_tensors(xn, -yn)
    d_cam = torch.stack([u, v, -torch.ones_like(u)], -1)
    d = (poses[..., :3, :3] @ d_cam.unsqueeze(-1)).squeeze(-1)
    return d / d.norm(dim=-1, keepdim=True)


def camera_rays(poses: torch.Tensor, intrinsics: torch.Tensor, H: int, W: int,
                distortion: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rays through every pixel centre of ``N`` cameras.

    Args:
        poses: ``[N, 4, 4]`` (or ``[4, 4]``) camera-to-world matrices (``[N, 3, 4]`` also works).
        intrinsics: ``[N, 4]`` (or ``[4]``, shared by all cameras) ``(fx, fy, cx, cy)`` in
            pixels at resolution ``H x W``.
        H, W: image height and width in pixels.
        distortion: optional ``[N, 4]`` (or ``[4]``) OpenCV ``(k1, k2, p1, p2)``: each pixel's
            ray is the undistorted one (the ray the lens bent onto that pixel).

    Returns:
        ``(origins, directions)``, each ``[N, H * W, 3]`` (``[H * W, 3]`` for a single pose),
        in the dtype and on the device of ``poses``; directions have unit norm.
    """
    single = poses.dim() == 2
    P = poses.unsqueeze(0) if single else poses
    K = torch.as_tensor(intrinsics, dtype=P.dtype, device=P.device)
    K = K.expand(P.shape[0], 4) if K.dim() == 1 else K
    if K.shape != (P.shape[0], 4):
        raise ValueError(f"camera_rays: intrinsics {tuple(K.shape)} do not match "
                         f"{P.shape[0]} poses")
    rows = torch.arange(H, dtype=P.dtype, device=P.device) + 0.5
    cols = torch.arange(W, dtype=P.dtype, device=P.device) + 0.5
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    x, y = xx.reshape(1, -1), yy.reshape(1, -1)                      # [1, H*W]
    D = None
    if distortion is not None:
        D = torch.as_tensor(distortion, dtype=P.dtype, device=P.device)
        D = (D.expand(P.shape[0], 4) if D.dim() == 1 else D)[:, None]
    dirs = _directions(P[:, None], K[:, None], x, y, D)              # [N, H*W, 3]
    origins = P[:, None, :3, 3].expand_as(dirs)
    if single:
        return origins[0], dirs[0]
    return origins, dirs


def look_at(eye: Sequence[float], center: Sequence[float] = (0.0, 0.0, 0.0),
            up: Sequence[float] = (0.0, 0.0, 1.0), dtype=torch.float32) -> torch.Tensor:
    """``[4, 4]`` camera-to-world pose at ``eye`` whose ``-z`` axis points at ``center`` and
    whose ``+y`` axis is as close to ``up`` as possible (another up is used when looking
    straight along ``up``)."""
    eye_t = torch.as_tensor(eye, dtype=torch.float64)
    fwd = torch.as_tensor(center, dtype=torch.float64) - eye_t
    if float(fwd.norm()) == 0.0:
        raise ValueError("look_at: eye and center coincide")
    fwd = fwd / fwd.norm()
    up_t = torch.as_tensor(up, dtype=torch.float64)
    right = torch.linalg.cross(fwd, up_t)
    if float(right.norm()) < 1e-9 * max(float(up_t.norm()), 1e-30):
        right = torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
        if float(right.norm()) < 1e-9:
            right = torch.linalg.cross(fwd, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    cam_up = torch.linalg.cross(right, fwd)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, cam_up, -fwd, eye_t
    return pose.to(dtype)


def sphere_position(radius: float, azimuth_rad: float, elevation_rad: float,
                    center: Sequence[float] = (0.0, 0.0, 0.0)) -> Tuple[float, float, float]:
    """Point at ``radius`` from ``center``; azimuth about the world z axis (from +x towards
    +y), elevation above the xy plane."""
    ce = math.cos(elevation_rad)
    return (center[0] + radius * ce * math.cos(azimuth_rad),
            center[1] + radius * ce * math.sin(azimuth_rad),
            center[2] + radius * math.sin(elevation_rad))


def orbit_poses(n_frames: int, radius: float = 4.0, elevation_deg: float = 30.0,
                center: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """``[n_frames, 4, 4]`` float32 cameras evenly spaced on a circle about the world z axis
    (the Blender world is z-up), ``elevation_deg`` above the horizontal plane through
    ``center``, all looking at ``center`` with camera ``+y`` towards world ``+z``. Frame ``k``
    sits at azimuth ``360 k / n_frames`` degrees (the circle is not closed: frame 0 is not
    repeated, so the frames loop seamlessly)."""
    if n_frames < 1:
        raise ValueError(f"orbit_poses: n_frames must be positive, got {n_frames}")
    el = math.radians(elevation_deg)
    poses = [look_at(sphere_position(radius, 2.0 * math.pi * k / n_frames, el, center), center)
             for k in range(n_frames)]
    return torch.stack(poses)


def path_poses(poses: torch.Tensor, n_frames: int) -> torch.Tensor:
    """``[n_frames, 4, 4]`` float32 cameras gliding through the cameras ``poses [N, 4, 4]``
    (e.g. a capture's training views): visited nearest-neighbour first from the first one,
    positions interpolated linearly and orientations by spherical interpolation between
    consecutive ones. The video for forward-facing captures, where an orbit would look at
    what no photo saw."""
    from scipy.spatial.transform import Rotation, Slerp

    if n_frames < 1:
        raise ValueError(f"path_poses: n_frames must be positive, got {n_frames}")
    P = poses.detach().cpu().double().numpy()
    if len(P) == 1:
        return torch.as_tensor(P, dtype=torch.float32).expand(n_frames, 4, 4).clone()
    centres = P[:, :3, 3]
    order, left = [0], set(range(1, len(P)))
    while left:                                     # a greedy chain: no jumps across the set
        last = centres[order[-1]]
        nxt = min(left, key=lambda j: float(((centres[j] - last) ** 2).sum()))
        order.append(nxt)
        left.remove(nxt)
    P = P[order]
    knots = np.arange(len(P), dtype=np.float64)
    s = np.linspace(0.0, len(P) - 1.0, n_frames)
    rot = Slerp(knots, Rotation.from_matrix(P[:, :3, :3]))(s).as_matrix()
    pos = np.stack([np.interp(s, knots, P[:, i, 3]) for i in range(3)], -1)
    out = np.tile(np.eye(4), (n_frames, 1, 1))
    out[:, :3, :3], out[:, :3, 3] = rot, pos
    return torch.as_tensor(out, dtype=torch.float32)


class RayBank:
    """Every training ray, flattened: ``origins``, ``dirs``, ``rgbs`` ``[N * H * W, 3]``."""

    def __init__(self, split: NerfSplit, device=None):
        o, d = camera_rays(split.poses, split.intrinsics, split.H, split.W, split.distortion)
        self.origins = o.reshape(-1, 3).to(device)
        self.dirs = d.reshape(-1, 3).to(device)
        self.rgbs = split.images.reshape(-1, 3).to(device)

    def __len__(self) -> int:
        return int(self.rgbs.shape[0])

    def sample(self, n: int, generator: torch.Generator):
        """``n`` random rays: (origins, dirs, rgbs), each ``[n, 3]``."""
        idx = torch.randint(len(self), (n,), generator=generator).to(self.rgbs.device)
        return self.origins[idx], self.dirs[idx], self.rgbs[idx]
