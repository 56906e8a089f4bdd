"""A fast teacher field for distillation: dense voxel grids in pure PyTorch.

Density lives in a ``[R, R, R]`` grid, ``sigma = softplus(grid + shift) * R / extent``:
density per voxel width, so grid values of order ten already make a voxel opaque (a few
dozen Adam steps at learning rate 0.1), and the shift makes an untrained grid nearly
transparent, colour features in a coarser ``[C, Rc, Rc, Rc]``
grid; both are read with trilinear interpolation (``grid_sample``). A small MLP maps the
interpolated feature and the view direction to rgb. Trained with Adam at a high learning
rate on the grids, this reaches a usable radiance field in minutes on a CPU, and its
density gives the occupancy grid and the distillation targets.

The dense grid runs on any device. A tinycudann hash-grid teacher for CUDA (the issue's
option where tinycudann is installed) is not implemented yet; the dense grid serves there too.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn



def direction_encoding(d: torch.Tensor, n_freqs: int = 2) -> torch.Tensor:
    """Unit directions ``[S, 3]`` -> ``[S, 3 + 6 * n_freqs]`` (identity + sin/cos octaves)."""
    out = [d]
    for k in range(n_freqs):
        out += [torch.sin((2.0 ** k) * torch.pi * d), torch.cos((2.0 ** k) * torch.pi * d)]
    return torch.cat(out, -1)


class DenseGridTeacher(nn.Module):
    """Args:
        aabb: scene box ``(xmin, ymin, zmin, xmax, ymax, zmax)``.
        resolution: density grid cells per axis; ``color_resolution``: feature grid.
        feature_dim: feature channels; ``mlp_width``: the colour MLP's hidden width.
    """

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
        self.hparams = dict(resolution=r, color_resolution=rc, feature_dim=feature_dim,
                            mlp_width=mlp_width, density_shift=density_shift)

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
