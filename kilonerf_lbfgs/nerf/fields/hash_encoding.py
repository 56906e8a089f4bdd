"""Multiresolution hash encoding (Mueller et al., Instant-NGP, 2022) for the teacher field.

Points ``x [S, 3]`` in the unit cube are looked up in ``L`` levels of trainable feature tables
``[L, T, F]``. Level ``l`` is a lattice of resolution ``N_l = floor(N_min * b^l)`` with
``b = (N_max / N_min)^(1 / (L - 1))``; a point's 8 surrounding lattice vertices are mapped to
table rows and their features blended trilinearly. A coarse level whose ``(N_l + 1)^3``
vertices fit in the table indexes it one-to-one; finer levels hash the vertex (XOR of the
coordinates times large primes, modulo ``T``), and collisions are left to training.

:class:`TorchHashEncoding` runs anywhere (pure PyTorch). :class:`TcnnHashEncoding` wraps
tinycudann's fused CUDA encoding with the same settings; :func:`make_hash_encoding` picks it
when :func:`kilonerf_lbfgs.backends.tinycudann_available` and the device is CUDA. The two
agree in layout and resolution schedule, not bit for bit (tinycudann offsets the lattice by
half a cell and stores half-precision features).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...backends import tinycudann_available

# per-axis primes of the spatial hash (the first is 1: consecutive x stay coherent)
_PRIMES = (1, 2654435761, 805459861)


def per_level_scale(n_levels: int, base_res: int, max_res: int) -> float:
    """``b``: the growth of the lattice resolution from one level to the next."""
    if n_levels < 1 or base_res < 1 or max_res < base_res:
        raise ValueError("hash encoding: need n_levels >= 1 and 1 <= base_res <= max_res")
    return 1.0 if n_levels == 1 else math.exp(math.log(max_res / base_res) / (n_levels - 1))


def level_resolutions(n_levels: int, base_res: int, max_res: int) -> list:
    """``[N_0, ..., N_{L-1}]``: a geometric ladder from ``base_res`` to ``max_res``."""
    b = per_level_scale(n_levels, base_res, max_res)
    return [int(math.floor(base_res * b ** level + 1e-6)) for level in range(n_levels)]


class TorchHashEncoding(nn.Module):
    """``x [S, 3]`` in ``[0, 1]^3`` -> features ``[S, n_levels * n_features]``.

    Args:
        n_levels, n_features: levels ``L`` and features per level ``F``.
        log2_table: ``T = 2^log2_table`` rows per level.
        base_res, max_res: the coarsest and finest lattice resolutions.
        init_scale: table entries start uniform in ``[-init_scale, init_scale]``.
    """

    def __init__(self, n_levels: int = 16, n_features: int = 2, log2_table: int = 19,
                 base_res: int = 16, max_res: int = 1024, init_scale: float = 1e-4,
                 generator: Optional[torch.Generator] = None, device=None):
        super().__init__()
        self.table_size = 2 ** int(log2_table)
        res = level_resolutions(n_levels, base_res, max_res)
        self.register_buffer("res", torch.tensor(res, dtype=torch.long, device=device))
        # one-to-one indexing where the whole lattice fits in the table
        dense = [(r + 1) ** 3 <= self.table_size for r in res]
        self.register_buffer("dense", torch.tensor(dense, device=device))
        table = torch.rand(n_levels, self.table_size, n_features, generator=generator)
        self.table = nn.Parameter(((table * 2 - 1) * init_scale).to(device))
        corners = torch.tensor([[(c >> k) & 1 for k in range(3)] for c in range(8)])
        self.register_buffer("corners", corners.to(device))                   # [8, 3]
        self.register_buffer("primes", torch.tensor(_PRIMES, dtype=torch.long, device=device))
        self.n_output_dims = n_levels * n_features

    def vertex_index(self, vertex: torch.Tensor) -> torch.Tensor:
        """Integer lattice vertices ``[L, ..., 3]`` -> table rows ``[L, ...]``."""
        shape = (-1,) + (1,) * (vertex.dim() - 2)
        stride = (self.res + 1).view(shape)
        linear = vertex[..., 0] + stride * (vertex[..., 1] + stride * vertex[..., 2])
        p = self.primes
        hashed = torch.bitwise_xor(torch.bitwise_xor(vertex[..., 0] * p[0], vertex[..., 1] * p[1]),
                                   vertex[..., 2] * p[2])
        return torch.where(self.dense.view(shape), linear, hashed) % self.table_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_levels, _, n_feat = self.table.shape
        pos = x.clamp(0.0, 1.0)[None] * self.res.view(-1, 1, 1).to(x.dtype)     # [L, S, 3]
        base = pos.floor().clamp(max=self.res.view(-1, 1, 1).to(x.dtype) - 1)
        frac = pos - base                                                       # [L, S, 3]
        vertex = base.long()[:, :, None, :] + self.corners                      # [L, S, 8, 3]
        rows = self.vertex_index(vertex)                                        # [L, S, 8]
        # trilinear weight of each corner: prod over axes of frac or (1 - frac)
        w = torch.where(self.corners.bool(), frac[:, :, None, :],
                        1.0 - frac[:, :, None, :]).prod(-1)
        # one flat lookup (embedding's backward accumulates far faster on CPU than the
        # index_put of advanced indexing)
        level = torch.arange(n_levels, device=x.device).view(-1, 1, 1) * self.table_size
        feats = F.embedding(rows + level, self.table.view(-1, n_feat))          # [L, S, 8, F]
        out = (feats * w[..., None]).sum(2)                                     # [L, S, F]
        return out.permute(1, 0, 2).reshape(x.shape[0], n_levels * n_feat)


class TcnnHashEncoding(nn.Module):
    """tinycudann's CUDA hash grid with the settings of :class:`TorchHashEncoding`."""

    def __init__(self, n_levels: int = 16, n_features: int = 2, log2_table: int = 19,
                 base_res: int = 16, max_res: int = 1024, **_unused):
        super().__init__()
        import tinycudann as tcnn  # only reached when tinycudann_available()
        scale = per_level_scale(n_levels, base_res, max_res)
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features,
            "log2_hashmap_size": log2_table, "base_resolution": base_res,
            "per_level_scale": scale})
        self.n_output_dims = n_levels * n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(x.clamp(0.0, 1.0)).float()


def make_hash_encoding(config: Dict, device, backend: str = "auto",
                       generator: Optional[torch.Generator] = None) -> nn.Module:
    """The hash encoding for ``device``: tinycudann's where it runs (``backend`` ``auto`` or
    ``tcnn``), else pure PyTorch (``backend`` ``torch``, or ``auto`` without tinycudann)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend not in ("auto", "torch", "tcnn"):
        raise ValueError(f"hash encoding backend {backend!r}: choose auto, torch or tcnn")
    usable = dev.type == "cuda" and tinycudann_available()
    if backend == "tcnn" and not usable:
        raise ValueError("hash encoding backend tcnn: needs a CUDA device and an importable "
                         "tinycudann; use backend torch or auto")
    if backend != "torch" and usable:
        return TcnnHashEncoding(**config).to(dev)
    return TorchHashEncoding(**config, generator=generator, device=dev)
