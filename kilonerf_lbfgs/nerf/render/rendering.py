"""Rendering a field along rays: the settings of a render, the marcher's callbacks for a
field, and ``render_rays``.

Any field with ``forward(x [S,3], d [S,3]) -> (rgb [S,3], sigma [S])`` and
``density(x [S,3]) -> sigma [S]`` works (the KiloNeRF field and the teachers); a field with a
separate ``color(x, d)`` gets its colour evaluated only where it can matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from .volrend import render_weights


@dataclass
class RenderSettings:
    """How rays are rendered. ``background``: an RGB ``[3]`` tensor, or a module mapping
    ray directions ``[R, 3]`` to colours ``[R, 3]`` (e.g. a learned
    :class:`~kilonerf_lbfgs.nerf.fields.background.BackgroundMap`)."""
    near: float
    far: float
    step_size: float
    background: torch.Tensor            # [3], or a module d [R, 3] -> rgb [R, 3]
    early_stop_eps: float = 1e-4
    alpha_thre: float = 0.0

    @property
    def device(self) -> torch.device:
        bg = self.background
        return bg.device if isinstance(bg, torch.Tensor) else next(bg.parameters()).device

    def background_for(self, rays_d: torch.Tensor) -> torch.Tensor:
        """The background colour behind rays ``rays_d [R, 3]``: ``[3]`` or ``[R, 3]``."""
        bg = self.background
        return bg if isinstance(bg, torch.Tensor) else bg(rays_d)


COLOR_WEIGHT_EPS = 1e-4


def field_fns(model: nn.Module, rays_o: torch.Tensor, rays_d: torch.Tensor,
              color_weight_eps: Optional[float] = COLOR_WEIGHT_EPS):
    """The marcher's callbacks for ``model`` on rays ``rays_o, rays_d [R, 3]``:
    ``rgb_sigma_fn(t0, t1, ray) -> (rgb [S,3], sigma [S])`` and ``sigma_fn(t0, t1, ray) -> [S]``.

    A model with a separate ``color(x, d)`` (the teachers) gets colour only where the
    sample's rendering weight is above ``color_weight_eps`` (weights from the density,
    without gradient); elsewhere its colour is 0, which changes a pixel by at most the sum of
    the skipped weights times the largest colour. ``color_weight_eps=None`` computes every
    colour (the reference the skipping is tested against).
    """
    def positions(t0, t1, ray):
        return rays_o[ray] + rays_d[ray] * ((t0 + t1) * 0.5)[:, None]

    def rgb_sigma_fn(t0, t1, ray):
        x = positions(t0, t1, ray)
        if not hasattr(model, "color") or color_weight_eps is None:
            return model(x, rays_d[ray])
        sigma = model.density(x)
        with torch.no_grad():
            w = render_weights(sigma.detach(), t0, t1, ray, rays_o.shape[0])[0]
            keep = torch.nonzero(w > color_weight_eps).flatten()
        rgb = x.new_zeros(x.shape[0], 3).index_put((keep,), model.color(x[keep], rays_d[ray[keep]]))
        return rgb, sigma

    def sigma_fn(t0, t1, ray):
        return model.density(positions(t0, t1, ray))

    return rgb_sigma_fn, sigma_fn


def render_rays(model: nn.Module, marcher, rays_o: torch.Tensor, rays_d: torch.Tensor,
                rs: RenderSettings, chunk: int = 8192,
                color_weight_eps: Optional[float] = COLOR_WEIGHT_EPS) -> Dict:
    """Render rays ``[R, 3]`` -> dict(rgb ``[R,3]``, opacity ``[R]``, depth ``[R]``, n_samples).

    ``color_weight_eps``: see :func:`field_fns`."""
    rgb_sigma_fn, sigma_fn = field_fns(model, rays_o, rays_d, color_weight_eps)
    return marcher.render(rays_o, rays_d, rgb_sigma_fn, rs.near, rs.far, rs.step_size,
                          rs.background_for(rays_d), early_stop_eps=rs.early_stop_eps,
                          alpha_thre=rs.alpha_thre, chunk=chunk, sigma_fn=sigma_fn)
