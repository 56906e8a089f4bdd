#!/usr/bin/env python
"""Own photos, checked where the truth is known: a scene rendered here with known poses, the
poses thrown away, COLMAP (colmap2nerf's code) recovers them, and the same training runs on
the true and on the recovered poses.

    python scripts/benchmark_own_scene.py --mesh ../shared/data/meshes/stanford-bunny.obj \\
        --seconds 300 --out bench/own_scene

1. ``generate_mesh_scene(..., ground=True)``: the mesh on a textured ground plane under a
   sky (an opaque, textured background), 56 views on the upper hemisphere and 8 on an
   orbit, ``--size`` pixels, written as one folder of RGB photos.
2. ``run_sfm`` on the photos (pycolmap, CPU), the poses compared to the true ones after the
   best similarity (rotation error, camera-centre error as a fraction of the scene size).
3. Both pose sets as instant-ngp ``transforms.json`` files over the same photos (every 8th
   held out for the test, the same frames in both): the true cameras, and the recovered ones
   with COLMAP's intrinsics and lens, mapped into the true frame by that similarity (a
   change of gauge only: the box, near and far are then the same for both runs).
4. ``train_nerf.py --config colmap.txt`` on each for ``--seconds``, one after the other;
   test PSNR on the held-out photos.

Writes ``OUT/own_scene.json`` (and the scene, COLMAP's model and both runs under ``OUT``).
Needs pycolmap.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from kilonerf_lbfgs.config import UserError, parse_args, run_main
from kilonerf_lbfgs.io import save_json, save_png

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    import configargparse
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", required=True, help="any triangle mesh (OBJ/PLY/OFF/STL)")
    p.add_argument("--out", default="bench/own_scene")
    p.add_argument("--size", type=int, default=256, help="photo size in pixels")
    p.add_argument("--train_downsample", type=int, default=2,
                   help="train at size / this (COLMAP sees the full size)")
    p.add_argument("--seconds", type=float, default=300.0, help="training budget per run")
    p.add_argument("--skip_training", action="store_true")
    args = parse_args(p)
    if not os.path.isfile(args.mesh):
        raise UserError(f"--mesh {args.mesh}: no such file")
    try:
        import pycolmap  # noqa: F401
    except ImportError:
        raise UserError("this benchmark needs pycolmap: pip install pycolmap") from None
    import imageio.v3 as iio
    from kilonerf_lbfgs.nerf.data.colmap import (compare_poses, poses_by_name, run_sfm,
                                                 transforms_from_reconstruction, umeyama)
    from kilonerf_lbfgs.nerf.data.demo_scene import CAMERA_ANGLE_X
    from kilonerf_lbfgs.nerf.data.mesh_scene import generate_mesh_scene

    out = os.path.abspath(args.out)
    scene, photos = os.path.join(out, "scene"), os.path.join(out, "photos")
    t0 = time.time()
    if not os.path.isfile(os.path.join(scene, "transforms_train.json")):
        generate_mesh_scene(args.mesh, scene, size=args.size, n_train=56, n_test=8, ground=True)
    truth = {}
    os.makedirs(photos, exist_ok=True)
    k = 0
    for split in ("train", "test"):
        with open(os.path.join(scene, f"transforms_{split}.json")) as f:
            meta = json.load(f)
        for fr in meta["frames"]:
            name = f"view_{k:03d}.png"
            img = iio.imread(os.path.join(scene, fr["file_path"] + ".png"))[..., :3]
            save_png(os.path.join(photos, name), img.astype(np.float32) / 255.0)
            truth[name] = np.asarray(fr["transform_matrix"], dtype=np.float64)
            k += 1
    print(f"{len(truth)} photos of {args.mesh} at {args.size} px in {time.time() - t0:.0f} s")

    t0 = time.time()
    rec = run_sfm(photos, os.path.join(out, "colmap"), max_image_size=args.size)
    sfm_seconds = time.time() - t0
    found = transforms_from_reconstruction(rec, image_prefix="../photos")
    ours = poses_by_name(found)
    agreement = compare_poses(ours, truth)
    focal_true = 0.5 * args.size / np.tan(0.5 * CAMERA_ANGLE_X)
    print(f"COLMAP: {len(ours)} of {len(truth)} registered in {sfm_seconds:.0f} s; rotation "
          f"error median {agreement['rotation_deg_median']:.3f} deg, centres "
          f"{100 * agreement['centre_err_median']:.3f}% of the scene; focal "
          f"{found['fl_x']:.1f} px (true {focal_true:.1f})")

    names = sorted(ours)                         # the same frames in both files
    c_ours = np.stack([ours[n][:3, 3] for n in names])
    c_true = np.stack([truth[n][:3, 3] for n in names])
    s, R, t = umeyama(c_ours, c_true)
    box = {"aabb": [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], "near": 2.0, "far": 6.0}
    true_meta = {"camera_angle_x": CAMERA_ANGLE_X, "w": args.size, "h": args.size, **box,
                 "frames": [{"file_path": f"../photos/{n}",
                             "transform_matrix": truth[n].tolist()} for n in names]}
    aligned = []
    for n in names:
        c2w = ours[n].copy()
        c2w[:3, :3] = R @ c2w[:3, :3]
        c2w[:3, 3] = s * R @ c2w[:3, 3] + t
        aligned.append({"file_path": f"../photos/{n}", "transform_matrix": c2w.tolist()})
    lens = {key: found[key] for key in ("fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2",
                                        "p1", "p2") if key in found}
    colmap_meta = {**lens, **box, "frames": aligned}
    save_json(os.path.join(out, "true_poses", "transforms.json"), true_meta)
    save_json(os.path.join(out, "colmap_poses", "transforms.json"), colmap_meta)

    runs = {}
    if not args.skip_training:
        for name in ("true_poses", "colmap_poses"):
            run_dir = os.path.join(out, f"run_{name}")
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [sys.executable, os.path.join(HERE, "train_nerf.py"), "--config", "colmap.txt",
                   "--datadir", os.path.join(out, name), "--downsample",
                   str(args.train_downsample), "--max_seconds", str(args.seconds),
                   "--out_dir", run_dir, "--no_progress"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            with open(os.path.join(run_dir, "metrics.json")) as f:
                m = json.load(f)
            runs[name] = {k: m[k] for k in ("test_psnr", "test_ssim", "train_seconds",
                                            "n_test_views", "function_evals")}
            print(f"{name}: test PSNR {m['test_psnr']:.2f} dB")
    report = {"mesh": args.mesh, "size": args.size, "photos": len(truth),
              "registered": len(ours), "sfm_seconds": sfm_seconds,
              "focal_px": [found["fl_x"], found["fl_y"]], "focal_true_px": focal_true,
              "distortion": [found.get(k) for k in ("k1", "k2", "p1", "p2")],
              "agreement": agreement, "train_downsample": args.train_downsample,
              "seconds": args.seconds, "runs": runs}
    if len(runs) == 2:
        report["psnr_gap_db"] = runs["true_poses"]["test_psnr"] - runs["colmap_poses"]["test_psnr"]
    save_json(os.path.join(out, "own_scene.json"), report)
    print(f"wrote {os.path.join(out, 'own_scene.json')}")


if __name__ == "__main__":
    run_main(main)
