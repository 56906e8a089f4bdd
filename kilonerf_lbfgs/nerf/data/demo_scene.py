"""A small NeRF scene generated in code: a few textured primitives, ray traced analytically.

The object (inside ``[-1, 1]^3``, world z up) is a union of a checkered sphere, a plain sphere,
a box with a 3-D checker and a striped torus lying flat, lit by two directional lights with
Lambert shading. Each view is traced at twice the resolution through
:func:`~kilonerf_lbfgs.nerf.data.rays.camera_rays` (the same rays the loader's users get) and
area-averaged, which gives anti-aliased RGBA with fractional alpha on the silhouettes; the
background is transparent. The output is a Blender-format scene folder
(``transforms_{train,val,test}.json``, ``{split}/r_{k}.png``) that
:func:`~kilonerf_lbfgs.nerf.data.load_split` reads like NeRF-synthetic data.
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ...io import save_json, save_png
from .rays import camera_rays, look_at, orbit_poses, sphere_position

CAMERA_ANGLE_X = 0.6911112070083618   # horizontal field of view (radians), lego's
RADIUS = 4.0                    # camera distance from the origin
SUPERSAMPLE = 2                 # rays per pixel along each axis
BOX = [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]
LIGHTS = (((0.45, -0.35, 0.82), 0.75), ((-0.6, 0.5, 0.3), 0.25))   # (direction, strength)
AMBIENT = 0.22

# the object's primitives (world units): two spheres (centre, radius), a box (min, max) and a
# torus around the world z axis (centre, major radius, minor radius)
SPHERES = (((-0.35, -0.3, 0.1), 0.45), ((0.45, 0.5, 0.35), 0.28))
BOX_PRIM = ((0.0, -0.65, -0.7), (0.7, -0.05, -0.1))
TORUS = ((-0.1, 0.35, -0.45), 0.45, 0.13)

Hit = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # t [M], normal [M, 3], albedo [M, 3]

_NO_HIT = float("inf")


def _unit(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    return v / v.norm()


def _checker(a: torch.Tensor, b: torch.Tensor, colour0, colour1) -> torch.Tensor:
    """``[M, 3]`` albedo: ``colour0`` where ``floor(a) + floor(b)`` is even, else ``colour1``."""
    odd = ((torch.floor(a) + torch.floor(b)) % 2).unsqueeze(-1)
    c0 = torch.tensor(colour0, dtype=torch.float64)
    c1 = torch.tensor(colour1, dtype=torch.float64)
    return c0 * (1 - odd) + c1 * odd


def _sphere(center, radius: float, albedo: Callable) -> Callable:
    c = torch.tensor(center, dtype=torch.float64)

    def hit(o: torch.Tensor, d: torch.Tensor) -> Hit:
        oc = o - c
        b = (oc * d).sum(-1)
        disc = b * b - ((oc * oc).sum(-1) - radius * radius)
        sq = disc.clamp_min(0).sqrt()
        t = -b - sq
        t = torch.where(t > 1e-6, t, -b + sq)
        ok = (disc > 0) & (t > 1e-6)
        t = torch.where(ok, t, torch.full_like(t, _NO_HIT))
        n = (o + t.clamp_max(1e6).unsqueeze(-1) * d - c) / radius
        return t, n, albedo(n)

    return hit


def _box(lo, hi, albedo: Callable) -> Callable:
    lo_t = torch.tensor(lo, dtype=torch.float64)
    hi_t = torch.tensor(hi, dtype=torch.float64)

    def hit(o: torch.Tensor, d: torch.Tensor) -> Hit:
        inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t0, t1 = (lo_t - o) * inv, (hi_t - o) * inv
        t_near, t_far = torch.minimum(t0, t1), torch.maximum(t0, t1)
        t_enter, axis = t_near.max(-1)
        t_exit = t_far.min(-1).values
        ok = (t_enter <= t_exit) & (t_enter > 1e-6)
        t = torch.where(ok, t_enter, torch.full_like(t_enter, _NO_HIT))
        n = torch.zeros_like(o)
        n.scatter_(1, axis.unsqueeze(-1), -torch.sign(d.gather(1, axis.unsqueeze(-1))))
        p = o + t.clamp_max(1e6).unsqueeze(-1) * d
        return t, n, albedo(p)

    return hit


def _torus(center, major: float, minor: float, albedo: Callable, steps: int = 64,
           bisections: int = 30) -> Callable:
    """Torus around the world z axis through ``center``; the quartic's first root along the ray
    is bracketed by sampling inside the bounding sphere, then refined by bisection."""
    c = torch.tensor(center, dtype=torch.float64)

    def implicit(p: torch.Tensor) -> torch.Tensor:            # < 0 inside the tube
        q = p[..., :2].norm(dim=-1) - major
        return q * q + p[..., 2] ** 2 - minor * minor

    def hit(o: torch.Tensor, d: torch.Tensor) -> Hit:
        oc = o - c
        b = (oc * d).sum(-1)
        disc = b * b - ((oc * oc).sum(-1) - (major + minor) ** 2)
        t = torch.full_like(b, _NO_HIT)
        n = torch.zeros_like(o)
        p = torch.zeros_like(o)
        cand = torch.nonzero((disc > 0) & (-b + disc.clamp_min(0).sqrt() > 1e-6)).squeeze(-1)
        if cand.numel():                       # only rays that meet the bounding sphere
            t[cand], n[cand], p[cand] = trace(oc[cand], d[cand], b[cand], disc[cand])
        return t, n, albedo(p)

    def trace(oc, d, b, disc):
        sq = disc.sqrt()
        t_a, t_b = (-b - sq).clamp_min(1e-6), (-b + sq)
        frac = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        ts = t_a.unsqueeze(-1) + (t_b - t_a).unsqueeze(-1) * frac          # [M, steps+1]
        inside = implicit(oc.unsqueeze(1) + ts.unsqueeze(-1) * d.unsqueeze(1)) < 0
        found = inside.any(-1)
        k = inside.to(torch.int8).argmax(-1).clamp_min(1)               # first sample inside
        hi_t = ts.gather(1, k.unsqueeze(-1)).squeeze(-1)
        lo_t = ts.gather(1, (k - 1).unsqueeze(-1)).squeeze(-1)
        for _ in range(bisections):
            mid = 0.5 * (lo_t + hi_t)
            m_in = implicit(oc + mid.unsqueeze(-1) * d) < 0
            hi_t, lo_t = torch.where(m_in, mid, hi_t), torch.where(m_in, lo_t, mid)
        t = torch.where(found, hi_t, torch.full_like(hi_t, _NO_HIT))
        p = oc + hi_t.unsqueeze(-1) * d
        q = p[:, :2].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n = torch.cat([(q - major) * p[:, :2] / q, p[:, 2:]], -1)
        n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return t, n, p

    return hit


def _scene() -> List[Callable]:
    """The primitives of the demo object, all inside ``[-1, 1]^3``."""
    def sphere_checker(n):
        lon = torch.atan2(n[:, 1], n[:, 0]) / (2 * math.pi) * 10
        lat = torch.asin(n[:, 2].clamp(-1, 1)) / math.pi * 5
        return _checker(lon, lat, (0.85, 0.18, 0.12), (0.95, 0.75, 0.10))

    def blue(n):
        return torch.tensor((0.15, 0.35, 0.85), dtype=torch.float64).expand(n.shape[0], 3)

    def box_checker(p):
        return _checker(5 * p[:, 0] + 5 * p[:, 1], 5 * p[:, 2], (0.15, 0.6, 0.25),
                        (0.05, 0.25, 0.1))

    def torus_stripes(p):
        ang = torch.atan2(p[:, 1], p[:, 0]) / (2 * math.pi) * 12
        return _checker(ang, torch.zeros_like(ang), (0.8, 0.2, 0.7), (0.95, 0.55, 0.15))

    return [_sphere(*SPHERES[0], sphere_checker), _sphere(*SPHERES[1], blue),
            _box(*BOX_PRIM, box_checker), _torus(*TORUS, torus_stripes)]


def demo_sdf(p: np.ndarray) -> np.ndarray:
    """Signed distance ``[M]`` of points ``p [M, 3]`` to the demo object (the union of its
    primitives; negative inside). Exact outside the primitives' overlaps, a bound inside."""
    p = np.asarray(p, dtype=np.float64)
    d = [np.linalg.norm(p - np.array(c), axis=1) - r for c, r in SPHERES]
    lo, hi = np.array(BOX_PRIM[0]), np.array(BOX_PRIM[1])
    q = np.abs(p - 0.5 * (lo + hi)) - 0.5 * (hi - lo)
    d.append(np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(1), 0.0))
    c, major, minor = TORUS
    t = p - np.array(c)
    d.append(np.hypot(np.hypot(t[:, 0], t[:, 1]) - major, t[:, 2]) - minor)
    return np.min(d, axis=0)


