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
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as torch_dist

from .fitting import Callback, CellProblem, FitState


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


def gather_cells(t: torch.Tensor, shards: Shards, n_cells: int) -> torch.Tensor:
    """Every rank's block ``[k_r, ...]`` of a per-cell tensor -> the whole ``[n_cells, ...]``
    on every rank (padded to the largest block for ``all_gather``)."""
    b = shards.bounds(n_cells)
    sizes = [b[r + 1] - b[r] for r in range(shards.world)]
    if t.shape[0] != sizes[shards.rank]:
        raise ValueError(f"gather_cells: rank {shards.rank} holds {sizes[shards.rank]} cells, "
                         f"got a tensor of {t.shape[0]}")
    big = max(sizes)
    comm_dtype = torch.uint8 if t.dtype == torch.bool else t.dtype
    pad = torch.zeros((big,) + tuple(t.shape[1:]), dtype=comm_dtype, device=shards.device)
    pad[:t.shape[0]] = t.to(shards.device, comm_dtype)
    parts = [torch.empty_like(pad) for _ in range(shards.world)]
    torch_dist.all_gather(parts, pad)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)
    return out.to(torch.bool) if t.dtype == torch.bool else out


def all_max(value: float, shards: Shards) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=shards.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return float(t.item())


def gather_state(obj: Any, shards: Shards, n_local: int, n_cells: int) -> Any:
    """A state (model or optimiser ``state_dict``, nested dicts and lists) of this rank's
    cells -> the state of all cells: tensors whose first dimension is the rank's cell count
    are gathered along it; integers become their maximum over ranks (e.g. history slots
    used); anything else is taken as it is (the same on every rank)."""
    if torch.is_tensor(obj):
        if obj.dim() >= 1 and obj.shape[0] == n_local:
            return gather_cells(obj, shards, n_cells)
        return obj
    if isinstance(obj, dict):
        return {k: gather_state(v, shards, n_local, n_cells) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_state(v, shards, n_local, n_cells) for v in obj)
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
    losses, so every rank sees the same quality."""

    def __init__(self, full: CellProblem, shards: Shards):
        self.full, self.shards = full, shards
        self.n_total = full.n_cells
        self.cells = shards.cells(self.n_total)
        self.local = full.subset(self.cells.to(_device_of(full)))
        self.quality_name = full.quality_name

    @property
    def n_cells(self) -> int:
        return int(self.cells.numel())

    def cell_losses(self, model) -> torch.Tensor:
        return self.local.cell_losses(model)

    def loss_and_backward(self, model) -> torch.Tensor:
        return self.local.loss_and_backward(model)

    def quality(self, cell_losses: torch.Tensor) -> float:
        return self.full.quality(gather_cells(cell_losses.detach(), self.shards, self.n_total))


def _device_of(problem) -> torch.device:
    packed = getattr(problem, "packed", None)
    return packed.x.device if packed is not None else torch.device("cpu")


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


__all__ = ["Shards", "current", "init_from_env", "shutdown", "world_size_from_env", "gather_cells",
           "gather_state", "select_state", "all_max", "ShardedProblem", "AgreeAcrossRanks"]
