#!/usr/bin/env python
"""Fit a shape (occupancy or signed distance) with a 3-D grid of tiny sine networks.

    python scripts/fit_shape.py --config configs/shape.txt [--mesh PATH.obj|.ply|.off] [--target sdf]

Training points are drawn afresh during the fit (--resample_every), so a longer run does not
overfit a fixed set; the exported mesh comes from the parameters of the best held-out IoU.
"""
import os

from kilonerf_lbfgs.config import (UserError, build_parser, for_option, parse_args,
                                   require_positive, run_main)
from kilonerf_lbfgs.fitting import Resample
from kilonerf_lbfgs.runner import add_model_args, make_model, run_fit, setup_run
from kilonerf_lbfgs.signals.shape import (TARGETS, inside_mesh, load_mesh, make_shape_problem,
                                          normalize_mesh)
from kilonerf_lbfgs.signals.shape_export import (chamfer, extract_mesh, field_volume,
                                                 grid_points, model_field, save_ply,
                                                 save_preview)

# a bare --config NAME is also looked up in the repository's configs/ beside this script
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")


def main():
    p = build_parser(__doc__, psnr_target=False, config_dirs=[CONFIGS])
    add_model_args(p, width=32, depth=3, omega_0=10.0)
    p.add_argument("--mesh", default=None, help="OBJ/PLY/OFF/STL file (default: a torus knot "
                   "made in code)")
    p.add_argument("--target", default="occupancy", choices=TARGETS)
    p.add_argument("--grid", type=int, nargs=3, default=[4, 4, 4], help="cells per axis")
    p.add_argument("--points", type=int, default=100_000, help="training points")
    p.add_argument("--near_fraction", type=float, default=0.5,
                   help="share of training points near the surface")
    p.add_argument("--near_sigma", type=float, default=0.01, help="noise std (box units)")
    p.add_argument("--resample_every", type=int, default=None,
                   help="draw fresh training points after N function evaluations on a draw "
                        "(0: one fixed set; default: 5 for occupancy, 25 for sdf, whose "
                        "labels cost about 2.5x more to compute)")
    p.add_argument("--reset_history", action="store_true",
                   help="L-BFGS: drop the curvature pairs at each fresh draw")
    p.add_argument("--sdf_truncation", type=float, default=0.1,
                   help="sdf: clamp distances to +-this (box units; 0: no clamp)")
    p.add_argument("--eval_points", type=int, default=50_000, help="held-out uniform points")
    p.add_argument("--resolution", type=int, default=128, help="marching-cubes lattice")
    p.add_argument("--target_iou", type=float, default=None, help="stop at this IoU")
    args = parse_args(p)
    require_positive(args, "grid", "points", "eval_points", "near_sigma", "resolution")
    if args.resample_every is None:
        args.resample_every = 5 if args.target == "occupancy" else 25
    if args.resample_every < 0 or args.sdf_truncation < 0:
        raise UserError("--resample_every and --sdf_truncation must be >= 0 (0: off)")
    if not 0.0 <= args.near_fraction <= 1.0:
        raise UserError(f"--near_fraction {args.near_fraction}: must be in [0, 1]")
    device = setup_run(args)
    with for_option("--mesh", args.mesh):
        mesh = normalize_mesh(load_mesh(args.mesh))
        problem = make_shape_problem(mesh, args.grid, args.target, args.points,
                                     args.eval_points, args.near_fraction, args.near_sigma,
                                     args.seed, device, source=args.mesh or "torus knot",
                                     truncation=args.sdf_truncation or None)
    model = make_model(args, problem.n_cells, 3, 1, device)
    print(f"mesh {len(mesh.vertices)} vertices, {len(mesh.faces)} faces; {args.target}, "
          f"{problem.n_cells} cells, {model.params_per_cell} parameters per cell, "
          f"{args.optimizer} on {device}")

    def export(model):
        vol = field_volume(model_field(model, problem.grid), args.resolution)
        fitted = extract_mesh(vol, problem.level, inside_is_low=args.target == "sdf")
        save_ply(os.path.join(args.out_dir, "mesh.ply"), fitted)
        step = -(-args.resolution // 128)            # preview at most 128^3
        small = vol[::step, ::step, ::step]
        truth = inside_mesh(mesh, grid_points(args.resolution, step)).reshape(small.shape)
        save_preview(os.path.join(args.out_dir, "preview.png"), truth, problem.inside(small))
        return {"iou": problem.quality(problem.cell_losses(model).detach()),
                "chamfer": chamfer(fitted, mesh), "target": args.target,
                "mesh_vertices": len(fitted.vertices), "mesh_faces": len(fitted.faces)}

    fresh = [Resample(problem.resample, args.resample_every, not args.reset_history)] \
        if args.resample_every else []
    m = run_fit(args, "shape", problem, model, target=args.target_iou, export=export,
                callbacks=fresh)
    print(f"IoU {m['iou']:.4f} (best, at {m['best_seconds']:.1f} s; the last step "
          f"{m['final_iou']:.4f}), Chamfer {m['chamfer']:.5f} of the box diagonal after "
          f"{m['train_seconds']:.1f} s ({m['function_evals']} evaluations); "
          f"outputs in {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
