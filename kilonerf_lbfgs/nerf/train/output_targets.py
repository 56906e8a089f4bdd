"""Per-sample targets from the photometric loss: a Gauss-Newton step in output space.

The design card's literal route: *each grid cell's network is trained with L-BFGS on its ray
samples*. The photometric loss couples the cells through compositing, so it is not separable
per cell; its **outputs** are. For one ray batch with fixed samples, the rendered colour of a
ray depends only on its own samples' opacities ``alpha_i`` and colours ``c_i`` (alpha form of
the quadrature in :mod:`~kilonerf_lbfgs.nerf.render.volrend`)::

    T_i = prod_{j<i} (1 - alpha_j),  w_i = T_i alpha_i,
    C   = sum_i w_i c_i + T_end * background.

Its Jacobian with respect to the samples' outputs is, per sample,
``dC/dc_i = w_i I`` and ``dC/dalpha_i = a_i = T_i c_i - (sum_{j>i} w_j c_j + T_end bg) /
(1 - alpha_i)``. A ray has a 3-vector residual ``r = C - C_gt``, so the Levenberg-Marquardt
step on the ray's outputs needs only a 3x3 solve::

    M = sum_i (a_i a_i^T + w_i^2 I) + lambda I,   u = M^{-1} (C_gt - C),
    delta alpha_i = a_i . u,   delta c_i = w_i u

(the minimum-norm step that zeroes the linearised residual as ``lambda -> 0``). The new
outputs ``alpha_i + eta delta alpha_i``, ``c_i + eta delta c_i`` (clamped to their ranges) are
**targets**: every cell then fits its own samples' targets with
:class:`~kilonerf_lbfgs.optim.BatchedLBFGS`, a separable full-batch least-squares problem
(:class:`~kilonerf_lbfgs.nerf.train.distill.DistillProblem`), for a few iterations; the next
ray batch gives new targets. See ``docs/nerf_lbfgs.md`` for how it measures against Adam.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..render.volrend import accumulate_along_rays, exclusive_sum_per_ray

ALPHA_MAX = 1.0 - 1e-6


def transmittance_alpha(alpha: Tensor, ray: Tensor, n_rays: int) -> Tuple[Tensor, Tensor]:
    """``alpha [S]`` -> (``T [S]`` before each sample, ``T_end [n_rays]``)."""
    log_keep = torch.log1p(-alpha.clamp(max=ALPHA_MAX))
    trans = torch.exp(exclusive_sum_per_ray(log_keep, ray, n_rays))
    total = torch.zeros(n_rays, dtype=alpha.dtype, device=alpha.device).index_add(
        0, ray, log_keep)
    return trans, torch.exp(total)


def composite_alpha(alpha: Tensor, rgb: Tensor, ray: Tensor, n_rays: int,
                    background: Optional[Tensor] = None) -> Tensor:
    """Pixel colours ``[n_rays, 3]`` from per-sample opacities ``alpha [S]`` and colours
    ``rgb [S, 3]`` (packed, ``ray [S]`` non-decreasing). Differentiable. Equals
    :func:`~kilonerf_lbfgs.nerf.render.volrend.composite` with ``alpha = 1 - exp(-sigma
    delta)``."""
    trans, t_end = transmittance_alpha(alpha, ray, n_rays)
    out = accumulate_along_rays(trans * alpha, rgb, ray, n_rays)
    if background is not None:
        out = out + t_end[:, None] * torch.as_tensor(background, dtype=out.dtype,
                                                     device=out.device).expand(n_rays, 3)
    return out


@torch.no_grad()
def ray_jacobians(alpha: Tensor, rgb: Tensor, ray: Tensor, n_rays: int,
                  background: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The rendered colours and their Jacobian with respect to each sample's outputs.

    Returns:
        ``(C [n_rays, 3], a [S, 3], w [S])`` with ``a_i = dC/dalpha_i`` and
        ``dC/dc_i = w_i I`` (see the module docstring). Tested against autograd.
    """
    alpha = alpha.clamp(0.0, ALPHA_MAX)
    trans, t_end = transmittance_alpha(alpha, ray, n_rays)
    w = trans * alpha
    wc = w[:, None] * rgb                                        # [S, 3]
    fg = accumulate_along_rays(w, rgb, ray, n_rays)              # [R, 3]
    inclusive = exclusive_sum_per_ray(wc, ray, n_rays) + wc      # sum_{j<=i} w_j c_j
    bg = torch.zeros(3, dtype=rgb.dtype, device=rgb.device) if background is None else \
        torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
    behind = fg[ray] - inclusive + t_end[ray, None] * bg          # light from behind sample i
    a = trans[:, None] * rgb - behind / (1.0 - alpha)[:, None]
    return fg + t_end[:, None] * bg, a, w


@torch.no_grad()
def gauss_newton_targets(alpha: Tensor, rgb: Tensor, ray: Tensor, n_rays: int,
                         rgb_gt: Tensor, background: Optional[Tensor] = None,
                         damping: float = 0.1, step: float = 1.0
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample targets from one damped Gauss-Newton (Levenberg-Marquardt) step of each
    ray's photometric residual in output space.

    Args:
        alpha: ``[S]`` opacities in [0, 1); rgb: ``[S, 3]`` colours in [0, 1].
        ray: ``[S]`` long, non-decreasing; n_rays: rays in the batch.
        rgb_gt: ``[n_rays, 3]`` target pixel colours.
        damping: ``lambda`` relative to the mean eigenvalue of each ray's ``M`` (> 0).
        step: ``eta``, the fraction of the step taken (1: the full step).

    Returns:
        ``(alpha_target [S], rgb_target [S, 3], rendered [n_rays, 3])``, targets clamped to
        ``[0, 1)`` and ``[0, 1]``.

    Example (one ray, one sample, black background; the pixel is ``alpha * c = 0.1`` and
    should be 0.3; the step is exact to first order, the product is not linear)::

        a, c, C = gauss_newton_targets(torch.tensor([0.5]), torch.tensor([[0.2, 0.2, 0.2]]),
                                       torch.tensor([0]), 1, torch.tensor([[0.3, 0.3, 0.3]]),
                                       damping=1e-9)
        composite_alpha(a, c, torch.tensor([0]), 1)      # ~ [[0.388, 0.388, 0.388]]
    """
    if not damping > 0 or not step > 0:
        raise ValueError(f"gauss_newton_targets: damping and step must be positive, got "
                         f"{damping}, {step}")
    C, a, w = ray_jacobians(alpha, rgb, ray, n_rays, background)
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    outer = a[:, :, None] * a[:, None, :] + (w * w)[:, None, None] * eye      # [S, 3, 3]
    M = torch.zeros(n_rays, 3, 3, dtype=a.dtype, device=a.device).index_add(0, ray, outer)
    lam = damping * M.diagonal(dim1=1, dim2=2).mean(-1) + 1e-12              # [R]
    M = M + lam[:, None, None] * eye
    u = torch.linalg.solve(M, (rgb_gt - C).to(a.dtype))                        # [R, 3]
    d_alpha = (a * u[ray]).sum(-1)
    d_rgb = w[:, None] * u[ray]
    alpha_t = (alpha + step * d_alpha).clamp(0.0, ALPHA_MAX)
    rgb_t = (rgb + step * d_rgb).clamp(0.0, 1.0)
    return alpha_t, rgb_t, C


__all__ = ["transmittance_alpha", "composite_alpha", "ray_jacobians", "gauss_newton_targets"]
