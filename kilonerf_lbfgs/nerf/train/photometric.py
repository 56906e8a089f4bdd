"""Training a radiance field from photos: the photometric loop (Adam, or coupled BatchedLBFGS).

Any field with ``forward(x [S,3], d [S,3]) -> (rgb [S,3], sigma [S])`` and
``density(x [S,3]) -> sigma [S]`` works (the KiloNeRF field and the grid teacher).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import torch
from torch import nn

from ...backends import synchronize
from ...metrics import psnr_from_mse
from ...optim import BatchedLBFGS
from ..data.rays import RayBank
from ..render.rendering import RenderSettings, field_fns, render_rays
from ..render.volrend import composite


@dataclass
class PhotometricConfig:
    optimizer: str = "adam"             # adam | lbfgs (BatchedLBFGS, coupled mode) |
                                        # lbfgs_targets (per-cell BatchedLBFGS on output-space
                                        # Gauss-Newton targets of each ray batch)
    lr: float = 1e-3
    lr_end_factor: float = 0.1          # Adam: exponential decay to lr * factor at the end
    batch_rays: int = 4096
    seconds: float = 60.0
    update_every: int = 16              # occupancy-grid updates every N steps ...
    occ_warmup: float = 0.15            # ... after this fraction of the stage (a fresh grid)
    warmup_coarse: float = 4.0          # marching step factor until the grid's first update
    lbfgs_evals: int = 4                # L-BFGS: closure evaluations per ray batch
    lbfgs_line_search: str = "strong_wolfe"  # lbfgs: along each batch's direction, or none:
    lbfgs_lr: float = 1.0               # ... a step of lbfgs_lr (decayed like Adam's rate)
    lbfgs_max_step: Optional[float] = None  # lbfgs: per-cell trust region (BatchedLBFGS)
    gn_damping: float = 0.1             # lbfgs_targets: Levenberg-Marquardt damping ...
    gn_step: float = 1.0                # ... and step fraction of the output-space targets
    targets_per_cell: int = 1024        # lbfgs_targets: at most this many samples per cell
    history_size: int = 20
    history_dtype: Optional[str] = "auto"   # L-BFGS: storage of the curvature pairs
    tv_weight: float = 0.0              # total-variation weight (models with total_variation)
    target_psnr: Optional[float] = None
    max_steps: int = 0                  # > 0: also stop after this many steps (reproducible)
    desc: str = "train"


@dataclass
class LoopState:
    seconds: float = 0.0
    steps: int = 0
    evals: int = 0
    history: List[List[float]] = None   # [[seconds, batch psnr], ...]

    def __post_init__(self):
        self.history = self.history or []


def make_photometric_optimizer(model: nn.Module, cfg: PhotometricConfig):
    if cfg.optimizer == "lbfgs_targets":
        return BatchedLBFGS(list(model.parameters()), lr=1.0, history_size=cfg.history_size,
                            max_eval=cfg.lbfgs_evals, line_search="strong_wolfe",
                            history_dtype=cfg.history_dtype)
    if cfg.optimizer == "lbfgs":
        return BatchedLBFGS(list(model.parameters()), lr=cfg.lbfgs_lr,
                            history_size=cfg.history_size, max_eval=cfg.lbfgs_evals,
                            line_search=cfg.lbfgs_line_search, max_step=cfg.lbfgs_max_step,
                            history_dtype=cfg.history_dtype)
    if hasattr(model, "optimizer"):
        return model.optimizer()
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def _progress(cfg: PhotometricConfig, state: LoopState) -> float:
    """The stage's progress in [0, 1] for learning-rate schedules; with a step budget it
    follows steps, so it does not depend on the clock."""
    return min(1.0, state.steps / cfg.max_steps if cfg.max_steps > 0
               else state.seconds / max(cfg.seconds, 1e-9))


def _one_step(model, marcher, bank: RayBank, rs: RenderSettings, cfg: PhotometricConfig,
              state: LoopState, opt, generator: torch.Generator, shards, base_lrs):
    """One training step of :func:`train_photometric`: ``(loss [], seconds it took)``."""
    device = bank.rgbs.device
    synchronize(device)
    t0 = time.perf_counter()
    if state.steps % cfg.update_every == 0 and (
            state.seconds >= cfg.occ_warmup * cfg.seconds
            or int(marcher.grid.n_updates) > 0):
        marcher.update(model.density, rs.step_size)
    o, d, c = bank.sample(cfg.batch_rays, generator)
    if shards is not None:           # this rank's slice of the same global batch
        k = cfg.batch_rays // shards.world
        o, d, c = (t[shards.rank * k:(shards.rank + 1) * k] for t in (o, d, c))
    # until the grid knows where the scene is, march coarsely (densities are per unit
    # length, so the field is the same at any step; only the sampling is cheaper)
    rs_now = rs if int(marcher.grid.n_updates) > 0 else replace(
        rs, step_size=rs.step_size * cfg.warmup_coarse)
    if cfg.optimizer == "lbfgs":
        if cfg.lbfgs_line_search == "none":     # a step schedule: decays like Adam's rate
            opt.param_groups[0]["lr"] = cfg.lbfgs_lr * cfg.lr_end_factor ** _progress(cfg,
                                                                                       state)
        loss = _lbfgs_step(model, marcher, o, d, c, rs_now, opt, state)
    elif cfg.optimizer == "lbfgs_targets":
        loss = _targets_step(model, marcher, o, d, c, rs_now, opt, state, cfg, generator)
    else:
        frac = _progress(cfg, state)
        for g, lr0 in zip(opt.param_groups, base_lrs):
            g["lr"] = lr0 * cfg.lr_end_factor ** frac
        opt.zero_grad(set_to_none=True)
        out = render_rays(model, marcher, o, d, rs_now, chunk=max(cfg.batch_rays, 1))
        loss = torch.mean((out["rgb"] - c) ** 2)
        total = loss
        if cfg.tv_weight > 0 and hasattr(model, "total_variation"):
            total = total + cfg.tv_weight * model.total_variation()
        total.backward()
        if shards is not None:
            _average_gradients(model, shards)
            loss = _average_scalar(loss.detach(), shards)
        opt.step()
        state.evals += 1
    synchronize(device)
    dt = time.perf_counter() - t0
    if shards is not None:           # every rank stops at the same step
        from ...distributed import all_max
        dt = all_max(dt, shards)
    return loss, dt


def train_photometric(model: nn.Module, marcher, bank: RayBank, rs: RenderSettings,
                      cfg: PhotometricConfig, state: LoopState, opt, generator: torch.Generator,
                      checkpoint: Optional[Callable[[], None]] = None, ckpt_every: float = 60.0,
                      progress: bool = True, probe: Optional[Callable[[float], None]] = None,
                      probe_every: float = math.inf, shards=None,
                      step_lock=None, on_step: Optional[Callable[[LoopState, float], None]] = None
                      ) -> LoopState:
    """Train ``model`` on random ray batches until ``cfg.seconds`` of training (``state``
    carries the clock of a resumed run). Adam: a fresh batch per step. L-BFGS (coupled):
    one batch and its samples stay fixed for ``lbfgs_evals`` evaluations, so the line
    search sees one function. The occupancy grid is updated from the model's density every
    ``update_every`` steps (counted as training time). Only training is timed.

    ``probe(seconds)``, when given, is called (untimed) every ``probe_every`` seconds of
    training and once at the end, e.g. to measure test PSNR against the clock.

    ``shards`` (:class:`~kilonerf_lbfgs.distributed.Shards`, torchrun; Adam only): data
    parallel. Every rank draws the same batch and trains on its slice of
    ``batch_rays / world`` rays; the gradients are averaged over ranks (the gradient of the
    whole batch's loss), so every rank takes the same step, and the clock and the reported
    loss are agreed each step; rank 0 alone shows the progress bar.

    ``step_lock`` (e.g. a live viewer's lock) is held for each step, acquired before its clock
    starts; ``on_step(state, train_psnr)`` is called after each step, untimed."""
    if shards is not None and cfg.optimizer != "adam":
        raise ValueError(f"data-parallel training supports Adam only, not {cfg.optimizer}")
    if shards is not None and cfg.batch_rays % shards.world:
        raise ValueError(f"batch_rays {cfg.batch_rays} must be a multiple of the "
                         f"{shards.world} processes")
    progress = progress and (shards is None or shards.is_main)
    # the starting rates survive a resume (an optimizer state_dict keeps its param_groups)
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in opt.param_groups]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=round(cfg.seconds, 1), unit="s", desc=cfg.desc,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s "
                              "[{elapsed}<{remaining}{postfix}]")
        bar.update(min(state.seconds, cfg.seconds))
    last_ckpt, last_probe, ema = state.seconds, state.seconds, None
    lock = step_lock if step_lock is not None else contextlib.nullcontext()
    while state.seconds < cfg.seconds and not (0 < cfg.max_steps <= state.steps):
        with lock:
            loss, dt = _one_step(model, marcher, bank, rs, cfg, state, opt, generator,
                                 shards, base_lrs)
        state.seconds += dt
        state.steps += 1
        q = psnr_from_mse(float(loss.detach()))
        ema = q if ema is None or not math.isfinite(ema) else 0.9 * ema + 0.1 * q
        state.history.append([state.seconds, ema])
        if bar is not None:
            bar.update(min(dt, max(0.0, cfg.seconds - bar.n)))
            bar.set_postfix_str(f"train psnr {ema:.2f}")
        if cfg.target_psnr is not None and ema >= cfg.target_psnr:
            break
        if checkpoint is not None and state.seconds - last_ckpt >= ckpt_every:
            checkpoint()
            last_ckpt = state.seconds
        if probe is not None and state.seconds - last_probe >= probe_every:
            probe(state.seconds)
            last_probe = state.seconds
        if on_step is not None:
            on_step(state, ema)
    if probe is not None and last_probe < state.seconds:
        probe(state.seconds)
    if bar is not None:
        bar.close()
    return state


def fixed_sample_loss(model: nn.Module, marcher, rays_o: torch.Tensor, rays_d: torch.Tensor,
                      rgb_gt: torch.Tensor, rs: RenderSettings) -> Callable[[], torch.Tensor]:
    """The photometric loss of one ray batch as a function of ``model``'s parameters, with
    the batch's samples marched once and then held fixed.

    A line search needs one function: re-marching at every trial would move the samples
    (empty-space skipping and early termination follow the density), so the samples are
    chosen once, without gradient, and every call composites the model on them. At the
    parameters where the samples were drawn it equals the loss of :func:`render_rays` on the
    same rays, forward and backward (tested).

    Args:
        rays_o, rays_d, rgb_gt: ``[R, 3]`` the batch and its target colours.
    Returns:
        ``loss() -> []``: the mean squared error, differentiable in ``model``'s parameters.
    """
    _, sigma_fn = field_fns(model, rays_o, rays_d)
    with torch.no_grad():
        samples = marcher.sample(rays_o, rays_d, rs.near, rs.far, rs.step_size,
                                 sigma_fn=sigma_fn, early_stop_eps=rs.early_stop_eps,
                                 alpha_thre=rs.alpha_thre)
    ray, t0, t1 = samples.ray_indices, samples.t_starts, samples.t_ends
    pos, dirs = samples.positions(rays_o, rays_d), rays_d[ray]

    def loss() -> torch.Tensor:
        rgb, sigma = model(pos, dirs)
        out = composite(rgb, sigma, t0, t1, ray, rays_o.shape[0], rs.background)
        return torch.mean((out["rgb"] - rgb_gt) ** 2)

    return loss


def _lbfgs_step(model, marcher, o, d, c, rs: RenderSettings, opt, state: LoopState):
    """One coupled BatchedLBFGS step on a fixed batch with fixed samples. Each batch is a new
    objective: the optimiser first evaluates it at the current point, so its line search
    compares values of one function and every curvature pair comes from one batch (the
    pairs of earlier batches are kept)."""
    loss_fn = fixed_sample_loss(model, marcher, o, d, c, rs)
    opt.new_objective(keep_history=True)

    def closure():
        opt.zero_grad(set_to_none=False)
        state.evals += 1
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return opt.step(closure)


def _targets_step(model, marcher, o, d, c, rs: RenderSettings, opt, state: LoopState,
                  cfg: PhotometricConfig, generator: torch.Generator) -> torch.Tensor:
    """One step of the output-targets route: render the batch (samples fixed, no parameter
    gradient), turn each ray's residual into per-sample targets
    (:func:`~.output_targets.gauss_newton_targets`), and let every cell fit its samples'
    targets with BatchedLBFGS (separable; ``lbfgs_evals`` evaluations; each batch a new
    objective, curvature pairs kept). Returns the batch's loss before the update."""
    from .distill import DistillProblem, pack_per_network
    from .output_targets import gauss_newton_targets

    _, sigma_fn = field_fns(model, o, d)
    with torch.no_grad():
        s = marcher.sample(o, d, rs.near, rs.far, rs.step_size, sigma_fn=sigma_fn,
                           early_stop_eps=rs.early_stop_eps, alpha_thre=rs.alpha_thre)
        ray, delta = s.ray_indices, s.t_ends - s.t_starts
        if ray.numel() == 0:
            return torch.mean((rs.background.expand_as(c) - c) ** 2)
        x, dirs = s.positions(o, d), d[ray]
        rgb, sigma = model(x, dirs)
        alpha = -torch.expm1(-sigma * delta)
        alpha_t, rgb_t, pred = gauss_newton_targets(alpha, rgb, ray, o.shape[0], c,
                                                    rs.background, cfg.gn_damping,
                                                    cfg.gn_step)
        # the cells fit opacity for one marching step of rs.step_size
        sigma_t = -torch.log1p(-alpha_t) / delta.clamp_min(1e-12)
        alpha_fit = -torch.expm1(-sigma_t * rs.step_size)
        keep, net, local = model.locate(x)
        samples = pack_per_network(model.n_nets, net, local, dirs[keep], alpha_fit[keep],
                                   rgb_t[keep], cfg.targets_per_cell, generator)
    problem = DistillProblem(samples, rs.step_size)
    opt.new_objective(keep_history=True)

    def closure():
        opt.zero_grad(set_to_none=False)
        state.evals += 1
        losses = problem.cell_losses(model)
        losses.sum().backward()
        return losses.detach()

    opt.step(closure)
    return torch.mean((pred - c) ** 2)


def _average_gradients(model: nn.Module, shards) -> None:
    """Every parameter's gradient averaged over ranks (a missing one counts as zero)."""
    import torch.distributed as torch_dist
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad)
        p.grad.div_(shards.world)


def _average_scalar(x: torch.Tensor, shards) -> torch.Tensor:
    import torch.distributed as torch_dist
    x = x.clone().to(torch.float64)
    torch_dist.all_reduce(x)
    return x / shards.world
