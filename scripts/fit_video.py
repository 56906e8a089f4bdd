#!/usr/bin/env python
"""Fit a video with a 3-D grid (frames x rows x cols) of tiny sine networks, per-cell L-BFGS.

    python scripts/fit_video.py --config configs/video.txt [--video PATH] [--frames N] [--resize 0.5]
"""
import os

from kilonerf_lbfgs.config import (UserError, build_parser, for_option, parse_args,
                                   require_positive, run_main)
from kilonerf_lbfgs.runner import add_model_args, make_model, run_fit, setup_run
from kilonerf_lbfgs.signals.video import (VideoProblem, frame_metrics, load_video, save_mp4,
                                          save_side_by_side, video_fps)

# a bare --config NAME is also looked up in the repository's configs/ beside this script
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")


def main():
    p = build_parser(__doc__, config_dirs=[CONFIGS])
    add_model_args(p)
    p.add_argument("--video", default=None,
                   help="MP4/GIF file or folder of frames (default: a clip made in code)")
    p.add_argument("--frames", type=int, default=0, help="use the first N frames (0: all)")
    p.add_argument("--resize", type=float, nargs="+", default=None,
                   help="FACTOR, or W H in pixels")
    p.add_argument("--grid", type=int, nargs=3, default=[2, 4, 4],
                   help="cells per axis: FRAMES ROWS COLS")
    p.add_argument("--chunk_cells", type=int, default=16,
                   help="cells per forward/backward chunk (bounds memory)")
    args = parse_args(p)
    require_positive(args, "grid", "chunk_cells")
    if args.frames < 0:
        raise UserError(f"--frames must be 0 (all) or positive, got {args.frames}")
    if args.resize is not None and (len(args.resize) not in (1, 2) or min(args.resize) <= 0):
        raise UserError(f"--resize takes a positive FACTOR or W H, got {args.resize}")
    device = setup_run(args)
    with for_option("--video", args.video):
        clip = load_video(args.video, args.frames or None, args.resize)
    with for_option("--grid", args.grid):
        problem = VideoProblem(clip, args.grid, args.chunk_cells, device=device)
    model = make_model(args, problem.n_cells, 3, clip.shape[3], device)
    print(f"video {clip.shape[0]} frames of {clip.shape[1]}x{clip.shape[2]}x{clip.shape[3]}, "
          f"{problem.n_cells} cells, {model.params_per_cell} parameters per cell, "
          f"{args.optimizer} on {device}")

    def export(model):
        recon = problem.reconstruct(model)
        save_mp4(os.path.join(args.out_dir, "reconstruction.mp4"), recon,
                 video_fps(args.video))
        save_side_by_side(os.path.join(args.out_dir, "frames.png"), clip, recon)
        return {**frame_metrics(recon, clip), "video_shape": list(clip.shape)}

    m = run_fit(args, "video", problem, model, target=args.target_psnr, export=export)
    print(f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} (means over frames) after "
          f"{m['train_seconds']:.1f} s ({m['function_evals']} evaluations); "
          f"outputs in {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
