"""A NeRF scene rendered from any triangle mesh: a scene of your own making.

The mesh is turned z-up (from y-up, as most mesh files are, unless ``up="z"``), centred and
scaled so its longest side is 1.6 (inside the ``[-1, 1]^3`` box), given a procedural 3-D checker texture (two colours, ``checker`` squares across the
object), lit like the demo scene (two directional lights, Lambert, ambient) and ray traced
with libigl's AABB tree, ``supersample^2`` rays per pixel, area-averaged to RGBA with a
transparent background. The cameras, splits and file layout are the demo scene's (Blender
format), so every tool that reads the demo scene reads this one.

Example::

    from kilonerf_lbfgs.nerf.data.mesh_scene import generate_mesh_scene
    generate_mesh_scene("../shared/data/meshes/spot.obj", "datasets/spot_scene", size=64)
    # python scripts/train_nerf.py --config demo.txt --demo_scene false --datadir datasets/spot_scene
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .demo_scene import AMBIENT, CAMERA_ANGLE_X, LIGHTS, SUPERSAMPLE, write_scene
from .rays import camera_rays

EXTENT = 1.6                    # longest side of the object in world units
COLOURS = ((0.85, 0.35, 0.15), (0.2, 0.45, 0.8))
GROUND_PALETTE = np.array([(0.25, 0.22, 0.18), (0.75, 0.7, 0.55), (0.45, 0.55, 0.35),
                           (0.9, 0.88, 0.82)])


def ground_albedo(xy: np.ndarray, seed: int = 7) -> np.ndarray:
    """``[M, 3]`` colours of a non-repeating procedural texture at ground points ``xy [M, 2]``:
    a sum of 24 plane waves (random directions, 1 to 24 cycles per unit, fixed ``seed``)
    through a 4-colour palette. Detail at every scale and no period, so feature matchers
    (COLMAP's SIFT) find distinct points on it."""
    rng = np.random.default_rng(seed)
    ang = rng.uniform(0, 2 * np.pi, 24)
    freq = 2 * np.pi * np.geomspace(1.0, 24.0, 24)
    phase = rng.uniform(0, 2 * np.pi, 24)
    k = np.stack([np.cos(ang), np.sin(ang)], 1) * freq[:, None]          # [24, 2]
    v = (np.sin(xy @ k.T + phase) / np.sqrt(freq / freq[0])).sum(1)
    v = (v - v.min()) / max(float(np.ptp(v)), 1e-12) if len(v) > 1 else np.zeros_like(v)
    pos = np.clip(v * (len(GROUND_PALETTE) - 1), 0, len(GROUND_PALETTE) - 1 - 1e-9)
    i = np.floor(pos).astype(int)
    f = (pos - i)[:, None]
    return GROUND_PALETTE[i] * (1 - f) + GROUND_PALETTE[i + 1] * f


def sky(d: np.ndarray) -> np.ndarray:
    """``[M, 3]`` colours of the sky seen along unit directions ``d [M, 3]``: pale at the
    horizon, blue overhead."""
    up = np.clip(d[:, 2:3], 0, 1)
    return np.array([0.85, 0.88, 0.92]) * (1 - up) + np.array([0.35, 0.55, 0.85]) * up


class MeshRenderer:
    """Renders a (normalised, textured) mesh: ``renderer(pose [4, 4], size) -> RGBA``."""

    def __init__(self, mesh, checker: float = 8.0, up: str = "y",
                 supersample: int = SUPERSAMPLE, camera_angle_x: float = CAMERA_ANGLE_X,
                 ground: bool = False):
        import igl
        if up not in ("y", "z"):
            raise ValueError(f"up must be 'y' or 'z', got {up!r}")
        v = np.asarray(mesh.vertices, np.float64)
        if up == "y":                    # most mesh files are y-up; the world is z-up
            v = np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)
        lo, hi = v.min(0), v.max(0)
        scale = EXTENT / float((hi - lo).max())
        self.v = np.ascontiguousarray((v - 0.5 * (lo + hi)) * scale, np.float64)
        self.f = np.ascontiguousarray(mesh.faces, np.int64)
        e1 = self.v[self.f[:, 1]] - self.v[self.f[:, 0]]
        e2 = self.v[self.f[:, 2]] - self.v[self.f[:, 0]]
        n = np.cross(e1, e2)
        self.normals = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)
        self.tree = igl.AABB()
        self.tree.init(self.v, self.f)
        self.checker, self.supersample, self.camera_angle_x = checker, supersample, camera_angle_x
        # ground: the object stands on a textured plane under a sky (an opaque background)
        self.ground_z = float(self.v[:, 2].min()) if ground else None

    def albedo(self, p: np.ndarray) -> np.ndarray:
        odd = (np.floor(self.checker * p).sum(1) % 2)[:, None]
        return np.array(COLOURS[0]) * (1 - odd) + np.array(COLOURS[1]) * odd

    def __call__(self, pose: torch.Tensor, size: int) -> np.ndarray:
        s = size * self.supersample
        f = 0.5 * s / math.tan(0.5 * self.camera_angle_x)
        o, d = camera_rays(pose.to(torch.float64),
                           torch.tensor([f, f, 0.5 * s, 0.5 * s], dtype=torch.float64), s, s)
        o = np.ascontiguousarray(o.numpy(), dtype=np.float64)
        d = np.ascontiguousarray(d.numpy(), dtype=np.float64)
        face, t, _ = self.tree.intersect_ray_first(self.v, self.f, o, d)
        hit = (face >= 0) & np.isfinite(t)
        colour = np.zeros((len(o), 3))
        if hit.any():
            p = o[hit] + t[hit, None] * d[hit]
            n = self.normals[face[hit]]
            n = np.where((n * d[hit]).sum(1, keepdims=True) > 0, -n, n)   # face the camera
            colour[hit] = np.clip(self.albedo(p) * _light(n)[:, None], 0, 1)
        if self.ground_z is not None:
            t_g = np.where(d[:, 2] < 0, (self.ground_z - o[:, 2]) / np.minimum(d[:, 2], -1e-12),
                           np.inf)
            on_ground = (t_g > 0) & np.isfinite(t_g) & (~hit | (t_g < np.where(hit, t, np.inf)))
            p = o[on_ground] + t_g[on_ground, None] * d[on_ground]
            n = np.tile([0.0, 0.0, 1.0], (len(p), 1))
            colour[on_ground] = np.clip(ground_albedo(p[:, :2]) * _light(n)[:, None], 0, 1)
            rest = ~hit & ~on_ground
            colour[rest] = sky(d[rest])
            hit = np.ones_like(hit)                # every ray ends on something: opaque
        ss = self.supersample
        a = hit.astype(np.float64).reshape(size, ss, size, ss).mean((1, 3))
        premult = (colour * hit[:, None]).reshape(size, ss, size, ss, 3).mean((1, 3))
        rgb = np.where(a[..., None] > 0, premult / np.maximum(a, 1e-12)[..., None], 0.0)
        return np.concatenate([rgb, a[..., None]], -1)


def _light(n: np.ndarray) -> np.ndarray:
    """``[M]`` Lambert light (the demo scene's two lights and ambient) on normals ``[M, 3]``."""
    light = np.full(len(n), AMBIENT)
    for direction, strength in LIGHTS:
        u = np.asarray(direction) / np.linalg.norm(direction)
        light += strength * np.clip(n @ u, 0, None)
    return light


def generate_mesh_scene(mesh, out_dir: str, size: int = 64, n_train: int = 60,
                        n_test: int = 12, seed: int = 0, checker: float = 8.0,
                        up: str = "y", ground: bool = False) -> str:
    """Write a Blender-format scene of ``mesh`` (a path or a ``trimesh.Trimesh``; ``up``: its
    up axis) to ``out_dir`` with the demo scene's cameras; returns ``out_dir``. ``ground``:
    the object stands on a textured plane under a sky, so the views have an opaque,
    textured background (like photos of an object on a table)."""
    if isinstance(mesh, str):
        from ...signals.shape import load_mesh
        mesh = load_mesh(mesh)
    return write_scene(out_dir, MeshRenderer(mesh, checker, up, ground=ground), size, n_train,
                       n_test, seed)


__all__ = ["MeshRenderer", "generate_mesh_scene"]
