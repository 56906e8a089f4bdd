"""Output-space Gauss-Newton targets (the design card's route): the analytic Jacobian
against autograd, the alpha-form compositing against volrend, and the step's properties."""
import pytest
import torch

from kilonerf_lbfgs.nerf.render.volrend import composite
from kilonerf_lbfgs.nerf.train.output_targets import (composite_alpha, gauss_newton_targets,
                                                      ray_jacobians)


def packed_batch(seed=0, n_rays=6, max_samples=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_samples + 1, (n_rays,), generator=g)
    ray = torch.repeat_interleave(torch.arange(n_rays), counts)
    s = int(counts.sum())
    alpha = torch.rand(s, generator=g, dtype=dtype) * 0.9
    rgb = torch.rand(s, 3, generator=g, dtype=dtype)
    gt = torch.rand(n_rays, 3, generator=g, dtype=dtype)
    bg = torch.tensor([0.2, 0.5, 0.9], dtype=dtype)
    return alpha, rgb, ray, n_rays, gt, bg


def test_alpha_compositing_equals_volrend():
    alpha, rgb, ray, n, _, bg = packed_batch(1)
    delta = torch.full_like(alpha, 0.01)
    sigma = -torch.log1p(-alpha) / delta
    t0 = torch.arange(alpha.numel(), dtype=alpha.dtype) * 0.01
    ref = composite(rgb, sigma, t0, t0 + delta, ray, n, bg)["rgb"]
    torch.testing.assert_close(composite_alpha(alpha, rgb, ray, n, bg), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_analytic_jacobian_equals_autograd(seed):
    alpha, rgb, ray, n, _, bg = packed_batch(seed)
    C, a, w = ray_jacobians(alpha, rgb, ray, n, bg)
    al, c = alpha.clone().requires_grad_(), rgb.clone().requires_grad_()
    out = composite_alpha(al, c, ray, n, bg)
    torch.testing.assert_close(C, out.detach())
    for k in range(3):                  # rays are independent: one backward per channel
        g_alpha, g_rgb = torch.autograd.grad(out[:, k].sum(), (al, c), retain_graph=True)
        torch.testing.assert_close(a[:, k], g_alpha)
        expected = torch.zeros_like(rgb)
        expected[:, k] = w
        torch.testing.assert_close(g_rgb, expected)


def test_undamped_step_zeroes_the_linearised_residual():
    alpha, rgb, ray, n, gt, bg = packed_batch(3)
    C, a, w = ray_jacobians(alpha, rgb, ray, n, bg)
    # targets without clamping: a tiny step keeps them inside the ranges
    eta = 1e-3
    alpha_t, rgb_t, _ = gauss_newton_targets(alpha, rgb, ray, n, gt, bg, damping=1e-10,
                                             step=eta)
    d_alpha, d_rgb = (alpha_t - alpha) / eta, (rgb_t - rgb) / eta
    lin = C.clone().index_add_(0, ray, a * d_alpha[:, None] + w[:, None] * d_rgb)
    torch.testing.assert_close(lin, gt, atol=1e-6, rtol=0)


def test_step_is_a_descent_direction_and_lowers_the_loss():
    alpha, rgb, ray, n, gt, bg = packed_batch(4, n_rays=32)
    before = ((composite_alpha(alpha, rgb, ray, n, bg) - gt) ** 2).sum()
    al, c = alpha.clone().requires_grad_(), rgb.clone().requires_grad_()
    loss = ((composite_alpha(al, c, ray, n, bg) - gt) ** 2).sum()
    g_alpha, g_rgb = torch.autograd.grad(loss, (al, c))
    alpha_t, rgb_t, _ = gauss_newton_targets(alpha, rgb, ray, n, gt, bg, damping=0.1,
                                             step=1e-3)
    inner = (g_alpha * (alpha_t - alpha)).sum() + (g_rgb * (rgb_t - rgb)).sum()
    assert inner < 0
    alpha_t, rgb_t, _ = gauss_newton_targets(alpha, rgb, ray, n, gt, bg, damping=0.1)
    after = ((composite_alpha(alpha_t, rgb_t, ray, n, bg) - gt) ** 2).sum()
    assert after < 0.5 * before, (float(before), float(after))


def test_docstring_example_and_bad_arguments():
    a, c, _ = gauss_newton_targets(torch.tensor([0.5]), torch.tensor([[0.2, 0.2, 0.2]]),
                                   torch.tensor([0]), 1, torch.tensor([[0.3, 0.3, 0.3]]),
                                   damping=1e-9)
    torch.testing.assert_close(composite_alpha(a, c, torch.tensor([0]), 1),
                               torch.full((1, 3), 0.3877), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="damping"):
        gauss_newton_targets(*packed_batch()[:4], packed_batch()[4], damping=0.0)
