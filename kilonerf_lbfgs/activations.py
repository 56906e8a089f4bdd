"""Activations of the tiny coordinate networks and the initialisations that go with them.

- ``sine``: ``sin(omega_0 * z)`` with SIREN initialisation (Sitzmann et al. 2020): first layer
  ``U(-1/fan_in, 1/fan_in)``, later layers ``U(-sqrt(6/fan_in)/omega_0, +sqrt(6/fan_in)/omega_0)``,
  which keeps pre-activations arcsine-distributed layer after layer.
- ``gaussian``: ``exp(-z^2 / (2 sigma^2))`` (Ramasinghe & Lucey 2022), default ``nn.Linear`` init.
- ``relu_pe``: ReLU layers after a Fourier-feature positional encoding of the input
  (``[x, sin(2^k pi x), cos(2^k pi x)]``, ``k < n_freqs``), default ``nn.Linear`` init.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = ("sine", "gaussian", "relu_pe")


class Sine(nn.Module):
    """``sin(omega_0 * z)``."""

    def __init__(self, omega_0: float = 30.0):
        super().__init__()
        self.omega_0 = float(omega_0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega_0 * z)

    def extra_repr(self) -> str:
        return f"omega_0={self.omega_0}"


class Gaussian(nn.Module):
    """``exp(-z^2 / (2 sigma^2))``."""

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * (z / self.sigma) ** 2)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class PositionalEncoding(nn.Module):
    """``x [..., d] -> [..., d * (1 + 2 * n_freqs)]``: ``[x, sin(2^k pi x), cos(2^k pi x)]``."""

    def __init__(self, n_freqs: int = 5):
        super().__init__()
        self.n_freqs = int(n_freqs)
        self.register_buffer("freqs", (2.0 ** torch.arange(self.n_freqs)) * math.pi,
                             persistent=False)

    def out_dim(self, d_in: int) -> int:
        return d_in * (1 + 2 * self.n_freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = (x[..., None] * self.freqs.to(x)).flatten(-2)  # [..., d * n_freqs]
        return torch.cat([x, torch.sin(xf), torch.cos(xf)], dim=-1)

    def extra_repr(self) -> str:
        return f"n_freqs={self.n_freqs}"


def make_activation(name: str, omega_0: float = 30.0, sigma: float = 0.1) -> nn.Module:
    """The hidden-layer activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    if name == "sine":
        return Sine(omega_0)
    if name == "gaussian":
        return Gaussian(sigma)
    if name == "relu_pe":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


@torch.no_grad()
def init_layer_(weight: torch.Tensor, bias: torch.Tensor, activation: str, layer: int,
                omega_0: float = 30.0, generator: torch.Generator | None = None) -> None:
    """Initialise one layer in place for every cell.

    Args:
        weight: ``[n_cells, fan_in, fan_out]``.
        bias: ``[n_cells, fan_out]``.
        activation: the network's activation name.
        layer: 0 for the first layer.
    """
    fan_in = weight.shape[1]
    if activation == "sine":
        bound = 1.0 / fan_in if layer == 0 else math.sqrt(6.0 / fan_in) / omega_0
    else:  # nn.Linear's default (kaiming_uniform with a=sqrt(5))
        bound = 1.0 / math.sqrt(fan_in)
    b_bias = 1.0 / math.sqrt(fan_in)
    if generator is None or generator.device == weight.device:
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-b_bias, b_bias, generator=generator)
    else:   # e.g. a CPU generator for CUDA weights: draw there, so both devices start the same
        on = generator.device
        weight.copy_(torch.empty(weight.shape, device=on).uniform_(-bound, bound,
                                                                    generator=generator))
        bias.copy_(torch.empty(bias.shape, device=on).uniform_(-b_bias, b_bias,
                                                               generator=generator))
