"""A fast teacher field for distillation: dense voxel grids in pure PyTorch.

Density lives in a ``[R, R, R]`` grid, ``sigma = softplus(grid + shift) * R / extent``:
density per voxel width, so grid values of order ten already make a voxel opaque (a few
dozen Adam steps at learning rate 0.1), and the shift makes an untrained grid nearly
transparent, colour features in a coarser ``[C, Rc, Rc, Rc]``
grid; both are read with trilinear interpolation (``grid_sample``). A small MLP maps the
interpolated feature and the view direction to rgb. Trained with Adam at a high learning
rate on the grids, this reaches a usable radiance field in minutes on a CPU, and its
density gives the occupancy grid and the distillation targets.

:class:`HashGridTeacher` is the hashed alternative (``--teacher hash``): a multiresolution hash
encoding (:mod:`.hash_encoding`; tinycudann's fused kernels on CUDA where it is installed,
pure PyTorch elsewhere) followed by small density and colour MLPs, Instant-NGP style. It
holds far finer detail per byte than the dense grid; on a CPU its lookups (16 levels x 8
corners per point) cost more than the dense grid's, so the dense grid is the default.
Both share one interface (``density``, ``color``, ``forward``, ``optimizer``, ``hparams``);
:func:`make_teacher` builds either from its ``hparams``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .hash_encoding import make_hash_encoding

def direction_encoding(d: torch.Tensor, n_freqs: int = 2) -> torch.Tensor:
    """Unit directions ``[S, 3]`` -> ``[S, 3 + 6 * n_freqs]`` (identity + sin/cos octaves)."""
    out = [d]
    for k in range(n_freqs):
        out += [torch.sin((2.0 ** k) * torch.pi * d), torch.cos((2.0 ** k) * torch.pi * d)]
    return torch.cat(out, -1)


class DenseGridTeacher(nn.Module):
    """Dense density and feature grids (the default teacher).

    Args:
        aabb: scene box ``(xmin, ymin, zmin, xmax, ymax, zmax)``.
        resolution: density grid cells per axis; ``color_resolution``: feature grid.
        feature_dim: feature channels; ``mlp_width``: the colour MLP's hidden width.
    """

    default_lr = 0.3            # Adam on the grids (the colour MLP: 1e-3)

    def __init__(self, aabb: Sequence[float], resolution: int = 128,
                 color_resolution: int = 64, feature_dim: int = 12, mlp_width: int = 64,
                 density_shift: float = -6.0, device=None):
        super().__init__()
        self.aabb = [float(v) for v in aabb]
        self.register_buffer("lo", torch.tensor(self.aabb[:3], device=device))
        self.register_buffer("hi", torch.tensor(self.aabb[3:], device=device))
        self.density_shift = float(density_shift)
        r, rc = int(resolution), int(color_resolution)
        extent = sum(h - l for l, h in zip(self.aabb[:3], self.aabb[3:])) / 3.0
        self.density_scale = r / extent
        self.density_grid = nn.Parameter(torch.zeros(1, 1, r, r, r, device=device))
        self.feature_grid = nn.Parameter(torch.zeros(1, feature_dim, rc, rc, rc, device=device))
        d_dir = direction_encoding(torch.zeros(1, 3)).shape[1]
        self.color_mlp = nn.Sequential(nn.Linear(feature_dim + d_dir, mlp_width), nn.ReLU(),
                                       nn.Linear(mlp_width, 3)).to(device)
        self.hparams = dict(kind="dense", resolution=r, color_resolution=rc,
                            feature_dim=feature_dim, mlp_width=mlp_width,
                            density_shift=density_shift)

    def _sample(self, grid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Trilinear lookup of ``grid [1, C, R, R, R]`` (axes x, y, z) at ``x [S, 3]`` -> ``[S, C]``."""
        u = (x - self.lo) / (self.hi - self.lo) * 2.0 - 1.0
        # grid_sample's last coordinate indexes dim 2, the first indexes dim 4
        g = u.flip(-1).view(1, -1, 1, 1, 3)
        out = F.grid_sample(grid, g, mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(grid.shape[1], -1).T

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """``x [S, 3]`` -> sigma ``[S]`` (zero outside the box)."""
        inside = ((x >= self.lo) & (x <= self.hi)).all(-1)
        raw = self._sample(self.density_grid, x)[:, 0]
        return F.softplus(raw + self.density_shift) * self.density_scale * inside

    def color(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``x [S, 3]``, unit ``d [S, 3]`` -> rgb ``[S, 3]``."""
        feat = self._sample(self.feature_grid, x)
        return torch.sigmoid(self.color_mlp(torch.cat([feat, direction_encoding(d)], -1)))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [S, 3]``, unit ``d [S, 3]`` -> (rgb ``[S, 3]``, sigma ``[S]``)."""
        return self.color(x, d), self.density(x)

    def optimizer(self, lr_grid: float = 0.1, lr_mlp: float = 1e-3) -> torch.optim.Optimizer:
        return torch.optim.Adam([
            {"params": [self.density_grid, self.feature_grid], "lr": lr_grid},
            {"params": self.color_mlp.parameters(), "lr": lr_mlp}])

    def total_variation(self) -> torch.Tensor:
        """Mean squared difference of neighbouring density voxels (a smoothness prior)."""
        g = self.density_grid
        return sum(((g.narrow(a, 1, g.shape[a] - 1) - g.narrow(a, 0, g.shape[a] - 1)) ** 2).mean()
                   for a in (2, 3, 4))


class HashGridTeacher(nn.Module):
    """Hash-encoded density and colour (Instant-NGP style).

    ``sigma = softplus(mlp(enc(u))[0] + shift) * density_scale`` with ``u`` the point in box
    coordinates ``[0, 1]^3``; the same MLP's other outputs and the encoded view direction feed
    a colour MLP. ``density_scale = 128 / extent`` as the dense teacher at its default
    resolution, so the two start equally transparent and saturate alike.

    Args:
        aabb: scene box; ``n_levels``, ``n_features``, ``log2_table``, ``base_res``,
            ``max_res``: the hash encoding (:class:`.hash_encoding.TorchHashEncoding`).
        mlp_width: hidden width of both MLPs; ``geo_features``: density MLP outputs besides
            density, passed to the colour MLP.
        backend: ``auto`` (tinycudann on CUDA where installed), ``torch`` or ``tcnn``.

    The defaults are sized for a CPU (8 levels of 2^15 rows up to 256 per axis). One Adam
    step on 25k points, one thread, measured 0.34 s at 8 levels of 2^14 rows against the
    dense teacher's 0.25 s, and 1.3-2.0 s at Instant-NGP's 16 levels of 2^19 rows up to
    1024; on CUDA with tinycudann the larger tables are cheap.
    """

    default_lr = 1e-2           # Adam on the tables and the MLPs

    def __init__(self, aabb: Sequence[float], n_levels: int = 8, n_features: int = 2,
                 log2_table: int = 15, base_res: int = 16, max_res: int = 256,
                 mlp_width: int = 64, geo_features: int = 15, density_shift: float = -6.0,
                 backend: str = "auto", device=None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.aabb = [float(v) for v in aabb]
        self.register_buffer("lo", torch.tensor(self.aabb[:3], device=device))
        self.register_buffer("hi", torch.tensor(self.aabb[3:], device=device))
        enc = dict(n_levels=n_levels, n_features=n_features, log2_table=log2_table,
                   base_res=base_res, max_res=max_res)
        self.encoding = make_hash_encoding(enc, device, backend, generator)
        self.density_shift = float(density_shift)
        extent = sum(h - l for l, h in zip(self.aabb[:3], self.aabb[3:])) / 3.0
        self.density_scale = 128.0 / extent
        d_dir = direction_encoding(torch.zeros(1, 3)).shape[1]
        self.density_mlp = nn.Sequential(
            nn.Linear(self.encoding.n_output_dims, mlp_width), nn.ReLU(),
            nn.Linear(mlp_width, 1 + geo_features)).to(device)
        self.color_mlp = nn.Sequential(
            nn.Linear(geo_features + d_dir, mlp_width), nn.ReLU(),
            nn.Linear(mlp_width, mlp_width), nn.ReLU(), nn.Linear(mlp_width, 3)).to(device)
        self.hparams = dict(kind="hash", **enc, mlp_width=mlp_width, geo_features=geo_features,
                            density_shift=density_shift, backend=backend)

    def _trunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [S, 3]`` -> (sigma ``[S]``, geometry features ``[S, geo_features]``)."""
        inside = ((x >= self.lo) & (x <= self.hi)).all(-1)
        h = self.density_mlp(self.encoding((x - self.lo) / (self.hi - self.lo)))
        sigma = F.softplus(h[:, 0] + self.density_shift) * self.density_scale * inside
        return sigma, h[:, 1:]

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """``x [S, 3]`` -> sigma ``[S]`` (zero outside the box)."""
        return self._trunk(x)[0]

    def color(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``x [S, 3]``, unit ``d [S, 3]`` -> rgb ``[S, 3]``."""
        return self.forward(x, d)[0]

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [S, 3]``, unit ``d [S, 3]`` -> (rgb ``[S, 3]``, sigma ``[S]``)."""
        sigma, geo = self._trunk(x)
        rgb = torch.sigmoid(self.color_mlp(torch.cat([geo, direction_encoding(d)], -1)))
        return rgb, sigma

    def optimizer(self, lr_grid: Optional[float] = None,
                  lr_mlp: Optional[float] = None) -> torch.optim.Optimizer:
        lr_grid = lr_grid or self.default_lr
        # eps 1e-15: hash rows that few points touch still move (Instant-NGP's setting)
        return torch.optim.Adam([
            {"params": self.encoding.parameters(), "lr": lr_grid},
            {"params": list(self.density_mlp.parameters()) + list(self.color_mlp.parameters()),
             "lr": lr_mlp or lr_grid}], eps=1e-15)


TEACHERS = {"dense": DenseGridTeacher, "hash": HashGridTeacher}


def make_teacher(hparams: Dict, aabb: Sequence[float], device=None) -> nn.Module:
    """A teacher from its ``hparams`` (``kind`` ``dense`` when absent: older checkpoints)."""
    h = dict(hparams)
    kind = h.pop("kind", "dense")
    if kind not in TEACHERS:
        raise ValueError(f"teacher kind {kind!r}: choose {' or '.join(TEACHERS)}")
    return TEACHERS[kind](aabb, device=device, **h)
