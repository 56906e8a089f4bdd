"""A bit grid over the scene box for empty-space skipping (pure PyTorch, any device).

The box ``aabb = (xmin, ymin, zmin, xmax, ymax, zmax)`` is cut into ``R^3`` voxels, indexed
``[ix, iy, iz]`` (x slowest, as in nerfacc's ``OccGridEstimator``, so both backends read the
same bits). Each voxel keeps an exponential moving average ``density`` of the field's density
sampled at random points inside it; a voxel is *occupied* when one marching step through that
density would be visibly opaque:

    binary = 1 - exp(-density * step_size) > threshold

so ``threshold`` is an opacity (alpha) for one step of length ``step_size``, i.e. a density
threshold of ``-log(1 - threshold) / step_size``; while the field is still nearly
transparent everywhere (early in training), the density threshold is lowered to the mean
voxel density, so an update never empties a grid whose field is not uniform.

Before the first :meth:`OccupancyGrid.update` every voxel is occupied (``density`` is a large
sentinel). The first update *replaces* the sentinel by the measured density (an EMA that
started from a huge prior would keep every voxel alive for dozens of updates); later updates
use ``density = max(ema_decay * old, new)``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ...grid import CellGrid, in_box

_UNSET_DENSITY = 1e10


class OccupancyGrid(nn.Module):
    """Occupancy bits over an axis-aligned box.

    Args:
        aabb: 6 numbers ``xmin, ymin, zmin, xmax, ymax, zmax``.
        resolution: voxels per axis (an int, or 3 ints).
        ema_decay: decay of the running density per update.
        threshold: opacity threshold for one marching step (see the module docstring).

    Buffers: ``aabb [6]`` float, ``density [Rx, Ry, Rz]`` float, ``binary [Rx, Ry, Rz]`` bool,
    ``n_updates []`` long.
    """

    def __init__(self, aabb: Sequence[float], resolution=64, ema_decay: float = 0.95,
                 threshold: float = 0.01):
        super().__init__()
        aabb_t = torch.as_tensor(aabb, dtype=torch.float32).flatten()
        if aabb_t.numel() != 6 or not bool((aabb_t[3:] > aabb_t[:3]).all()):
            raise ValueError(f"OccupancyGrid: aabb must be 6 numbers with max > min, got {aabb}")
        res = [int(resolution)] * 3 if isinstance(resolution, int) else [int(r) for r in resolution]
        if len(res) != 3 or min(res) <= 0:
            raise ValueError(f"OccupancyGrid: resolution must be a positive int or 3 ints, "
                             f"got {resolution}")
        if not 0.0 < ema_decay <= 1.0:
            raise ValueError(f"OccupancyGrid: ema_decay must be in (0, 1], got {ema_decay}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"OccupancyGrid: threshold must be in [0, 1), got {threshold}")
        self.resolution = tuple(res)
        self.ema_decay = float(ema_decay)
        self.threshold = float(threshold)
        self.register_buffer("aabb", aabb_t)
        self.register_buffer("density", torch.full(res, _UNSET_DENSITY))
        self.register_buffer("binary", torch.ones(res, dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ geometry
    def _res_tensor(self, device) -> Tensor:
        return torch.tensor(self.resolution, device=device)

    def voxel_index(self, x: Tensor) -> Tensor:
        """``x [M, 3]`` -> integer voxel coordinates ``[M, 3]`` (long), clamped into the grid
        (points on the upper faces belong to the last voxel; use :meth:`inside` for the box)."""
        lo, hi = self.aabb[:3].to(x), self.aabb[3:].to(x)
        res = self._res_tensor(x.device)
        idx = torch.floor((x - lo) / (hi - lo) * res).long()
        return torch.minimum(idx.clamp_min(0), res - 1)

    def inside(self, x: Tensor) -> Tensor:
        """``x [M, 3]`` -> ``[M]`` bool: in the closed box."""
        return in_box(x, self.aabb[:3].to(x), self.aabb[3:].to(x))

    def flat_index(self, ijk: Tensor) -> Tensor:
        """``[M, 3]`` voxel coordinates -> ``[M]`` row-major ids (z fastest)."""
        _, ry, rz = self.resolution
        return (ijk[..., 0] * ry + ijk[..., 1]) * rz + ijk[..., 2]

    # ------------------------------------------------------------------ queries
    def occupied(self, x: Tensor) -> Tensor:
        """``x [M, 3]`` -> ``[M]`` bool: inside the box and in an occupied voxel."""
        bits = self.binary.reshape(-1)[self.flat_index(self.voxel_index(x))]
        return bits & self.inside(x)

    def occupied_fraction(self) -> float:
        return int(self.binary.sum()) / self.binary.numel()

    def threshold_density(self, step_size: float) -> float:
        """The density above which a voxel counts as occupied for this ``step_size``."""
        return -math.log1p(-self.threshold) / float(step_size)

    @torch.no_grad()
    def cells_occupied(self, cell_grid: CellGrid) -> Tensor:
        """``[n_cells]`` bool (row-major cell ids of ``cell_grid``): a cell is occupied when any
        occupied voxel overlaps it in a slab thicker than ``1e-6`` voxel widths on every axis.
        Conservative: a cell is never marked empty while an occupied voxel shares volume with
        it (voxels that only touch a cell's face do not count, so aligned grids stay tight).
        Parts of cells outside the occupancy box count as empty (the marcher never samples
        there). Voxels need not align with cells."""
        if cell_grid.dim != 3:
            raise ValueError(f"cells_occupied: need a 3-D CellGrid, got {cell_grid.dim}-D")
        dev = self.binary.device
        a_lo = self.aabb[:3].double().cpu()
        vox = ((self.aabb[3:] - self.aabb[:3]).double().cpu()
               / torch.tensor(self.resolution, dtype=torch.float64))
        bits = self.binary.to(torch.float32)
        eps = 1e-6
        mats = []
        for a in range(3):
            n_c, r = cell_grid.resolution[a], self.resolution[a]
            edges = (cell_grid.lo[a]
                     + torch.arange(n_c + 1, dtype=torch.float64) * cell_grid.cell_size[a])
            u = (edges - a_lo[a]) / vox[a]                         # cell edges in voxel units
            first = torch.floor(u[:-1] + eps).clamp(0, r)           # first overlapping voxel
            last = (torch.ceil(u[1:] - eps) - 1).clamp(-1, r - 1)   # last overlapping voxel
            i = torch.arange(r, dtype=torch.float64)
            mats.append(((i[None] >= first[:, None]) & (i[None] <= last[:, None]))
                        .to(device=dev, dtype=torch.float32))      # [n_c, r]
        counts = torch.einsum("ai,bj,ck,ijk->abc", mats[0], mats[1], mats[2], bits)
        return (counts > 0.5).reshape(-1)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], step_size: float,
               n_samples_per_voxel: int = 1, generator: Optional[torch.Generator] = None,
               chunk: int = 65536) -> None:
        """Re-measure every voxel and refresh the bits.

        Args:
            density_fn: ``x [M, 3] -> sigma [M]`` (or ``[M, 1]``), called under ``no_grad`` on
                at most ``chunk`` points at a time.
            step_size: the marching step the bits are for (see the threshold).
            n_samples_per_voxel: uniformly random points per voxel; the voxel keeps the max.
            generator: optional ``torch.Generator`` (on the grid's device) for the jitter.
        """
        if step_size <= 0:
            raise ValueError(f"OccupancyGrid.update: step_size must be positive, got {step_size}")
        dev, dtype = self.density.device, self.aabb.dtype
        rx, ry, rz = self.resolution
        n_vox = rx * ry * rz
        lo, hi = self.aabb[:3], self.aabb[3:]
        res = self._res_tensor(dev).to(dtype)
        new = torch.full((n_vox,), -float("inf"), device=dev, dtype=self.density.dtype)
        ids_all = torch.arange(n_vox, device=dev)
        for _ in range(max(1, int(n_samples_per_voxel))):
            for s in range(0, n_vox, chunk):
                ids = ids_all[s:s + chunk]
                ijk = torch.stack([ids // (ry * rz), (ids // rz) % ry, ids % rz], -1).to(dtype)
                u = torch.rand(ijk.shape, dtype=dtype, generator=generator,
                               device=generator.device if generator is not None else dev).to(dev)
                x = lo + (ijk + u) / res * (hi - lo)
                sigma = density_fn(x).reshape(-1).to(new.dtype)
                if sigma.numel() != ids.numel():
                    raise ValueError(f"density_fn returned {sigma.numel()} values for "
                                     f"{ids.numel()} points")
                new[s:s + chunk] = torch.maximum(new[s:s + chunk], sigma)
        new = new.reshape(self.resolution)
        if int(self.n_updates) == 0:
            self.density.copy_(new)
        else:
            self.density.copy_(torch.maximum(self.density * self.ema_decay, new))
        self.n_updates += 1
        self.refresh_binary(step_size)

    @torch.no_grad()
    def refresh_binary(self, step_size: float) -> None:
        """Recompute ``binary`` from ``density`` for ``step_size``."""
        density = self.density.clamp_min(0)
        thre = min(self.threshold_density(step_size), float(density.mean()))
        self.binary.copy_(density > thre)
