"""Rendering a field along rays: the settings of a render, the marcher's callbacks for a
field, and ``render_rays``.

Any field with ``forward(x [S,3], d [S,3]) -> (rgb [S,3], sigma [S])`` and
``density(x [S,3]) -> sigma [S]`` works (the KiloNeRF field and the teachers); a field with a
separate ``color(x, d)`` gets its colour evaluated only where it can matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from .volrend import render_weights


@dataclass
class RenderSettings:
    near: float
    far: float
    step_size: float
    background: torch.Tensor            # [3]
    early_stop_eps: float = 1e-4
    alpha_thre: float = 0.0


COLOR_WEIGHT_EPS = 1e-4


def field_fns(model: nn.Module, rays_o: torch.Tensor, rays_d: torch.Tensor):
    """The marcher's callbacks for ``model`` on these rays:
    ``rgb_sigma_fn(t0, t1, ray) -> (rgb [S,3], sigma [S])`` and ``sigma_fn(t0, t1, ray) -> [S]``.

    A model with a separate ``color(x, d)`` (the grid teacher) gets colour only where the
    sample's rendering weight is above ``COLOR_WEIGHT_EPS`` (weights from the density,
    without gradient); elsewhere its colour cannot change the image by more than that.
    """
    def positions(t0, t1, ray):
        return rays_o[ray] + rays_d[ray] * ((t0 + t1) * 0.5)[:, None]

    def rgb_sigma_fn(t0, t1, ray):
        x = positions(t0, t1, ray)
        if not hasattr(model, "color"):
            return model(x, rays_d[ray])
        sigma = model.density(x)
        with torch.no_grad():
            w = render_weights(sigma.detach(), t0, t1, ray, rays_o.shape[0])[0]
            keep = torch.nonzero(w > COLOR_WEIGHT_EPS).flatten()
        rgb = x.new_zeros(x.shape[0], 3).index_put((keep,), model.color(x[keep], rays_d[ray[keep]]))
        return rgb, sigma

    def sigma_fn(t0, t1, ray):
        return model.density(positions(t0, t1, ray))

    return rgb_sigma_fn, sigma_fn


def render_rays(model: nn.Module, marcher, rays_o: torch.Tensor, rays_d: torch.Tensor,
                rs: RenderSettings, chunk: int = 8192) -> Dict:
    """Render rays ``[R, 3]`` -> dict(rgb ``[R,3]``, opacity ``[R]``, depth ``[R]``, n_samples)."""
    rgb_sigma_fn, sigma_fn = field_fns(model, rays_o, rays_d)
    return marcher.render(rays_o, rays_d, rgb_sigma_fn, rs.near, rs.far, rs.step_size,
                          rs.background, early_stop_eps=rs.early_stop_eps,
                          alpha_thre=rs.alpha_thre, chunk=chunk, sigma_fn=sigma_fn)