def demo_surface_points(n: int, seed: int = 0) -> np.ndarray:
    """About ``n`` points ``[m, 3]`` on the demo object's outer surface: points on each
    primitive's surface (in proportion to its area) that lie inside no other primitive."""
    rng = np.random.default_rng(seed)
    (c0, r0), (c1, r1) = SPHERES
    lo, hi = np.array(BOX_PRIM[0]), np.array(BOX_PRIM[1])
    ext = hi - lo
    tc, major, minor = TORUS
    areas = np.array([4 * math.pi * r0 ** 2, 4 * math.pi * r1 ** 2,
                      2 * (ext[0] * ext[1] + ext[1] * ext[2] + ext[0] * ext[2]),
                      4 * math.pi ** 2 * major * minor])
    counts = np.maximum(1, np.round(n * areas / areas.sum()).astype(int))
    pts = []
    for (c, r), k in zip(SPHERES, counts[:2]):
        u = rng.normal(size=(k, 3))
        pts.append(np.array(c) + r * u / np.linalg.norm(u, axis=1, keepdims=True))
    face = rng.choice(6, size=counts[2], p=np.repeat([ext[1] * ext[2], ext[0] * ext[2],
                                                      ext[0] * ext[1]], 2) / (areas[2]))
    b = lo + rng.random((counts[2], 3)) * ext
    axis = face // 2
    b[np.arange(counts[2]), axis] = np.where(face % 2, hi[axis], lo[axis])
    pts.append(b)
    k = counts[3]                       # the tube's area element grows with the distance
    u = rng.uniform(0, 2 * math.pi, 4 * k)   # from the axis: rejection-sample the angle
    v = rng.uniform(0, 2 * math.pi, 4 * k)
    keep = rng.random(4 * k) < (major + minor * np.cos(v)) / (major + minor)
    u, v = u[keep][:k], v[keep][:k]
    ring = major + minor * np.cos(v)
    pts.append(np.array(tc) + np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(v)], 1))
    p = np.concatenate(pts)
    return p[demo_sdf(p) > -1e-9]


