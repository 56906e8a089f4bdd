#!/usr/bin/env python
"""Export a mesh of a trained NeRF checkpoint: marching cubes on the density over the
occupied space, vertex colours from the field, PLY (and OBJ).

    python scripts/export_mesh.py --ckpt outputs/demo/checkpoint.pt [--resolution 256] \
        [--threshold auto] [--formats ply obj] [--compare_demo]

--threshold auto takes the median density where the field's renders of an orbit terminate
(the mesh passes where the images put the surface). --compare_demo
also prints the Chamfer distance to the generated demo scene's true surface (for checkpoints
trained on it). Memory is bounded by --slab lattice planes at a time.
"""
import math
import os

import torch

from kilonerf_lbfgs.config import ArgumentParser, UserError, parse_args, run_main
from kilonerf_lbfgs.io import save_json
from kilonerf_lbfgs.nerf.cli import load_trained
from kilonerf_lbfgs.nerf.mesh import extract_mesh, field_color, rendered_surface_density
from kilonerf_lbfgs.runner import setup_run

FORMATS = ("ply", "obj")


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="a train_nerf.py checkpoint")
    p.add_argument("--out_dir", default=None, help="default: the checkpoint's folder")
    p.add_argument("--resolution", type=int, default=256, help="lattice points per axis")
    p.add_argument("--threshold", default="auto",
                   help="density level of the surface, or auto: the median density where "
                        "the field's own renders of an orbit terminate")
    p.add_argument("--formats", nargs="+", default=["ply"], choices=FORMATS)
    p.add_argument("--slab", type=int, default=8, help="lattice planes evaluated at a time")
    p.add_argument("--compare_demo", action="store_true",
                   help="also measure the Chamfer distance to the demo scene's true surface")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    args = parse_args(p)
    if not 2 <= args.resolution <= 2048:
        raise UserError(f"--resolution {args.resolution}: choose 2 to 2048")
    if args.slab < 1:
        raise UserError(f"--slab {args.slab}: must be positive")
    device = setup_run(args)
    field, marcher, opts, _, rs = load_trained(args.ckpt, device)
    if args.threshold == "auto":
        try:
            threshold = rendered_surface_density(field, marcher, rs, opts.aabb)
        except ValueError as e:
            raise UserError(f"--threshold auto: {e}; pass --threshold DENSITY") from None
    else:
        try:
            threshold = float(args.threshold)
        except ValueError:
            raise UserError(f"--threshold {args.threshold}: a positive number or auto") from None
        if not threshold > 0 or not math.isfinite(threshold):
            raise UserError(f"--threshold {args.threshold}: must be a positive density")
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.ckpt))
    os.makedirs(out_dir, exist_ok=True)
    try:
        mesh = extract_mesh(field.density, opts.aabb, args.resolution, threshold,
                            color=field_color(field), occupied=marcher.grid.occupied,
                            slab=args.slab, device=device)
    except ValueError as e:
        raise UserError(f"--threshold {threshold:g}: {e}") from None
    info = {"ckpt": os.path.abspath(args.ckpt), "resolution": args.resolution,
            "threshold": threshold, "vertices": len(mesh.vertices), "faces": len(mesh.faces),
            "files": []}
    for fmt in args.formats:
        path = os.path.join(out_dir, f"mesh.{fmt}")
        tmp = path + ".tmp"
        mesh.export(tmp, file_type=fmt)
        os.replace(tmp, path)                    # never a half-written mesh
        info["files"].append(path)
    if args.compare_demo:
        from kilonerf_lbfgs.nerf.data.demo_scene import demo_sdf, demo_surface_points
        from kilonerf_lbfgs.nerf.mesh import chamfer_to_surface
        diag = math.dist(opts.aabb[:3], opts.aabb[3:])
        cd, to_true, to_mesh = chamfer_to_surface(mesh, demo_surface_points(100_000),
                                                  demo_sdf)
        info.update(chamfer=cd, chamfer_fraction_of_box_diagonal=cd / diag,
                    mesh_to_true=to_true, true_to_mesh=to_mesh)
    save_json(os.path.join(out_dir, "mesh.json"), info)
    print(f"wrote {', '.join(info['files'])}: {info['vertices']} vertices, {info['faces']} "
          f"faces at density {threshold:.3g} on a {args.resolution}^3 lattice" +
          (f"; Chamfer to the demo surface {info['chamfer']:.4f} "
           f"({100 * info['chamfer_fraction_of_box_diagonal']:.2f}% of the box diagonal)"
           if args.compare_demo else ""))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_main(main)
