"""Distillation (KiloNeRF's route): each cell's network learns the teacher on samples inside
its cell, as an independent (separable) per-cell problem.

Two samplers, which can be mixed (:func:`concat_samples`):

* :func:`collect_distill_samples`: the ray samples of training rays marched through the
  teacher's occupancy grid (with the teacher's early ray termination, so they concentrate on
  visible surfaces);
* :func:`uniform_distill_samples`: points drawn uniformly inside each cell with directions
  uniform on the sphere (KiloNeRF's choice), as many per cell as asked, so every cell can
  get clearly more target values than its network has parameters.

Each sample carries the teacher's opacity for one marching step
``alpha = 1 - exp(-sigma * step)`` and its colour. The per-cell loss is the mean over the cell's samples of
``(alpha_s - alpha_t)^2 + mean_rgb (rgb_s - rgb_t)^2``; quality is
``distill_psnr = -10 log10(mean loss over all samples)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...fitting import CellProblem, Resample
from ...metrics import psnr_from_mse
from ..fields.kilonerf import KiloNeRFField
from ..data.rays import RayBank
from ..render.rendering import RenderSettings, field_fns


@dataclass
class DistillSamples:
    """Padded per-network samples: ``local [n, P, 3]``, ``dirs [n, P, 3]``,
    ``alpha [n, P]``, ``rgb [n, P, 3]``, ``mask [n, P]`` bool, ``counts [n]``."""
    local: torch.Tensor
    dirs: torch.Tensor
    alpha: torch.Tensor
    rgb: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor

    def to(self, device) -> "DistillSamples":
        return DistillSamples(*(t.to(device) for t in (self.local, self.dirs, self.alpha,
                                                        self.rgb, self.mask, self.counts)))

    def select(self, nets: torch.Tensor) -> "DistillSamples":
        return DistillSamples(*(t.index_select(0, nets) for t in
                                (self.local, self.dirs, self.alpha, self.rgb, self.mask,
                                 self.counts)))


@torch.no_grad()
def collect_distill_samples(teacher, marcher, bank: RayBank, field: KiloNeRFField,
                            rs: RenderSettings, n_rays: int, max_per_cell: int,
                            generator: torch.Generator, chunk: int = 8192) -> DistillSamples:
    """March ``n_rays`` random training rays with the teacher; keep at most
    ``max_per_cell`` random samples per network (uniformly chosen)."""
    xs, ds, alphas, rgbs = [], [], [], []
    for start in range(0, n_rays, chunk):
        o, d, _ = bank.sample(min(chunk, n_rays - start), generator)
        _, sigma_fn = field_fns(teacher, o, d)
        s = marcher.sample(o, d, rs.near, rs.far, rs.step_size, sigma_fn=sigma_fn,
                           early_stop_eps=rs.early_stop_eps, alpha_thre=rs.alpha_thre)
        if s.ray_indices.numel() == 0:
            continue
        x = s.positions(o, d)
        rgb, sigma = teacher(x, d[s.ray_indices])
        xs.append(x)
        ds.append(d[s.ray_indices])
        alphas.append(1.0 - torch.exp(-sigma * rs.step_size))
        rgbs.append(rgb)
    if not xs:
        raise ValueError("no ray sample hit an occupied voxel: the occupancy grid is empty")
    x, d, alpha, rgb = (torch.cat(v) for v in (xs, ds, alphas, rgbs))
    keep, net, local = field.locate(x)
    return pack_per_network(field.n_nets, net, local, d[keep], alpha[keep], rgb[keep],
                            max_per_cell, generator)


@torch.no_grad()
def pack_per_network(n: int, net: torch.Tensor, local: torch.Tensor, d: torch.Tensor,
                     alpha: torch.Tensor, rgb: torch.Tensor, max_per_cell: int,
                     generator: torch.Generator) -> DistillSamples:
    """Flat samples (``net [S]`` long, ``local [S,3]``, ``d [S,3]``, ``alpha [S]``,
    ``rgb [S,3]``) grouped by network into :class:`DistillSamples` of ``n`` networks, at
    most ``max_per_cell`` per network (a uniformly random subset where there are more)."""
    device = local.device
    # random order, then the first max_per_cell of each network
    perm = torch.randperm(net.numel(), generator=generator).to(device)
    net, local, d, alpha, rgb = net[perm], local[perm], d[perm], alpha[perm], rgb[perm]
    order = torch.sort(net, stable=True)[1]
    net, local, d, alpha, rgb = net[order], local[order], d[order], alpha[order], rgb[order]
    counts_all = torch.bincount(net, minlength=n)
    starts = torch.cumsum(counts_all, 0) - counts_all
    slot = torch.arange(net.numel(), device=device) - starts[net]
    sel = slot < max_per_cell
    net, slot = net[sel], slot[sel]
    counts = counts_all.clamp(max=max_per_cell)
    P = max(int(counts.max()), 1)
    out = DistillSamples(local=torch.zeros(n, P, 3, device=device),
                         dirs=torch.zeros(n, P, 3, device=device),
                         alpha=torch.zeros(n, P, device=device),
                         rgb=torch.zeros(n, P, 3, device=device),
                         mask=torch.zeros(n, P, dtype=torch.bool, device=device),
                         counts=counts)
    out.local[net, slot] = local[sel]
    out.dirs[net, slot] = d[sel]
    out.alpha[net, slot] = alpha[sel]
    out.rgb[net, slot] = rgb[sel]
    out.mask[net, slot] = True
    # padded slots get a harmless unit direction
    out.dirs[~out.mask] = torch.tensor([0.0, 0.0, 1.0], device=device)
    return out


@torch.no_grad()
def uniform_distill_samples(teacher, field: KiloNeRFField, n_per_cell: int, step_size: float,
                            generator: torch.Generator, chunk: int = 1 << 18) -> DistillSamples:
    """``n_per_cell`` points uniform in each network's cell, directions uniform on the
    sphere, with the teacher's ``alpha`` and colour as targets.

    Returns :class:`DistillSamples` with ``P = n_per_cell`` and every slot valid.

    Example::

        samples = uniform_distill_samples(teacher, field, 4096, rs.step_size, gen)
        samples.local.shape     # [field.n_nets, 4096, 3], in the cell's [-1, 1]^3
    """
    if n_per_cell < 1:
        raise ValueError(f"n_per_cell must be >= 1, got {n_per_cell}")
    device = field.net_cells.device
    n, P = field.n_nets, int(n_per_cell)
    local = (torch.rand(n, P, 3, generator=generator) * 2.0 - 1.0).to(device)
    dirs = torch.nn.functional.normalize(torch.randn(n, P, 3, generator=generator), dim=-1)
    dirs = dirs.to(device)
    cells = field.net_cells[:, None].expand(n, P).reshape(-1)
    x = field.cell_grid.to_global(local.reshape(-1, 3), cells)
    d = dirs.reshape(-1, 3)
    rgb, alpha = torch.empty(n * P, 3, device=device), torch.empty(n * P, device=device)
    for a in range(0, n * P, chunk):
        c, sigma = teacher(x[a:a + chunk], d[a:a + chunk])
        rgb[a:a + chunk], alpha[a:a + chunk] = c, 1.0 - torch.exp(-sigma * step_size)
    return DistillSamples(local=local, dirs=dirs, alpha=alpha.view(n, P),
                          rgb=rgb.view(n, P, 3),
                          mask=torch.ones(n, P, dtype=torch.bool, device=device),
                          counts=torch.full((n,), P, dtype=torch.long, device=device))


def concat_samples(a: DistillSamples, b: DistillSamples) -> DistillSamples:
    """The samples of ``a`` and ``b`` per network (``[n, Pa + Pb, ...]``), padding kept."""
    return DistillSamples(*(torch.cat([x, y], 1) for x, y in
                            ((a.local, b.local), (a.dirs, b.dirs), (a.alpha, b.alpha),
                             (a.rgb, b.rgb), (a.mask, b.mask))),
                          counts=a.counts + b.counts)


class DistillProblem(CellProblem):
    """The separable distillation problem for :func:`kilonerf_lbfgs.fitting.fit`:
    ``cell_losses(field) -> [n_nets]``, one independent loss per network."""

    quality_name = "distill_psnr"
    shardable = True            # quality from the per-network losses and sample counts alone

    def __init__(self, samples: DistillSamples, step_size: float,
                 nets: Optional[torch.Tensor] = None):
        self.step_size, self.nets = float(step_size), nets
        self.n_cells = int(samples.counts.numel())
        self.set_samples(samples)

    def cell_losses(self, field: KiloNeRFField) -> torch.Tensor:
        s = self.samples
        rgb, sigma = field.forward_cells(s.local, s.dirs, self.nets)
        alpha = 1.0 - torch.exp(-sigma * self.step_size)
        err = (alpha - s.alpha) ** 2 + ((rgb - s.rgb) ** 2).mean(-1)
        return (err * self.weight).sum(-1)

    def quality(self, cell_losses: torch.Tensor) -> float:
        counts = self.samples.counts.to(cell_losses.dtype)
        return psnr_from_mse(float((cell_losses * counts).sum() / counts.sum().clamp(min=1)))

    def subset(self, cells: torch.Tensor) -> "DistillProblem":
        return DistillProblem(self.samples.select(cells), self.step_size)

    def set_samples(self, samples: DistillSamples) -> None:
        """Replace the samples (same networks): the objective becomes another batch."""
        if int(samples.counts.numel()) != self.n_cells:
            raise ValueError(f"set_samples: {int(samples.counts.numel())} networks, the "
                             f"problem has {self.n_cells}")
        self.samples = samples
        self.version = getattr(self, "version", -1) + 1     # which draw of samples this is
        self.weight = samples.mask.float() / samples.counts.clamp(min=1).float()[:, None]


class FreshUniformSamples(Resample):
    """A :func:`~kilonerf_lbfgs.fitting.fit` callback: before every step but the first,
    ``problem`` gets a fresh draw of :func:`uniform_distill_samples` (``n_per_cell`` per
    network), and an optimiser with ``new_objective`` (:class:`BatchedLBFGS`) is told, so
    its line searches restart on the new batch; its curvature pairs, each measured within
    one batch, are kept when ``keep_history``. Drawing the samples and the teacher's
    targets is training work, so the hook is timed.

    The distillation target is a continuous function: a fixed sample set is overfitted
    (fitting it well and generalising badly), fresh samples are not.
    """

    def __init__(self, problem: DistillProblem, teacher, field: KiloNeRFField,
                 n_per_cell: int, step_size: float, generator: torch.Generator,
                 keep_history: bool = True):
        self.problem, self.teacher, self.field = problem, teacher, field
        self.n_per_cell, self.step_size, self.generator = n_per_cell, step_size, generator
        # a draw before every step but the first (every step spends at least 1 evaluation)
        super().__init__(self._draw, every=1, keep_history=keep_history)

    def _draw(self) -> None:
        self.problem.set_samples(uniform_distill_samples(
            self.teacher, self.field, self.n_per_cell, self.step_size, self.generator))
