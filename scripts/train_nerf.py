#!/usr/bin/env python
"""Train a KiloNeRF-style grid of tiny sine networks on a Blender / NeRF-synthetic scene,
then evaluate it on the test split.

    python scripts/train_nerf.py --config demo.txt      # generated scene, no download
    python scripts/train_nerf.py --config lego.txt --datadir PATH/nerf_synthetic/lego
"""
import os
import time
from dataclasses import replace

from kilonerf_lbfgs import distributed
from kilonerf_lbfgs.config import UserError, build_parser, for_option, parse_args, run_main
from kilonerf_lbfgs.io import load_checkpoint, plot_convergence, save_json
from kilonerf_lbfgs.nerf.cli import add_nerf_args, load_scene, options_from_args
from kilonerf_lbfgs.nerf.evaluate import evaluate
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.train.box import find_tight_box
from kilonerf_lbfgs.nerf.train.pipeline import NerfPipeline, resume_or_new
from kilonerf_lbfgs.runner import setup_run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# a bare --config NAME is also looked up in the repository's configs/, and a relative
# --datadir that is not found from the working folder in the repository
CONFIGS = os.path.join(REPO, "configs")


def start_viewer(args, opts, rs):
    """The live viewer, or one line saying why it cannot start."""
    try:
        from kilonerf_lbfgs.nerf.viewer import NerfViewer
    except ImportError as e:
        raise UserError(f"--viewer needs viser ({e}); pip install viser") from e
    try:
        viewer = NerfViewer(opts.aabb, rs, grid_res=opts.grid_res, host=args.viewer_host,
                            port=args.viewer_port)
    except OSError as e:
        raise UserError(f"--viewer_port {args.viewer_port}: cannot serve there ({e}); pick "
                        f"another") from e
    print(f"viewer at {viewer.url} (training runs at full speed while no browser is open)",
          flush=True)
    return viewer


def tight_box(args, opts, train, device, ckpt):
    """``opts`` with the box found by a coarse pass (or the resumed run's), and its seconds."""
    if args.resume and os.path.isfile(ckpt):
        with for_option("--resume", ckpt):
            box = load_checkpoint(ckpt)["options"]["aabb"]
        return replace(opts, aabb=box), 0.0
    t0 = time.perf_counter()
    box = find_tight_box(RayBank(train, device), opts, args.auto_box, device, args.seed,
                         progress=not args.no_progress)
    dt = time.perf_counter() - t0
    print(f"tight box from a {args.auto_box:g} s coarse pass: "
          f"[{', '.join(f'{v:.3f}' for v in box)}] (in {dt:.0f} s)")
    return replace(opts, aabb=box), dt


def main():
    # the pipeline's own options replace the fit scripts' optimiser flags
    p = build_parser(__doc__, config_dirs=[CONFIGS],
                     skip=("max_evals", "optimizer", "line_search", "lr_schedule",
                           "no_keep_best"))
    add_nerf_args(p)
    p.add_argument("--viewer", action="store_true",
                   help="serve a live web viewer of the training (viser) at --viewer_port")
    p.add_argument("--viewer_port", type=int, default=8080)
    p.add_argument("--viewer_host", default="127.0.0.1",
                   help="address to serve on (0.0.0.0: every interface of this machine)")
    args = parse_args(p)
    device = setup_run(args)
    shards = distributed.current()
    if shards is not None and args.route == "direct" and args.optimizer != "adam":
        raise UserError(f"under torchrun the direct route trains data parallel with --optimizer "
                        f"adam only (not {args.optimizer}); use --route distill (its networks "
                        f"are sharded over the processes) or run as one process")
    if shards is not None and args.background_model == "learned":
        raise UserError("--background_model learned does not train data parallel yet; run "
                        "it as one process")
    data = load_scene(args, search_dirs=[REPO])
    opts = options_from_args(args, data["train"])
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt = os.path.join(args.out_dir, "checkpoint.pt")
    train, test = data["train"], data["test"]
    box_seconds = 0.0
    if args.auto_box > 0:
        opts, box_seconds = tight_box(args, opts, train, device, ckpt)
    print(f"{len(train)} train / {len(test)} test views at {train.W}x{train.H}; route "
          f"{opts.route}, cells {opts.grid_res}^3, {opts.optimizer} on {device}")
    camera = {"W": train.W, "H": train.H, "intrinsics": train.intrinsics[0].tolist()}
    pipe = NerfPipeline(opts, RayBank(train, device), device, ckpt,
                        extra={"args": vars(args), "camera": camera})
    with for_option("--resume", ckpt):
        resume_or_new(pipe, args.resume)
    if args.viewer and (shards is None or shards.is_main):
        pipe.viewer = start_viewer(args, opts, pipe.rs)
    try:
        field = pipe.run()
    finally:
        if pipe.viewer is not None:
            pipe.viewer.close()
            print(f"viewer closed; to fly around the result: python scripts/view.py --ckpt {ckpt}")
    if shards is not None and not shards.is_main:    # rank 0 evaluates and writes the outputs
        return
    m = evaluate(field, pipe.marcher, test, pipe.rs, out_dir=os.path.join(args.out_dir, "test"),
                 progress=not args.no_progress)
    history = pipe.history()
    metrics = {"modality": "nerf", "route": opts.route, "optimizer": opts.optimizer,
               "device": str(device), "seed": args.seed,
               "train_seconds": pipe.train_seconds(), "function_evals": pipe.function_evals(),
               "iterations": sum(d["steps"] for d in pipe.done.values()),
               "psnr": m["test_psnr"], **m,
               "stages": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                          for k, v in pipe.done.items()},
               "history": history, "n_cells": field.n_nets,
               "grid_cells": field.cell_grid.n_cells,
               "params_per_cell": field.params_per_cell,
               "params_total": field.n_nets * field.params_per_cell,
               "occupancy_fraction": pipe.marcher.grid.occupied_fraction(),
               "aabb": opts.aabb, "box_seconds": box_seconds,
               "image_size": [train.W, train.H], "options": opts.__dict__}
    save_json(os.path.join(args.out_dir, "metrics.json"), metrics)
    plot_convergence(os.path.join(args.out_dir, "convergence.png"), {opts.route: history},
                     ylabel="stage quality (dB)",
                     title=f"NeRF {opts.route}: train-batch / distillation PSNR")
    print(f"test PSNR {m['test_psnr']:.2f} dB, SSIM {m['test_ssim']:.4f} on {len(test)} views "
          f"after {pipe.train_seconds():.0f} s; {m['render_fps']:.2f} fps at "
          f"{test.W}x{test.H}; outputs in {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
