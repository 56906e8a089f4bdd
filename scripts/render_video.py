#!/usr/bin/env python
"""Render novel views of a trained NeRF checkpoint to MP4: an orbit around the scene box, or
a path through the training cameras (forward-facing captures such as your own photos).

    python scripts/render_video.py --config configs/lego.txt --ckpt outputs/lego/checkpoint.pt \
        --n_frames 120 --radius 4 --elevation 30 --render_wh 800 800
    python scripts/render_video.py --config configs/fox.txt --datadir PATH/fox --path train
"""
import os
import time

import torch

from kilonerf_lbfgs.config import (UserError, build_parser, parse_args, require_positive,
                                   run_main)
from kilonerf_lbfgs.io import save_png, to_uint8, video_writer
from kilonerf_lbfgs.nerf.cli import add_nerf_args, load_scene, load_trained
from kilonerf_lbfgs.nerf.evaluate import render_view
from kilonerf_lbfgs.nerf.data.rays import orbit_poses, path_poses
from kilonerf_lbfgs.runner import setup_run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# a bare --config NAME is also looked up in the repository's configs/, and a relative
# --datadir that is not found from the working folder in the repository
CONFIGS = os.path.join(REPO, "configs")


def main():
    p = build_parser(__doc__, psnr_target=False, config_dirs=[CONFIGS],
                     skip=("max_evals",))
    add_nerf_args(p)
    p.add_argument("--ckpt", default=None, help="checkpoint (default: OUT_DIR/checkpoint.pt)")
    p.add_argument("--path", default="orbit", choices=["orbit", "train"],
                   help="orbit: a circle around the box; train: glide through the training "
                        "cameras (needs --datadir)")
    p.add_argument("--n_frames", type=int, default=60)
    p.add_argument("--radius", type=float, default=4.0, help="camera distance from the centre")
    p.add_argument("--elevation", type=float, default=30.0, help="degrees above the horizon")
    p.add_argument("--render_wh", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="video size (default: the training images' size)")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--chunk", type=int, default=8192, help="rays per batch (bounds memory)")
    args = parse_args(p)
    require_positive(args, "n_frames", "radius", "fps", "chunk")
    device = setup_run(args)
    ckpt = args.ckpt or os.path.join(args.out_dir, "checkpoint.pt")
    field, marcher, opts, camera, rs = load_trained(ckpt, device)
    if camera is None:   # older checkpoints: take the camera from the scene's test split
        test = load_scene(args, search_dirs=[REPO])["test"]
        camera = {"W": test.W, "H": test.H, "intrinsics": test.intrinsics[0].tolist()}
    W, H = args.render_wh or (camera["W"], camera["H"])
    if W <= 0 or H <= 0:
        raise UserError(f"--render_wh must be positive, got {W} {H}")
    fx, fy, cx, cy = camera["intrinsics"]
    sx, sy = W / camera["W"], H / camera["H"]
    K = torch.tensor([fx * sx, fy * sy, cx * sx, cy * sy])
    center = [0.5 * (a + b) for a, b in zip(opts.aabb[:3], opts.aabb[3:])]
    if args.path == "train":
        poses = path_poses(load_scene(args, search_dirs=[REPO])["train"].poses, args.n_frames)
    else:
        poses = orbit_poses(args.n_frames, args.radius, args.elevation, center)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{args.path}.mp4")
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    with video_writer(path, args.fps) as writer:
        for k in tqdm(range(args.n_frames), desc=f"{args.path} {W}x{H}", disable=args.no_progress):
            img = render_view(field, marcher, poses[k], K, H, W, rs, args.chunk).cpu().numpy()
            writer.append_data(to_uint8(img))
            if k == 0:
                save_png(os.path.join(args.out_dir, f"{args.path}_frame0.png"), img)
    dt = time.perf_counter() - t0
    print(f"wrote {path}: {args.n_frames} frames at {W}x{H} in {dt:.1f} s "
          f"({args.n_frames / dt:.2f} fps)")


if __name__ == "__main__":
    run_main(main)
