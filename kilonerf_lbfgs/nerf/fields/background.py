"""What lies beyond the scene box: a learned colour per ray direction.

A real capture is not masked: behind the object there is a room, a street, a sky. The cells
cover the object's box only, so every ray that leaves the box needs a colour for the rest of
its way. :class:`BackgroundMap` gives it one from the ray's direction alone: an
equirectangular map of RGB logits, sampled bilinearly and squashed by a sigmoid, trained with
the cells. It is the far-field (everything at infinity) model: cheap, one texture lookup per
ray, no extra marching, but it cannot show parallax of background objects near the cameras
(a contracted-space grid of cells would; see docs/design.md).

Example::

    bg = BackgroundMap(height=32)
    rgb = bg(torch.nn.functional.normalize(torch.randn(5, 3), dim=-1))   # [5, 3] in (0, 1)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def direction_to_equirect(d: torch.Tensor) -> torch.Tensor:
    """Unit directions ``[R, 3]`` (z up) -> ``[R, 2]`` map coordinates in ``[-1, 1]``:
    longitude ``atan2(y, x) / pi`` and latitude ``-asin(z) / (pi / 2)`` (the map's top row
    looks up, +z)."""
    d = torch.nn.functional.normalize(d, dim=-1)
    lon = torch.atan2(d[:, 1], d[:, 0]) / math.pi
    lat = -torch.asin(d[:, 2].clamp(-1.0, 1.0)) / (0.5 * math.pi)
    return torch.stack([lon, lat], -1)


class BackgroundMap(nn.Module):
    """A learned RGB per direction: ``d [R, 3] -> rgb [R, 3]`` in (0, 1).

    Args:
        height: map rows (latitude); the map is ``[3, height, 2 * height]`` logits and wraps
            around in longitude.
        init_rgb: the starting colour everywhere.
    """

    def __init__(self, height: int = 32, init_rgb: Sequence[float] = (0.5, 0.5, 0.5),
                 device=None):
        super().__init__()
        if height < 2:
            raise ValueError(f"BackgroundMap: height must be at least 2, got {height}")
        rgb = torch.as_tensor(init_rgb, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
        logits = torch.log(rgb / (1 - rgb))[:, None, None].expand(3, height, 2 * height)
        self.logits = nn.Parameter(logits.clone().to(device))
        self.height = int(height)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        uv = direction_to_equirect(d.to(self.logits.dtype))
        L = self.logits
        W = L.shape[-1]
        # wrap in longitude: one column from the other side on each edge, u rescaled to match
        padded = torch.cat([L[..., -1:], L, L[..., :1]], -1)
        u = (uv[:, 0] + 1.0) * (W / (W + 2.0)) - 1.0 + 2.0 / (W + 2.0)
        grid = torch.stack([u, uv[:, 1]], -1).view(1, 1, -1, 2)
        out = torch.nn.functional.grid_sample(padded[None], grid, mode="bilinear",
                                              padding_mode="border", align_corners=False)
        return torch.sigmoid(out[0, :, 0].t())

    def config(self) -> dict:
        return {"height": self.height}
