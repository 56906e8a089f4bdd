"""Meshes from a radiance field: marching cubes on the density, colours from the field.

The density is sampled on a lattice over the scene box, one z-slab of ``slab`` lattice planes
at a time (memory bounded by the slab, not by the lattice), and only where the occupancy grid
says the space is occupied (elsewhere it is 0). scikit-image's marching cubes extracts the
level set ``sigma = threshold``; each vertex gets the field's colour seen from outside along
its normal. The threshold is a density; :func:`rendered_surface_density` picks one from the
field itself (the median density where its renders terminate), so no scene constant is needed.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

DensityFn = Callable[[torch.Tensor], torch.Tensor]             # x [M, 3] -> sigma [M]
ColorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, d) [M, 3] -> rgb [M, 3]


def half_opacity_density(step_size: float) -> float:
    """The density at which a step of ``step_size`` has opacity 0.5: ``ln 2 / step_size``."""
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return math.log(2.0) / float(step_size)


def lattice_axes(aabb: Sequence[float], resolution: int):
    """Three ``[resolution]`` arrays of lattice coordinates spanning the box (ends included)."""
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    return [np.linspace(aabb[i], aabb[i + 3], resolution) for i in range(3)]


@torch.no_grad()
def density_volume(density: DensityFn, aabb: Sequence[float], resolution: int,
                   occupied: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   slab: int = 8, device="cpu") -> np.ndarray:
    """The density on the lattice, ``[R, R, R]`` float32 (x, y, z order).

    ``occupied(x [M, 3]) -> [M]`` bool, when given, skips unoccupied points (density 0).
    Evaluated ``slab`` z-planes at a time: about ``R^2 * slab`` points in memory at once.
    """
    xs, ys, zs = lattice_axes(aabb, resolution)
    out = np.zeros((resolution,) * 3, dtype=np.float32)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    for k0 in range(0, resolution, slab):
        zk = zs[k0:k0 + slab]
        pts = np.stack([np.repeat(gx[..., None], len(zk), -1),
                        np.repeat(gy[..., None], len(zk), -1),
                        np.broadcast_to(zk, gx.shape + (len(zk),))], -1).reshape(-1, 3)
        x = torch.as_tensor(pts, dtype=torch.float32, device=device)
        sigma = torch.zeros(x.shape[0], device=device)
        keep = occupied(x) if occupied is not None else torch.ones_like(sigma, dtype=torch.bool)
        if bool(keep.any()):
            sigma[keep] = density(x[keep]).float()
        out[:, :, k0:k0 + len(zk)] = sigma.reshape(resolution, resolution, len(zk)).cpu().numpy()
    return out


@torch.no_grad()
def extract_mesh(density: DensityFn, aabb: Sequence[float], resolution: int, threshold: float,
                 color: Optional[ColorFn] = None,
                 occupied: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 slab: int = 8, chunk: int = 65536, device="cpu"):
    """A ``trimesh.Trimesh`` of the level set ``density = threshold`` in world coordinates,
    normals pointing out of the dense region, vertex colours from ``color`` (uint8 RGBA)
    when given. Raises ``ValueError`` when the density never crosses the threshold."""
    import trimesh
    from skimage.measure import marching_cubes
    vol = density_volume(density, aabb, resolution, occupied, slab, device)
    if not (vol.min() < threshold < vol.max()):
        raise ValueError(f"the density never crosses the threshold {threshold:g} (it spans "
                         f"{vol.min():g} to {vol.max():g} on the {resolution}^3 lattice); "
                         f"lower the threshold or check that the checkpoint is trained")
    spacing = tuple((aabb[i + 3] - aabb[i]) / (resolution - 1) for i in range(3))
    v, f, normals, _ = marching_cubes(vol, threshold, spacing=spacing,
                                      gradient_direction="ascent")
    v = v + np.asarray(aabb[:3])
    mesh = trimesh.Trimesh(v, f, process=False)
    if color is not None and len(v):
        # look at each vertex from outside, against its normal
        n = torch.as_tensor(mesh.vertex_normals.copy(), dtype=torch.float32, device=device)
        x = torch.as_tensor(v, dtype=torch.float32, device=device)
        rgb = torch.cat([color(x[s:s + chunk], -n[s:s + chunk]).float().clamp(0, 1)
                         for s in range(0, len(x), chunk)])
        rgba = np.concatenate([(rgb.cpu().numpy() * 255 + 0.5).astype(np.uint8),
                               np.full((len(v), 1), 255, np.uint8)], 1)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    return mesh


@torch.no_grad()
def rendered_surface_density(field, marcher, rs, aabb: Sequence[float], n_views: int = 8,
                             size: int = 64, elevation_deg: float = 30.0,
                             min_opacity: float = 0.5) -> float:
    """A density threshold matched to what the field renders: the median density at the
    expected ray-termination points of an orbit of ``n_views`` views (``size x size``,
    60 degree field of view, the box's bounding sphere in view) over pixels whose opacity
    exceeds ``min_opacity``. The mesh at this level passes where the renders put the surface.
    Raises ``ValueError`` when no pixel is that opaque (an empty or untrained field)."""
    from dataclasses import replace
    from .data.rays import camera_rays, orbit_poses
    from .render.rendering import render_rays
    lo, hi = torch.tensor(aabb[:3]), torch.tensor(aabb[3:])
    center, half_diag = 0.5 * (lo + hi), 0.5 * float((hi - lo).norm())
    radius = 2.0 * half_diag                     # the bounding sphere fills a 60 degree view
    focal = 0.5 * size / math.tan(math.radians(30.0))
    K = torch.tensor([focal, focal, 0.5 * size, 0.5 * size])
    device = rs.device
    view_rs = replace(rs, near=max(radius - half_diag, 1e-3), far=radius + half_diag)
    found = []
    for pose in orbit_poses(n_views, radius, elevation_deg, center.tolist()):
        o, d = camera_rays(pose.to(device), K.to(device), size, size)
        out = render_rays(field, marcher, o, d, view_rs, chunk=size * size)
        hit = out["opacity"] > min_opacity
        if bool(hit.any()):
            x = o[hit] + d[hit] * out["depth"][hit, None]
            found.append(field.density(x))
    if not found:
        raise ValueError(f"no rendered pixel is more than {min_opacity:g} opaque: the field "
                         f"is empty or untrained")
    return float(torch.cat(found).median())


def field_color(field) -> ColorFn:
    """The colour of a field with ``forward(x, d) -> (rgb, sigma)``."""
    def color(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return field(x, torch.nn.functional.normalize(d, dim=-1))[0]
    return color


def chamfer_to_surface(mesh, surface: np.ndarray,
                       surface_distance: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                       n: int = 50_000, seed: int = 0):
    """Symmetric Chamfer distance between ``mesh`` and a true surface given by points on it
    ``[K, 3]`` (and, optionally, its exact distance function, e.g. an analytic SDF):
    ``(mean distance of mesh samples to the surface + mean distance of surface points to the
    mesh) / 2``. Returns ``(chamfer, mesh_to_surface, surface_to_mesh)``."""
    import igl
    import trimesh
    from scipy.spatial import cKDTree
    samples = np.asarray(trimesh.sample.sample_surface(mesh, n, seed=seed)[0])
    if surface_distance is not None:
        d_mesh = np.abs(surface_distance(samples))
    else:
        d_mesh = cKDTree(surface).query(samples)[0]
    v = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    f = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    d_true = np.sqrt(np.maximum(igl.point_mesh_squared_distance(
        np.ascontiguousarray(surface, dtype=np.float64), v, f)[0], 0.0))
    return float(0.5 * (d_mesh.mean() + d_true.mean())), float(d_mesh.mean()), \
        float(d_true.mean())


__all__ = ["half_opacity_density", "rendered_surface_density", "lattice_axes", "density_volume", "extract_mesh",
           "field_color", "chamfer_to_surface"]
