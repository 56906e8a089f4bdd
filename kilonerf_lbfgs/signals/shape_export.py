"""Shape outputs: the fitted field on a dense grid, marching cubes, Chamfer distance, a
shaded preview. Everything takes a field function ``f(points [M, 3]) -> [M]`` so the same
code checks an analytic shape (tests) and a trained grid of networks.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import torch

from ..grid import CellGrid

Field = Callable[[np.ndarray], np.ndarray]


def model_field(model, grid: CellGrid, chunk: int = 262_144) -> Field:
    """A grid of networks as a field: global points ``[M, 3]`` -> outputs ``[M]``."""
    dev = next(model.parameters()).device

    @torch.no_grad()
    def f(points: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(points), chunk):
            x = torch.as_tensor(points[s:s + chunk], dtype=torch.float64, device=dev)
            cell = grid.cell_of(x)
            local = grid.to_local(x, cell).to(torch.float32)
            out.append(model(local, cell)[:, 0].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)
    return f


def grid_points(resolution: int, step: int = 1) -> np.ndarray:
    """``[R'^3, 3]`` lattice points covering ``[0, 1]^3`` (corners included), x-major:
    every ``step``-th of ``resolution`` per axis (``R' = ceil(R / step)``)."""
    a = np.linspace(0.0, 1.0, resolution)[::step]
    return np.stack(np.meshgrid(a, a, a, indexing="ij"), -1).reshape(-1, 3)


def field_volume(field: Field, resolution: int) -> np.ndarray:
    """The field on the lattice: ``[R, R, R]``."""
    return field(grid_points(resolution)).reshape((resolution,) * 3)


def extract_mesh(volume: np.ndarray, level: float, inside_is_low: bool):
    """Marching cubes of ``volume [R, R, R]`` (over the unit box) at ``level`` ->
    ``trimesh.Trimesh`` with outward normals (empty when the level is never crossed)."""
    import trimesh
    from skimage.measure import marching_cubes
    r = volume.shape[0]
    if not (volume.min() < level < volume.max()):
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    gradient = "descent" if inside_is_low else "ascent"
    v, f, _, _ = marching_cubes(volume, level, spacing=(1.0 / (r - 1),) * 3,
                                gradient_direction=gradient)
    return trimesh.Trimesh(v, f, process=True)


def chamfer(mesh_a, mesh_b, n: int = 30_000, seed: int = 0) -> float:
    """Symmetric Chamfer distance, ``(mean_a d(a, B) + mean_b d(b, A)) / 2`` over ``n``
    area-uniform surface samples each, divided by the unit box's diagonal ``sqrt(3)``
    (``inf`` if a mesh is empty)."""
    import trimesh
    from scipy.spatial import cKDTree
    if len(mesh_a.faces) == 0 or len(mesh_b.faces) == 0:
        return float("inf")
    rng = np.random.default_rng(seed)
    pa = trimesh.sample.sample_surface(mesh_a, n, seed=rng)[0]
    pb = trimesh.sample.sample_surface(mesh_b, n, seed=rng)[0]
    d_ab = cKDTree(pb).query(pa)[0].mean()
    d_ba = cKDTree(pa).query(pb)[0].mean()
    return float(0.5 * (d_ab + d_ba) / math.sqrt(3.0))


def shaded_views(inside: np.ndarray) -> np.ndarray:
    """Orthographic renders of a voxel occupancy ``[R, R, R]`` bool, looking down each
    axis: depth of the first occupied voxel, Lambert-shaded by the depth map's normal.
    Returns ``[R, 3R + 8, 3]`` float in [0, 1] (white background)."""
    r = inside.shape[0]
    views = []
    for axis in range(3):
        occ = np.moveaxis(inside, axis, 0)
        hit = occ.any(0)
        depth = np.where(hit, occ.argmax(0), r).astype(np.float64) / r
        dz_u, dz_v = np.gradient(np.where(hit, depth, depth[hit].max() if hit.any() else 1.0))
        normal = np.stack([-dz_u * r * 0.5, -dz_v * r * 0.5, np.ones_like(depth)], -1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        light = np.array([0.4, 0.5, 0.77])
        shade = np.clip((normal * light).sum(-1), 0, 1) * (1.0 - 0.5 * depth)
        img = np.where(hit[..., None], shade[..., None] * np.array([0.95, 0.75, 0.45]), 1.0)
        views += [img, np.ones((r, 4, 3))]
    return np.concatenate(views[:-1], 1)


def save_preview(path: str, target_inside: np.ndarray, fitted_inside: np.ndarray) -> None:
    """PNG: top row the input shape, bottom row the fit, three axis views each."""
    from ..io import save_png
    top, bottom = shaded_views(target_inside), shaded_views(fitted_inside)
    save_png(path, np.concatenate([top, np.ones((4,) + top.shape[1:]), bottom], 0))


def save_ply(path: str, mesh) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mesh.export(path, file_type="ply")
