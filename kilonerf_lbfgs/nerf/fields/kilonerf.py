"""The KiloNeRF field: a 3-D grid of cells, one tiny sine network per occupied cell.

Each occupied cell holds two small networks with leading dimension ``n_nets`` (so the
batched optimisers treat every cell as its own problem):

* the trunk, local position ``[-1, 1]^3 -> (log-density, feature)``, a sine MLP;
* the head, ``(feature, view direction) -> rgb``: the view direction enters only here.

Density is ``exp(density_scale * raw + density_bias)`` clamped to ``exp(15)``: a log
parameterisation, so a network with outputs of order one spans empty space (``~0.05``)
to opaque surfaces (``~1e3``) without huge weights. Colour is ``sigmoid(head)``.
Cells that hold no network and points outside the box have zero density.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ...grid import CellGrid
from ...multinet import MultiMLP

MAX_LOG_DENSITY = 15.0


class KiloNeRFField(nn.Module):
    """Args:
        aabb: ``(xmin, ymin, zmin, xmax, ymax, zmax)`` of the scene box.
        resolution: cells per axis.
        occupied: ``[resolution**3]`` bool, the cells that get a network (default: all).
        width, depth: trunk hidden width and hidden layers.
        feature_dim: trunk feature passed to the head.
        head_width: the head's hidden width (one hidden layer).
        activation, omega_0: trunk activation and its frequency; ``head_omega`` the head's.
    """

    def __init__(self, aabb: Sequence[float], resolution: int = 16,
                 occupied: Optional[torch.Tensor] = None, width: int = 32, depth: int = 3,
                 feature_dim: int = 15, head_width: int = 32, activation: str = "sine",
                 omega_0: float = 30.0, head_omega: float = 5.0,
                 density_scale: float = 4.0, density_bias: float = -3.0,
                 generator: Optional[torch.Generator] = None, device=None):
        super().__init__()
        aabb = [float(v) for v in aabb]
        self.aabb = aabb
        self.resolution = int(resolution)
        self.cell_grid = CellGrid(aabb[:3], aabb[3:], self.resolution)
        n_total = self.cell_grid.n_cells
        if occupied is None:
            occupied = torch.ones(n_total, dtype=torch.bool)
        occupied = occupied.to(torch.bool).flatten().cpu()
        if occupied.numel() != n_total:
            raise ValueError(f"occupied has {occupied.numel()} entries, the grid {n_total}")
        if not bool(occupied.any()):
            raise ValueError("the occupancy grid marks every cell empty: nothing to fit")
        net_cells = torch.nonzero(occupied).flatten()
        cell_to_net = torch.full((n_total,), -1, dtype=torch.long)
        cell_to_net[net_cells] = torch.arange(net_cells.numel())
        self.register_buffer("net_cells", net_cells.to(device))
        self.register_buffer("cell_to_net", cell_to_net.to(device))
        self.hparams = dict(width=width, depth=depth, feature_dim=feature_dim,
                            head_width=head_width, activation=activation, omega_0=omega_0,
                            head_omega=head_omega, density_scale=density_scale,
                            density_bias=density_bias)
        self.density_scale, self.density_bias = float(density_scale), float(density_bias)
        n = net_cells.numel()
        self.trunk = MultiMLP(n, 3, 1 + feature_dim, width, depth, activation,
                              omega_0=omega_0, generator=generator, device=device)
        self.head = MultiMLP(n, feature_dim + 3, 3, head_width, 1, "sine",
                             omega_0=head_omega, generator=generator, device=device)

    @property
    def n_nets(self) -> int:
        return int(self.net_cells.numel())

    @property
    def n_cells(self) -> int:
        """The networks (one per occupied cell), as the fit loop counts cells."""
        return self.n_nets

    def select(self, nets: torch.Tensor) -> "KiloNeRFField":
        """:meth:`subset` of networks ``nets [k]`` given in increasing order (one rank's
        block of a sharded fit keeps its order)."""
        return self.subset(nets)

    @property
    def params_per_cell(self) -> int:
        return self.trunk.params_per_cell + self.head.params_per_cell

    def occupied_cells(self) -> torch.Tensor:
        """``[resolution**3]`` bool: cells that hold a network."""
        return self.cell_to_net >= 0

    def to_sigma(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.exp((self.density_scale * raw + self.density_bias).clamp(max=MAX_LOG_DENSITY))

    def locate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [S, 3]`` -> (keep ``[S]`` bool: the point has a network, net ``[K]``,
        local coordinates ``[K, 3]``) for the kept points."""
        cell = self.cell_grid.cell_of(x, outside="mark")
        net = torch.where(cell >= 0, self.cell_to_net[cell.clamp(min=0)], cell)
        keep = net >= 0
        cell_k, net_k = cell[keep], net[keep]
        return keep, net_k, self.cell_grid.to_local(x[keep], cell_k)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Points ``x [S, 3]`` seen from unit directions ``d [S, 3]`` -> (rgb ``[S, 3]``,
        sigma ``[S]``), all networks evaluated in one ragged batched call."""
        keep, net, local = self.locate(x)
        rgb = x.new_zeros(x.shape[0], 3)
        sigma = x.new_zeros(x.shape[0])
        if net.numel():
            out = self.trunk(local, net)
            col = self.head(torch.cat([out[:, 1:], d[keep]], -1), net)
            rgb = rgb.index_put((keep,), torch.sigmoid(col))
            sigma = sigma.index_put((keep,), self.to_sigma(out[:, 0]))
        return rgb, sigma

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """``x [S, 3]`` -> sigma ``[S]`` (the trunk only)."""
        keep, net, local = self.locate(x)
        sigma = x.new_zeros(x.shape[0])
        if net.numel():
            sigma = sigma.index_put((keep,), self.to_sigma(self.trunk(local, net)[:, 0]))
        return sigma

    def forward_cells(self, local: torch.Tensor, d: torch.Tensor,
                      nets: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense per-network evaluation for distillation: local coordinates
        ``[n, P, 3]`` and directions ``[n, P, 3]`` of networks ``nets [n]`` (default all)
        -> (rgb ``[n, P, 3]``, sigma ``[n, P]``)."""
        out = self.trunk.forward_dense(local, nets)
        col = self.head.forward_dense(torch.cat([out[..., 1:], d], -1), nets)
        return torch.sigmoid(col), self.to_sigma(out[..., 0])

    def subset(self, nets: torch.Tensor) -> "KiloNeRFField":
        """A field holding copies of networks ``nets [k]`` only (for per-cell baselines)."""
        occ = torch.zeros(self.cell_grid.n_cells, dtype=torch.bool)
        occ[self.net_cells[nets].cpu()] = True
        # keep the requested order: build then copy in sorted-cell order
        sub = KiloNeRFField(self.aabb, self.resolution, occ, device=self.net_cells.device,
                            **self.hparams)
        order = torch.argsort(self.net_cells[nets])
        src = nets[order]
        with torch.no_grad():
            for dst_p, src_p in zip(sub.parameters(), self.parameters()):
                dst_p.copy_(src_p[src])
        return sub

    def config(self) -> dict:
        """What :meth:`from_config` needs to rebuild the field (before loading weights)."""
        return {"aabb": self.aabb, "resolution": self.resolution,
                "occupied": self.occupied_cells().cpu(), **self.hparams}

    @classmethod
    def from_config(cls, cfg: dict, device=None) -> "KiloNeRFField":
        return cls(device=device, **cfg)
