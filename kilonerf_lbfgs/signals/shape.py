"""Shapes as a 3-D grid of cells over the unit box: load a mesh, label points, the problem.

The mesh is scaled into the unit box ``[0, 1]^3`` with a margin (longest side
``1 - 2 * margin``, centred). Training points are drawn uniformly in the box and near the
surface (surface samples plus Gaussian noise); each is labelled inside/outside by the
generalised winding number (libigl ``fast_winding_number``, ``|w| > 0.5``): it is robust to
small holes and to the orientation of the faces. Targets are either occupancy in {0, 1}
(fitted with per-cell MSE; the fitted surface is the 0.5 level) or the signed distance
(negative inside; per-cell MSE; the surface is the 0 level). The fit loop's quality is the
IoU on held-out uniform points, evaluated on the model's current parameters.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..grid import CellGrid
from ..io import check_input_file
from ..packing import pack_samples
from ..problems import PackedMSEProblem

MESH_EXTS = (".obj", ".ply", ".off", ".stl")
TARGETS = ("occupancy", "sdf")


# ---------------------------------------------------------------- meshes
def torus_knot_mesh(p: int = 2, q: int = 3, tube: float = 0.35, n_u: int = 480,
                    n_v: int = 32):
    """The bundled default: a closed tube around the ``(p, q)`` torus knot (a trefoil for
    2, 3), as a watertight ``trimesh.Trimesh`` built in code."""
    import trimesh
    u = np.linspace(0, 2 * np.pi, n_u, endpoint=False)
    rad = 2.0 + np.cos(q * u)
    c = np.stack([rad * np.cos(p * u), rad * np.sin(p * u), -np.sin(q * u)], 1)   # [n_u, 3]
    dc = np.stack([-p * rad * np.sin(p * u) - q * np.sin(q * u) * np.cos(p * u),
                   p * rad * np.cos(p * u) - q * np.sin(q * u) * np.sin(p * u),
                   -q * np.cos(q * u)], 1)
    t = dc / np.linalg.norm(dc, axis=1, keepdims=True)
    radial = np.stack([np.cos(p * u), np.sin(p * u), 0 * u], 1)       # periodic frame
    n = radial - (radial * t).sum(1, keepdims=True) * t
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    b = np.cross(t, n)
    v = np.linspace(0, 2 * np.pi, n_v, endpoint=False)
    verts = (c[:, None] + tube * (np.cos(v)[None, :, None] * n[:, None] +
                                  np.sin(v)[None, :, None] * b[:, None])).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n_u), np.arange(n_v), indexing="ij")
    a, b_, c_, d = (i * n_v + j, ((i + 1) % n_u) * n_v + j,
                    ((i + 1) % n_u) * n_v + (j + 1) % n_v, i * n_v + (j + 1) % n_v)
    faces = np.concatenate([np.stack([a, b_, c_], -1).reshape(-1, 3),
                            np.stack([a, c_, d], -1).reshape(-1, 3)])
    mesh = trimesh.Trimesh(verts, faces, process=True)
    trimesh.repair.fix_normals(mesh)
    return mesh


def load_mesh(path: Optional[str] = None):
    """A triangle mesh (``trimesh.Trimesh``), cleaned: duplicate and degenerate faces removed,
    small holes filled and face orientation made consistent where possible. None gives
    :func:`torus_knot_mesh`."""
    if path is None:
        return torus_knot_mesh()
    check_input_file(path, MESH_EXTS, "mesh")
    import trimesh
    try:
        mesh = trimesh.load(path, force="mesh", process=True)
    except Exception as e:  # noqa: BLE001 - any parser failure is the user's file
        raise ValueError(f"{path} cannot be read as a mesh ({type(e).__name__})") from e
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{path}: the mesh has no triangles")
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all():
        raise ValueError(f"{path}: no valid triangles (all degenerate or non-finite)")
    if min(mesh.extents) <= 1e-9 * max(mesh.extents):
        raise ValueError(f"{path}: the mesh is flat (encloses no volume)")
    if not mesh.is_watertight:
        trimesh.repair.fill_holes(mesh)
        trimesh.repair.fix_winding(mesh)
    return mesh


def normalize_mesh(mesh, margin: float = 0.05):
    """A copy scaled and moved so its bounding box is centred in ``[0, 1]^3`` with the
    longest side ``1 - 2 * margin``."""
    out = mesh.copy()
    lo, hi = out.bounds
    scale = (1.0 - 2.0 * margin) / float((hi - lo).max())
    out.apply_translation(-(lo + hi) / 2.0)
    out.apply_scale(scale)
    out.apply_translation([0.5, 0.5, 0.5])
    return out


def _vf(mesh):
    return (np.ascontiguousarray(mesh.vertices, dtype=np.float64),
            np.ascontiguousarray(mesh.faces, dtype=np.int64))


def winding_numbers(mesh, points: np.ndarray) -> np.ndarray:
    """``points [M, 3]`` -> ``[M]`` generalised winding number (libigl's fast
    approximation; 1 inside and 0 outside a closed surface, in between near holes)."""
    v, f = _vf(mesh)
    pts = np.ascontiguousarray(points, dtype=np.float64)
    try:
        import igl
    except ImportError:                  # slower fallback: trimesh's ray test (0 or 1)
        return mesh.contains(pts).astype(np.float64)
    return igl.fast_winding_number(v, f, pts)


def inside_mesh(mesh, points: np.ndarray) -> np.ndarray:
    """``points [M, 3]`` -> ``[M]`` bool: ``|w| > 0.5`` (either face orientation)."""
    return np.abs(winding_numbers(mesh, points)) > 0.5


def signed_distance(mesh, points: np.ndarray, inside: Optional[np.ndarray] = None
                    ) -> np.ndarray:
    """``points [M, 3]`` -> ``[M]`` signed distance to the surface (negative inside)."""
    pts = np.ascontiguousarray(points, dtype=np.float64)
    try:
        import igl
        d2 = igl.point_mesh_squared_distance(pts, *_vf(mesh))[0]
        dist = np.sqrt(np.maximum(d2, 0.0))
    except ImportError:
        import trimesh
        dist = np.abs(trimesh.proximity.signed_distance(mesh, pts))
    inside = inside_mesh(mesh, pts) if inside is None else inside
    return np.where(inside, -dist, dist)


def sample_points(mesh, n: int, near_fraction: float = 0.5, sigma: float = 0.01,
                  seed: int = 0) -> np.ndarray:
    """``[n, 3]`` points in ``[0, 1]^3``: uniform, and ``near_fraction`` of them surface
    samples plus Gaussian noise of std ``sigma`` (box units)."""
    import trimesh
    rng = np.random.default_rng(seed)
    n_near = int(round(n * near_fraction))
    near = np.zeros((0, 3))
    if n_near:
        near = trimesh.sample.sample_surface(mesh, n_near, seed=rng)[0]
        near = near + rng.normal(0.0, sigma, near.shape)
    uni = rng.random((n - n_near, 3))
    return np.clip(np.concatenate([uni, near]), 0.0, 1.0)


def label_points(mesh, points: np.ndarray, target: str,
                 truncation: Optional[float] = None) -> np.ndarray:
    """Targets ``[M, 1]``: occupancy in {0, 1} or signed distance, the latter clamped to
    ``[-truncation, truncation]`` when given (box units)."""
    inside = inside_mesh(mesh, points)
    if target == "occupancy":
        return inside.astype(np.float32)[:, None]
    sd = signed_distance(mesh, points, inside)
    if truncation is not None:
        sd = np.clip(sd, -truncation, truncation)
    return sd.astype(np.float32)[:, None]


class ShapeSampler:
    """Labelled training points drawn afresh from one distribution: ``n_points`` per draw,
    ``near_fraction`` of them near the surface (:func:`sample_points`), labelled by
    :func:`label_points`. The first draw uses ``seed``, draw ``k`` the seed sequence
    ``(seed, k)``, so a run is reproducible.
    """

    def __init__(self, mesh, target: str, n_points: int, near_fraction: float = 0.5,
                 sigma: float = 0.01, truncation: Optional[float] = None, seed: int = 0):
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
        if n_points < 1 or not 0.0 <= near_fraction <= 1.0 or not sigma > 0:
            raise ValueError(f"ShapeSampler: n_points >= 1, near_fraction in [0, 1] and "
                             f"sigma > 0 needed, got {n_points}, {near_fraction}, {sigma}")
        if truncation is not None and not truncation > 0:
            raise ValueError(f"ShapeSampler: truncation must be positive, got {truncation}")
        self.mesh, self.target, self.n_points = mesh, target, int(n_points)
        self.near_fraction, self.sigma, self.truncation = near_fraction, sigma, truncation
        self.seed, self.draws = int(seed), 0

    def draw(self):
        """``(x [n_points, 3], y [n_points, 1])``: the next draw."""
        seed = self.seed if self.draws == 0 else int(
            np.random.SeedSequence([self.seed, self.draws]).generate_state(1)[0])
        self.draws += 1
        x = sample_points(self.mesh, self.n_points, self.near_fraction, self.sigma, seed)
        return x, label_points(self.mesh, x, self.target, self.truncation)


def iou(pred_inside: np.ndarray, true_inside: np.ndarray) -> float:
    """Intersection over union of two boolean arrays (1 when both are empty)."""
    pred_inside, true_inside = np.asarray(pred_inside, bool), np.asarray(true_inside, bool)
    union = np.logical_or(pred_inside, true_inside).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred_inside, true_inside).sum() / union)


# ---------------------------------------------------------------- the problem
class ShapeProblem(PackedMSEProblem):
    """Per-cell MSE against occupancy or signed distance on fixed training points; the
    quality is the IoU on held-out uniform points (``quality_name = "iou"``).

    ``quality`` evaluates the last model given to :meth:`cell_losses` or
    :meth:`loss_and_backward` at its current parameters (the optimisers leave them at the
    accepted point): one forward pass over the held-out points, no gradient.

    Args:
        train_x: ``[M, 3]`` points in the unit box; train_y: ``[M, 1]`` targets.
        eval_x: ``[K, 3]`` held-out points; eval_inside: ``[K]`` bool.
        grid: cells per axis (3 ints).
        target: ``occupancy`` | ``sdf``.
    """

    quality_name = "iou"
    # the IoU follows from per-cell intersection and union counts (cell_quality_stats)
    shardable = True

    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray,
                 eval_inside: np.ndarray, grid: Sequence[int], target: str = "occupancy",
                 device="cpu", dtype=torch.float32, _packed=None):
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
        self.target = target
        self.level = 0.5 if target == "occupancy" else 0.0
        self.grid = CellGrid([0.0] * 3, [1.0] * 3, [int(g) for g in grid])
        if _packed is None:
            train = pack_samples(torch.as_tensor(train_x), torch.as_tensor(train_y),
                                 self.grid, dtype).to(device)
            ev = pack_samples(torch.as_tensor(eval_x),
                              torch.as_tensor(eval_inside, dtype=torch.float64)[:, None],
                              self.grid, dtype).to(device)
        else:
            train, ev = _packed
        super().__init__(train, data_range=1.0)
        self.eval_packed = ev
        self.model = None
        self.sampler: Optional[ShapeSampler] = None

    def set_points(self, train_x: np.ndarray, train_y: np.ndarray) -> None:
        """Replace the training points ``[M, 3]`` and targets ``[M, 1]`` (a fresh draw)."""
        dev = self.packed.x.device
        self.set_packed(pack_samples(torch.as_tensor(train_x), torch.as_tensor(train_y),
                                     self.grid, self.packed.x.dtype).to(dev))

    def resample(self) -> None:
        """A fresh draw from :attr:`sampler` (set by :func:`make_shape_problem`)."""
        if self.sampler is None:
            raise ValueError("resample: this ShapeProblem has no sampler")
        self.set_points(*self.sampler.draw())

    def inside(self, pred: torch.Tensor) -> torch.Tensor:
        """Network outputs -> inside (bool, same shape)."""
        return pred > self.level if self.target == "occupancy" else pred < self.level

    def cell_losses(self, model) -> torch.Tensor:
        self.model = model
        return super().cell_losses(model)

    def loss_and_backward(self, model) -> torch.Tensor:
        self.model = model
        return super().loss_and_backward(model)

    @torch.no_grad()
    def cell_quality_stats(self) -> torch.Tensor:
        """``[n_cells, 2]`` float64: per cell, the held-out points inside both the prediction
        and the shape, and inside either (the last model given to :meth:`cell_losses`)."""
        ev = self.eval_packed
        if self.model is None:
            return torch.zeros(self.n_cells, 2, dtype=torch.float64, device=ev.x.device)
        pred = self.inside(self.model.forward_dense(ev.x)[..., 0])
        true = ev.y[..., 0] > 0.5
        keep = ev.index >= 0
        both = (pred & true & keep).sum(-1)
        either = ((pred | true) & keep).sum(-1)
        return torch.stack([both, either], -1).double()

    def quality_from_stats(self, cell_losses: torch.Tensor, stats: torch.Tensor) -> float:
        """IoU from every cell's :meth:`cell_quality_stats` ``[n_cells, 2]`` (NaN when a loss
        is not finite)."""
        if not bool(torch.isfinite(cell_losses).all()):
            return float("nan")
        both, either = stats.sum(0).tolist()
        return 1.0 if either == 0 else both / either

    def quality(self, cell_losses: torch.Tensor) -> float:
        if self.model is None:
            return float("nan")
        return self.quality_from_stats(cell_losses, self.cell_quality_stats())

    def subset(self, cells: torch.Tensor) -> "ShapeProblem":
        return ShapeProblem(None, None, None, None, self.grid.resolution, self.target,
                            _packed=(self.packed.select(cells), self.eval_packed.select(cells)))


def make_shape_problem(mesh, grid: Sequence[int], target: str = "occupancy",
                       n_points: int = 100_000, n_eval: int = 50_000,
                       near_fraction: float = 0.5, sigma: float = 0.01, seed: int = 0,
                       device="cpu", source: str = "the mesh",
                       truncation: Optional[float] = None) -> ShapeProblem:
    """Sample, label and pack a normalised mesh; the problem's :attr:`~ShapeProblem.sampler`
    draws fresh training points of the same kind (:meth:`ShapeProblem.resample`). Raises
    ``ValueError`` (naming ``source``) when the mesh encloses no volume (e.g. an open sheet
    whose holes cannot be closed). ``truncation``: clamp signed distances (box units)."""
    sampler = ShapeSampler(mesh, target, n_points, near_fraction, sigma, truncation, seed)
    eval_x = sample_points(mesh, n_eval, 0.0, sigma, seed + 7919)
    w = np.abs(winding_numbers(mesh, eval_x))
    eval_inside = w > 0.5
    # a closed surface (or one with small holes) has w near 0 or 1 almost everywhere; an open
    # sheet leaves many points undecided and little or nothing inside
    undecided = int(((w > 0.2) & (w < 0.8)).sum())
    if eval_inside.sum() == 0 or undecided > 0.2 * eval_inside.sum() or eval_inside.mean() > 0.99:
        raise ValueError(f"{source}: the mesh encloses no usable volume ({eval_inside.mean():.3f} "
                         f"of the box inside, {undecided} of {len(w)} points undecided): it is "
                         f"open or broken beyond repair; close its holes or pass a watertight "
                         f"mesh")
    train_x, train_y = sampler.draw()
    problem = ShapeProblem(train_x, train_y, eval_x, eval_inside, grid, target, device=device)
    problem.sampler = sampler
    return problem
