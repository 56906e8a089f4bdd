"""Script glue shared by every modality: model options, resume, fit, metrics.json, plots."""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from . import distributed
from .activations import ACTIVATIONS
from .backends import resolve_device
from .config import UserError, add_options, for_option, option
from .fitting import CellProblem, FitConfig, FitResult, fit
from .io import load_checkpoint, plot_convergence, save_json
from .multinet import MultiMLP


@dataclass
class ModelOptions:
    """The cell networks' options (:class:`~kilonerf_lbfgs.multinet.MultiMLP`)."""
    width: int = option(32, "hidden width per cell", positive=True)
    depth: int = option(3, "hidden layers per cell", positive=True)
    activation: str = option("sine", "the hidden layers' activation", choices=tuple(ACTIVATIONS))
    omega_0: float = option(30.0, "sine frequency", positive=True)
    sigma: float = option(0.1, "Gaussian width", positive=True)
    pe_freqs: int = option(5, "relu_pe octaves", min=0)


def _float_or_auto(value: str):
    return "auto" if value == "auto" else float(value)


def add_model_args(parser, width: int = 32, depth: int = 3, omega_0=30.0) -> None:
    """The :class:`ModelOptions` flags with these defaults; ``omega_0="auto"`` lets
    ``--omega_0`` also take ``auto`` (the script then picks it from the signal)."""
    overrides = {}
    if omega_0 == "auto":
        overrides["omega_0"] = {"type": _float_or_auto,
                                "help": "sine frequency, or auto (chosen from the signal)"}
    add_options(parser, ModelOptions, defaults={"width": width, "depth": depth,
                                                "omega_0": omega_0}, overrides=overrides)


def make_model(args, n_cells: int, d_in: int, d_out: int, device, group: int = -1
               ) -> MultiMLP:
    """The cells' networks from the model options, seeded by ``--seed``; ``group >= 0``
    (one group of a signal fitted a group at a time) gets its own seed from both."""
    seed = int(args.seed) if group < 0 else int(args.seed) * 1_000_003 + int(group)
    gen = torch.Generator().manual_seed(seed)
    return MultiMLP(n_cells, d_in, d_out, args.width, args.depth, args.activation,
                    omega_0=args.omega_0, sigma=args.sigma, pe_freqs=args.pe_freqs,
                    generator=gen).to(device)


def fit_config_from_args(args, target: Optional[float] = None, desc: str = "") -> FitConfig:
    return FitConfig(optimizer=args.optimizer, lr=args.lr, lr_schedule=args.lr_schedule,
                     history_size=args.history_size, history_dtype=args.history_dtype,
                     line_search=args.line_search,
                     max_seconds=args.max_seconds, max_evals=args.max_evals, target=target,
                     keep_best=not getattr(args, "no_keep_best", False),
                     ckpt_path=os.path.join(args.out_dir, "checkpoint.pt"),
                     ckpt_every=args.ckpt_every, progress=not args.no_progress, desc=desc)


def run_fit(args, modality: str, problem: CellProblem, model: MultiMLP,
            target: Optional[float] = None,
            export: Optional[Callable[[MultiMLP], Dict]] = None,
            callbacks=()) -> Dict:
    """Fit (resuming if asked), then write ``metrics.json`` and ``convergence.png``.

    The model ends on the parameters of the best quality seen (unless ``--no_keep_best``);
    ``metrics.json`` says when that was (``best_seconds``, ``best_evals``) and what the
    last step's quality was (``final_<quality>``). ``export(model)`` writes the modality's
    reconstruction and returns its final metrics (e.g. ``{"psnr": .., "ssim": ..}``), which
    go into ``metrics.json``. ``callbacks`` go to :func:`~kilonerf_lbfgs.fitting.fit`.
    """
    shards = distributed.current()
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    resume = None
    if args.resume and os.path.isfile(ckpt_path):
        with for_option("--resume", ckpt_path):
            resume = load_checkpoint(ckpt_path, map_location=next(model.parameters()).device)
        if resume.get("modality") != modality or resume.get("n_cells") != model.n_cells \
                or resume.get("params_per_cell") != model.params_per_cell:
            raise UserError(f"--resume: {ckpt_path} was written by a different run "
                            f"({resume.get('modality')}, {resume.get('n_cells')} cells); "
                            f"use another --out_dir")
        print(f"resuming from {ckpt_path} at {resume['train_seconds']:.1f} s")
    cfg = fit_config_from_args(args, target, desc=f"{modality} {args.optimizer}")
    extra = {"modality": modality, "n_cells": model.n_cells,
             "params_per_cell": model.params_per_cell, "args": vars(args)}
    if shards is None:
        result: FitResult = fit(model, problem, cfg, resume=resume, extra_ckpt=extra,
                                callbacks=callbacks)
    else:
        result = distributed.fit_sharded(shards, model, problem, cfg, resume, extra, callbacks)
        if not shards.is_main:          # rank 0 writes the outputs; the others get its metrics
            return _broadcast_from_main(None)
    metrics = {
        "modality": modality, "optimizer": args.optimizer,
        "device": str(next(model.parameters()).device), "seed": args.seed,
        "train_seconds": result.train_seconds, "iterations": result.iterations,
        "function_evals": result.function_evals, "stopped": result.stopped,
        problem.quality_name: result.quality,
        f"final_{problem.quality_name}": result.final_quality,
        "best_seconds": result.best_seconds, "best_evals": result.best_evals,
        "history": result.history,
        "n_cells": model.n_cells, "params_per_cell": model.params_per_cell,
        "params_total": model.n_cells * model.params_per_cell,
        "activation": model.activation, "width": model.width, "depth": model.depth,
        "lr": args.lr, "lr_schedule": args.lr_schedule, "history_size": args.history_size,
        "history_dtype": args.history_dtype,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "processes": 1 if shards is None else shards.world,
    }
    if export is not None:
        metrics.update(export(model))
    save_json(os.path.join(args.out_dir, "metrics.json"), metrics)
    plot_convergence(os.path.join(args.out_dir, "convergence.png"),
                     {args.optimizer: result.history}, ylabel=problem.quality_name,
                     title=f"{modality}: {model.n_cells} cells, {args.optimizer}",
                     targets=[target] if target else None)
    if shards is not None:
        _broadcast_from_main(metrics)
    return metrics


def _broadcast_from_main(obj):
    import torch.distributed as torch_dist
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def setup_run(args):
    """Seed and device from the common options; under torchrun, also join the process group
    (:func:`~kilonerf_lbfgs.distributed.init_from_env`) and silence the other ranks' stdout
    (rank 0 alone prints and writes outputs)."""
    torch.manual_seed(int(args.seed))
    with for_option("--device", args.device):
        device = resolve_device(args.device)
    shards = distributed.init_from_env(device)
    if shards is not None:
        device = shards.device
        if not shards.is_main:
            sys.stdout = open(os.devnull, "w")
    return device