def _shade(origins: torch.Tensor, dirs: torch.Tensor, prims: List[Callable]
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit of rays ``[M, 3]``: ``(hit mask [M], colour [M, 3])``."""
    best_t = torch.full(origins.shape[:1], _NO_HIT, dtype=torch.float64)
    colour = torch.zeros_like(origins)
    for prim in prims:
        t, n, albedo = prim(origins, dirs)
        n = torch.where((n * dirs).sum(-1, keepdim=True) > 0, -n, n)   # face the camera
        light = torch.full_like(t, AMBIENT)
        for direction, strength in LIGHTS:
            light = light + strength * (n @ _unit(direction)).clamp_min(0)
        closer = t < best_t
        best_t = torch.where(closer, t, best_t)
        colour = torch.where(closer.unsqueeze(-1), albedo * light.unsqueeze(-1), colour)
    return torch.isfinite(best_t), colour.clamp(0, 1)


def render_view(pose: torch.Tensor, size: int, camera_angle_x: float = CAMERA_ANGLE_X,
                supersample: int = SUPERSAMPLE) -> np.ndarray:
    """``[size, size, 4]`` float RGBA (straight, not premultiplied) of the demo object seen by
    ``pose [4, 4]`` (camera-to-world, OpenGL convention)."""
    s = size * supersample
    f = 0.5 * s / math.tan(0.5 * camera_angle_x)
    origins, dirs = camera_rays(pose.to(torch.float64),
                                torch.tensor([f, f, 0.5 * s, 0.5 * s], dtype=torch.float64),
                                s, s)
    hit, colour = _shade(origins, dirs, _scene())
    a = hit.to(torch.float64).reshape(size, supersample, size, supersample).mean((1, 3))
    premult = (colour * hit.unsqueeze(-1)).reshape(size, supersample, size, supersample, 3)
    premult = premult.mean((1, 3))
    rgb = torch.where(a.unsqueeze(-1) > 0, premult / a.clamp_min(1e-12).unsqueeze(-1), 0.0)
    return torch.cat([rgb, a.unsqueeze(-1)], -1).numpy()


def _random_poses(n: int, rng: np.random.Generator) -> torch.Tensor:
    """``[n, 4, 4]`` cameras at ``RADIUS`` on the upper hemisphere looking at the origin."""
    az = rng.uniform(0.0, 2.0 * math.pi, n)
    el = np.arcsin(rng.uniform(0.1, 0.95, n))
    return torch.stack([look_at(sphere_position(RADIUS, float(a), float(e)))
                        for a, e in zip(az, el)])


def _write_split(out_dir: str, split: str, poses: torch.Tensor, size: int,
                 render: Callable[[torch.Tensor, int], np.ndarray]) -> None:
    frames = []
    for k, pose in enumerate(poses):
        rel = f"./{split}/r_{k}"
        save_png(os.path.join(out_dir, split, f"r_{k}.png"), render(pose, size))
        frames.append({"file_path": rel, "transform_matrix": pose.double().tolist()})
    save_json(os.path.join(out_dir, f"transforms_{split}.json"),
              {"camera_angle_x": CAMERA_ANGLE_X, "aabb": BOX, "frames": frames})


def generate_demo_scene(out_dir: str, size: int = 64, n_train: int = 60, n_test: int = 12,
                        seed: int = 0) -> str:
    """Write the demo scene to ``out_dir`` and return ``out_dir``.

    ``n_train`` random views on the upper hemisphere (from ``seed``), ``n_test`` views on an
    orbit at 30 degrees elevation, and ``max(1, n_test // 2)`` validation views on an orbit at
    50 degrees; all ``size x size`` RGBA PNGs with a transparent background, cameras at radius
    4 looking at the origin, ``camera_angle_x`` 0.691 (lego's), and ``"aabb"`` ``[-1, 1]^3``.
    Deterministic; ``transforms_train.json`` is written last, so its presence means the
    scene is complete.
    """
    return write_scene(out_dir, render_view, size, n_train, n_test, seed)


def write_scene(out_dir: str, render: Callable[[torch.Tensor, int], np.ndarray], size: int,
                n_train: int, n_test: int, seed: int = 0) -> str:
    """A Blender-format scene of views ``render(pose [4, 4], size) -> [size, size, 4]`` RGBA
    with the demo scene's cameras (see :func:`generate_demo_scene`)."""
    if size < 1 or n_train < 1 or n_test < 1:
        raise ValueError("a generated scene needs positive size, n_train and n_test")
    rng = np.random.default_rng(seed)
    train = _random_poses(n_train, rng)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # many small tensors: threads only add overhead (and contention)
    try:
        _write_split(out_dir, "test", orbit_poses(n_test, RADIUS, 30.0), size, render)
        _write_split(out_dir, "val", orbit_poses(max(1, n_test // 2), RADIUS, 50.0), size,
                     render)
        _write_split(out_dir, "train", train, size, render)
    finally:
        torch.set_num_threads(threads)
    return out_dir


def default_demo_dir(size: int = 64) -> str:
    """Where the demo scene of ``size x size`` views lives when no folder is given: the user
    cache, ``$KILONERF_LBFGS_CACHE`` or else ``$XDG_CACHE_HOME/kilonerf_lbfgs`` (default
    ``~/.cache/kilonerf_lbfgs``), sub-folder ``demo_scene_{size}``. It does not depend on the
    working folder or on where the package is installed."""
    root = os.environ.get("KILONERF_LBFGS_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "kilonerf_lbfgs")
    return os.path.join(root, f"demo_scene_{int(size)}")


def ensure_demo_scene(out_dir: Optional[str] = None, size: int = 64, **kw) -> str:
    """``generate_demo_scene(out_dir, size, **kw)`` unless ``out_dir/transforms_train.json``
    exists; returns ``out_dir`` (None: :func:`default_demo_dir` of ``size``)."""
    out_dir = default_demo_dir(size) if out_dir is None else out_dir
    if not os.path.isfile(os.path.join(out_dir, "transforms_train.json")):
        generate_demo_scene(out_dir, size=size, **kw)
    return out_dir
