"""Packed volume rendering in pure PyTorch (any device, differentiable).

Samples are *packed*: the samples of all rays lie in one flat tensor of length ``S``, and
``ray_indices [S]`` (non-decreasing: a ray's samples are contiguous and ordered front to
back) says which ray each belongs to. Per-ray quantities are ``[n_rays, ...]``.

Quadrature (Max 1995; NeRF):

- optical thickness of a sample ``tau_i = sigma_i * (t_end_i - t_start_i)``
- opacity ``alpha_i = 1 - exp(-tau_i)``
- transmittance before the sample ``T_i = exp(-sum_{j < i, same ray} tau_j)``
- weight ``w_i = T_i * alpha_i``; per ray ``sum_i w_i = 1 - T_end <= 1``.

The per-ray exclusive sum is a global cumulative sum minus each ray's value at its first
sample; it is done in float64 so that rays late in a long batch keep full precision (a
float32 running sum over millions of samples would swamp small thicknesses). There is no
Python loop over rays.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


def ray_starts(ray_indices: Tensor, n_rays: int) -> Tuple[Tensor, Tensor]:
    """``ray_indices [S]`` (non-decreasing) -> (first sample of each ray ``[n_rays]`` long,
    samples per ray ``[n_rays]`` long). Rays with no samples get count 0."""
    counts = torch.bincount(ray_indices, minlength=n_rays) if ray_indices.numel() else \
        torch.zeros(n_rays, dtype=torch.long, device=ray_indices.device)
    starts = torch.cumsum(counts, 0) - counts
    return starts, counts


def exclusive_sum_per_ray(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """``values [S]`` -> ``[S]``: for each sample, the sum of the earlier samples of its ray
    (0 for a ray's first sample). Differentiable; computed in float64, returned in the input
    dtype."""
    if values.numel() == 0:
        return values.clone()
    v64 = values.to(torch.float64)
    inclusive = torch.cumsum(v64, 0)
    exclusive = inclusive - v64
    starts, _ = ray_starts(ray_indices, n_rays)
    offset = exclusive[starts[ray_indices]]
    return (exclusive - offset).to(values.dtype)


def render_weights(sigmas: Tensor, t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor,
                   n_rays: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Volume-rendering weights of packed samples.

    Args:
        sigmas: ``[S]`` non-negative densities.
        t_starts, t_ends: ``[S]`` interval ends along the ray.
        ray_indices: ``[S]`` long, non-decreasing.
        n_rays: number of rays.

    Returns:
        ``(weights [S], transmittance [S] (before each sample), alphas [S])``.
    """
    tau = sigmas * (t_ends - t_starts)
    alphas = -torch.expm1(-tau)                    # 1 - exp(-tau), accurate for small tau
    trans = torch.exp(-exclusive_sum_per_ray(tau, ray_indices, n_rays))
    return trans * alphas, trans, alphas


def accumulate_along_rays(weights: Tensor, values: Optional[Tensor], ray_indices: Tensor,
                          n_rays: int) -> Tensor:
    """``sum_i w_i * v_i`` per ray.

    Args:
        weights: ``[S]``.
        values: ``[S, C]``, or ``None`` to accumulate the weights themselves (opacity).
        ray_indices: ``[S]`` long.
        n_rays: number of rays.

    Returns:
        ``[n_rays, C]`` (``[n_rays, 1]`` when ``values`` is ``None``); rays without samples get 0.
    """
    src = weights[:, None] if values is None else weights[:, None] * values
    out = torch.zeros((n_rays, src.shape[-1]), dtype=src.dtype, device=src.device)
    return out.index_add(0, ray_indices, src)


def composite(rgbs: Tensor, sigmas: Tensor, t_starts: Tensor, t_ends: Tensor,
              ray_indices: Tensor, n_rays: int, background: Optional[Tensor] = None
              ) -> Dict[str, Tensor]:
    """Composite packed samples into pixel colours over a background.

    Args:
        rgbs: ``[S, 3]``; sigmas: ``[S]``; t_starts, t_ends: ``[S]``;
        ray_indices: ``[S]`` long, non-decreasing; n_rays: number of rays.
        background: ``[3]`` or ``[n_rays, 3]`` colour behind the scene (``None``: black).

    Returns:
        dict with

        - ``rgb [n_rays, 3]``: ``sum_i w_i c_i + (1 - opacity) * background``;
        - ``opacity [n_rays]``: ``sum_i w_i``;
        - ``depth [n_rays]``: *normalised* expected depth
          ``sum_i w_i t_mid_i / max(opacity, eps)`` (nerfacc's convention; 0 for rays with
          no weight); multiply by ``opacity`` for the raw expectation;
        - ``weights [S]``.
    """
    weights, _, _ = render_weights(sigmas, t_starts, t_ends, ray_indices, n_rays)
    rgb = accumulate_along_rays(weights, rgbs, ray_indices, n_rays)
    opacity = accumulate_along_rays(weights, None, ray_indices, n_rays)[:, 0]
    t_mid = 0.5 * (t_starts + t_ends)
    depth = accumulate_along_rays(weights, t_mid[:, None], ray_indices, n_rays)[:, 0]
    depth = depth / opacity.clamp_min(torch.finfo(depth.dtype).eps)
    if background is not None:
        bg = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
        rgb = rgb + (1.0 - opacity)[:, None] * bg.expand(n_rays, 3)
    return {"rgb": rgb, "opacity": opacity, "depth": depth, "weights": weights}
