#!/usr/bin/env python
"""Camera poses for your own photos: COLMAP (through pycolmap, on the CPU) -> transforms.json.

    python scripts/colmap2nerf.py --images my_photos/ --out my_scene/
    python scripts/colmap2nerf.py --colmap_dir my_scene/sparse/0 --images my_photos/ --out my_scene/
    python scripts/colmap2nerf.py --images ../shared/data/nerf_real/fox/images --out fox_colmap/ \
        --compare ../shared/data/nerf_real/fox/transforms.json

Writes ``OUT/transforms.json`` (instant-ngp / nerfstudio layout: one OpenCV camera with
``k1 k2 p1 p2``, camera-to-world matrices in the OpenGL convention, ``aabb`` from the sparse
points, ``near``/``far`` from their depths) with ``file_path`` entries that point at the
photos, and the COLMAP database and model under ``OUT/colmap``. ``train_nerf.py --datadir
OUT`` trains on it; every 8th frame is held out for testing. ``--compare`` aligns the
recovered poses to another ``transforms.json`` of the same photos (a similarity transform)
and prints the rotation and camera-centre errors (also saved as ``OUT/pose_agreement.json``).
Needs ``pip install pycolmap``.
"""
import json
import os
import time

from kilonerf_lbfgs.config import UserError, build_parser, for_option, parse_args, run_main
from kilonerf_lbfgs.io import save_json


def main():
    p = build_parser(__doc__, skip=("max_seconds", "max_evals", "optimizer", "lr",
                                    "lr_schedule", "history_size", "history_dtype", "line_search",
                                    "target_psnr", "ckpt_every", "resume", "no_keep_best",
                                    "out_dir", "device", "seed", "no_progress"))
    p.add_argument("--images", required=True, help="the folder of photos")
    p.add_argument("--out", required=True, help="where transforms.json goes")
    p.add_argument("--colmap_dir", default=None,
                   help="an existing COLMAP sparse model (skip feature matching and mapping)")
    p.add_argument("--max_image_size", type=int, default=1600,
                   help="COLMAP extracts features at most this many pixels wide")
    p.add_argument("--compare", default=None,
                   help="a transforms.json of the same photos to measure the poses against")
    args = parse_args(p)
    if not os.path.isdir(args.images):
        raise UserError(f"--images {args.images}: not a folder")
    try:
        import pycolmap  # noqa: F401
    except ImportError:
        raise UserError("colmap2nerf.py needs pycolmap: pip install pycolmap") from None
    from kilonerf_lbfgs.nerf.data.colmap import (compare_poses, load_reconstruction,
                                                 poses_by_name, run_sfm,
                                                 transforms_from_reconstruction)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args.colmap_dir:
        with for_option("--colmap_dir", args.colmap_dir):
            rec = load_reconstruction(args.colmap_dir)
    else:
        with for_option("--images", args.images):
            rec = run_sfm(args.images, os.path.join(args.out, "colmap"), args.max_image_size)
    n_photos = len([f for f in os.listdir(args.images)
                    if f.lower().endswith((".jpg", ".jpeg", ".png"))])
    prefix = os.path.relpath(os.path.abspath(args.images), os.path.abspath(args.out))
    with for_option("--images", args.images):
        meta = transforms_from_reconstruction(rec, image_prefix=prefix)
    save_json(os.path.join(args.out, "transforms.json"), meta)
    print(f"{len(meta['frames'])} of {n_photos} photos registered, "
          f"{len(rec.points3D)} points, in {time.time() - t0:.0f} s; focal "
          f"{meta['fl_x']:.1f}/{meta['fl_y']:.1f} px, k1 {meta['k1']:.4f}; wrote "
          f"{os.path.join(args.out, 'transforms.json')}")
    if args.compare:
        with for_option("--compare", args.compare), open(args.compare) as f:
            reference = json.load(f)
        with for_option("--compare", args.compare):
            agreement = compare_poses(poses_by_name(meta), poses_by_name(reference))
        agreement["registered"], agreement["photos"] = len(meta["frames"]), n_photos
        save_json(os.path.join(args.out, "pose_agreement.json"), agreement)
        print(f"against {args.compare}: {agreement['cameras']} cameras, rotation error median "
              f"{agreement['rotation_deg_median']:.2f} deg (max "
              f"{agreement['rotation_deg_max']:.2f}), camera centres within "
              f"{100 * agreement['centre_err_median']:.3f}% of the scene size (max "
              f"{100 * agreement['centre_err_max']:.3f}%)")


if __name__ == "__main__":
    run_main(main)
