"""Cells sharded over processes with ``torch.distributed`` (launched by ``torchrun``).

In a separable fit every cell is an independent problem, so the cells split over ranks with
no gradient traffic: each rank holds a contiguous block of cells (its networks, optimiser
state and samples) and optimises them; the only communication is the per-cell losses (for
the whole signal's quality, which every rank then computes identically), the training clock
(so every rank stops at the same step), stop requests, and the gathers that assemble a
checkpoint or the final model. Because a cell's iterates do not depend on the other cells
(``BatchedLBFGS`` on N cells equals N runs), a sharded run equals the single-process run cell
for cell, up to floating-point summation order.

Without torchrun (``WORLD_SIZE`` unset or 1) nothing here is used. The process group's
backend follows the device: gloo on the CPU, NCCL on CUDA; :func:`init_from_env` is the one
place that sets it up.

Example::

    torchrun --nproc_per_node 2 scripts/fit_image.py --config configs/image.txt --max_evals 40
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as torch_dist

from .config import UserError
from .fitting import Callback, CellProblem, FitConfig, FitResult, FitState, fit


@dataclass
class Shards:
    """This process's place among ``world`` ranks."""
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n_cells: int) -> List[int]:
        """``world + 1`` cell offsets: rank ``r`` holds cells ``[b[r], b[r+1])``."""
        return [n_cells * r // self.world for r in range(self.world + 1)]

    def cells(self, n_cells: int) -> torch.Tensor:
        """``[k]`` long: this rank's cells (a contiguous block)."""
        b = self.bounds(n_cells)
        return torch.arange(b[self.rank], b[self.rank + 1])


_CURRENT: Optional["Shards"] = None


def current() -> Optional["Shards"]:
    """The :class:`Shards` of this process after :func:`init_from_env`, else ``None``."""
    return _CURRENT


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device: torch.device) -> Optional[Shards]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
    ...) with gloo (CPU) or NCCL (CUDA); ``None`` when not launched with several processes."""
    world = world_size_from_env()
    if world <= 1:
        return None
    device = torch.device(device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend=backend)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    global _CURRENT
    _CURRENT = Shards(torch_dist.get_rank(), torch_dist.get_world_size(), device)
    return _CURRENT


def shutdown(barrier: bool = True) -> None:
    """Leave the process group (after a barrier, unless a rank is failing)."""
    global _CURRENT
    _CURRENT = None
    if torch_dist.is_initialized():
        if barrier:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a torchrun worker after :func:`shutdown`: flush stdout and stderr, then exit
    without the interpreter's teardown, during which gloo's worker threads occasionally
    abort the process ("terminate called without an active exception", exit -6) even after
    the group was destroyed, failing a finished run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def gather_cells(t: torch.Tensor, shards: Shards, n_cells: int,
                 main_only: bool = False) -> Optional[torch.Tensor]:
    """Every rank's block ``[k_r, ...]`` of a per-cell tensor -> the whole ``[n_cells, ...]``
    on every rank (padded to the largest block for ``all_gather``); with ``main_only``, on
    rank 0 alone (the others get ``None`` and hold no copy), e.g. for a checkpoint."""
    b = shards.bounds(n_cells)
    sizes = [b[r + 1] - b[r] for r in range(shards.world)]
    if t.shape[0] != sizes[shards.rank]:
        raise ValueError(f"gather_cells: rank {shards.rank} holds {sizes[shards.rank]} cells, "
                         f"got a tensor of {t.shape[0]}")
    big = max(sizes)
    comm_dtype = torch.uint8 if t.dtype == torch.bool else t.dtype
    pad = torch.zeros((big,) + tuple(t.shape[1:]), dtype=comm_dtype, device=shards.device)
    pad[:t.shape[0]] = t.to(shards.device, comm_dtype)
    if main_only:
        parts = [torch.empty_like(pad) for _ in range(shards.world)] if shards.is_main \
            else None
        torch_dist.gather(pad, parts, dst=0)
        if not shards.is_main:
            return None
    else:
        parts = [torch.empty_like(pad) for _ in range(shards.world)]
        torch_dist.all_gather(parts, pad)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)
    return out.to(torch.bool) if t.dtype == torch.bool else out


def all_max(value: float, shards: Shards) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=shards.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return float(t.item())


def gather_state(obj: Any, shards: Shards, n_local: int, n_cells: int,
                 main_only: bool = False) -> Any:
    """A state (model or optimiser ``state_dict``, nested dicts and lists) of this rank's
    cells -> the state of all cells: tensors whose first dimension is the rank's cell count
    are gathered along it; integers become their maximum over ranks (e.g. history slots
    used); anything else is taken as it is (the same on every rank)."""
    if torch.is_tensor(obj):
        if obj.dim() >= 1 and obj.shape[0] == n_local:
            return gather_cells(obj, shards, n_cells, main_only)
        return obj
    if isinstance(obj, dict):
        return {k: gather_state(v, shards, n_local, n_cells, main_only) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_state(v, shards, n_local, n_cells, main_only) for v in obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int(all_max(obj, shards))
    return obj


def select_state(obj: Any, cells: torch.Tensor, n_cells: int) -> Any:
    """The inverse of :func:`gather_state` for one rank: tensors whose first dimension is
    ``n_cells`` keep the rows ``cells``."""
    if torch.is_tensor(obj):
        if obj.dim() >= 1 and obj.shape[0] == n_cells:
            return obj.index_select(0, cells.to(obj.device))
        return obj
    if isinstance(obj, dict):
        return {k: select_state(v, cells, n_cells) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(select_state(v, cells, n_cells) for v in obj)
    return obj


class ShardedProblem(CellProblem):
    """This rank's cells of ``full`` (``local = full.subset(cells)``, evaluated on a model
    holding just those cells); the quality is the whole signal's, from every rank's per-cell
    losses (and, for a problem with ``cell_quality_stats``, its per-cell statistics such as
    IoU counts), so every rank sees the same quality. When ``full``'s samples change (a fresh
    draw bumps its ``version``) the local problem is cut again."""

    def __init__(self, full: CellProblem, shards: Shards):
        self.full, self.shards = full, shards
        self.n_total = full.n_cells
        self.cells = shards.cells(self.n_total)
        self.quality_name = full.quality_name
        self._cut()

    def _cut(self) -> None:
        self.local = self.full.subset(self.cells.to(_device_of(self.full)))
        self._version = getattr(self.full, "version", 0)

    def _current(self) -> CellProblem:
        if getattr(self.full, "version", 0) != self._version:
            self._cut()
        return self.local

    @property
    def n_cells(self) -> int:
        return int(self.cells.numel())

    def cell_losses(self, model) -> torch.Tensor:
        return self._current().cell_losses(model)

    def loss_and_backward(self, model) -> torch.Tensor:
        return self._current().loss_and_backward(model)

    def quality(self, cell_losses: torch.Tensor) -> float:
        losses = gather_cells(cell_losses.detach(), self.shards, self.n_total)
        stats = getattr(self.local, "cell_quality_stats", None)
        if stats is None:
            return self.full.quality(losses)
        return self.full.quality_from_stats(
            losses, gather_cells(stats(), self.shards, self.n_total))


def _device_of(problem) -> torch.device:
    packed = getattr(problem, "packed", None)
    if packed is not None:
        return packed.x.device
    samples = getattr(problem, "samples", None)
    return samples.counts.device if samples is not None else torch.device("cpu")


class AgreeAcrossRanks(Callback):
    """Keeps the ranks in step (run it last): the training clock becomes the slowest rank's,
    and a stop requested on some ranks only (e.g. all of one rank's cells converged) waits
    until every rank requests it."""

    def __init__(self, shards: Shards):
        self.shards = shards

    def on_step_end(self, state: FitState) -> None:
        state.result.train_seconds = all_max(state.result.train_seconds, self.shards)
        wants = 0.0 if state.stop is None else 1.0
        everyone = -all_max(-wants, self.shards)           # the minimum over ranks
        if everyone < 1.0:
            state.stop = None


def fit_sharded(shards: Shards, model, problem: CellProblem, cfg: FitConfig,
                resume: Optional[dict] = None, extra_ckpt: Optional[dict] = None,
                callbacks=()) -> FitResult:
    """:func:`~kilonerf_lbfgs.fitting.fit` of this rank's cells: a contiguous block of the
    model's cells (``model.select(cells)``), their own optimiser, the whole signal's quality
    (:class:`ShardedProblem`); ``problem.shardable`` must hold. Checkpoints are gathered into
    one file (written by rank 0) in the single-process layout, so any number of ranks resumes
    from it; ``resume`` is such a checkpoint. On return ``model`` holds every rank's cells.

    ``model`` is any cell model with ``n_cells`` and ``select(cells [k]) -> model of those
    cells`` whose parameters all have the cell as their first dimension
    (:class:`~kilonerf_lbfgs.multinet.MultiMLP`, the NeRF field).
    """
    n = model.n_cells
    if n < shards.world:
        raise UserError(f"{shards.world} processes for {n} cells: use at most {n} processes "
                        f"(--nproc_per_node) or a finer grid")
    if not getattr(problem, "shardable", False):
        raise UserError(f"{type(problem).__name__} cannot be sharded over processes yet; run "
                        f"it as one process (without torchrun)")
    sharded = ShardedProblem(problem, shards)
    cells = sharded.cells.to(next(model.parameters()).device)
    if resume is not None:          # the whole model first: buffers stay the whole model's
        model.load_state_dict(resume["model"])
    local = model.select(cells)
    n_local = local.n_cells
    params = {k for k, _ in model.named_parameters()}
    if resume is not None:
        best = resume.get("best")
        if best is not None:
            best = {**best, "model": {**local.state_dict(), **{
                k: v.index_select(0, cells.to(v.device)) for k, v in best["model"].items()
                if k in params}}}
        resume = {**resume, "model": local.state_dict(), "best": best,
                  "optimizer": select_state(resume["optimizer"], cells, n)}
    cfg.progress = cfg.progress and shards.is_main
    path = cfg.ckpt_path
    full_state = model.state_dict()

    def whole_model(state: dict) -> dict:
        return {k: gather_cells(v, shards, n, main_only=True) if k in params else full_state[k]
                for k, v in state.items()}

    def save(payload: dict) -> None:        # gathered on rank 0 alone, which writes it
        whole = dict(payload)
        whole["model"] = whole_model(payload["model"])
        whole["optimizer"] = gather_state(payload["optimizer"], shards, n_local, n,
                                          main_only=True)
        best = payload.get("best")
        if all_max(0.0 if best is None else 1.0, shards) > 0:
            whole["best"] = {**best, "model": whole_model(best["model"])}
        if shards.is_main:
            from .io import save_checkpoint
            save_checkpoint(path, whole)

    result = fit(local, sharded, cfg, resume=resume, extra_ckpt=extra_ckpt,
                 save=save if path is not None else None,
                 callbacks=list(callbacks) + [AgreeAcrossRanks(shards)])
    with torch.no_grad():
        for dst, src in zip(model.parameters(), local.parameters()):
            dst.copy_(gather_cells(src.detach(), shards, n))
    return result


__all__ = ["Shards", "current", "init_from_env", "shutdown", "exit_process",
           "world_size_from_env", "gather_cells", "gather_state", "select_state", "all_max",
           "ShardedProblem", "AgreeAcrossRanks", "fit_sharded"]
