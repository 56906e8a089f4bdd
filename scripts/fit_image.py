#!/usr/bin/env python
"""Fit an image with a grid of tiny sine networks (one per cell) trained by per-cell L-BFGS.

    python scripts/fit_image.py --config configs/image.txt [--image PATH] [--optimizer adam]
"""
import os

from kilonerf_lbfgs.config import (UserError, build_parser, for_option, parse_args,
                                   require_positive, run_main)
from kilonerf_lbfgs.io import save_png
from kilonerf_lbfgs.metrics import psnr, ssim
from kilonerf_lbfgs.runner import add_model_args, make_model, run_fit, setup_run
from kilonerf_lbfgs.signals.image import ImageProblem, center_crop, load_image

# a bare --config NAME is also looked up in the repository's configs/ beside this script
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")


def main():
    p = build_parser(__doc__, config_dirs=[CONFIGS])
    add_model_args(p)
    p.add_argument("--image", default=None,
                   help="PNG/JPEG path, or astronaut|camera|coffee (bundled with scikit-image)")
    p.add_argument("--crop", type=int, default=0, help="centre crop size (0: whole image)")
    p.add_argument("--grid", type=int, nargs="+", default=[16, 16],
                   help="cells per axis: ROWS [COLS]")
    args = parse_args(p)
    require_positive(args, "grid")
    if len(args.grid) > 2:
        raise UserError(f"--grid takes one or two numbers (ROWS [COLS]), got {args.grid}")
    device = setup_run(args)
    with for_option("--image", args.image):
        img = load_image(args.image)
    if args.crop > 0:
        img = center_crop(img, args.crop)
    with for_option("--grid", args.grid):
        problem = ImageProblem(img, args.grid, device=device)
    model = make_model(args, problem.n_cells, 2, img.shape[2], device)
    print(f"image {img.shape[0]}x{img.shape[1]}x{img.shape[2]}, {problem.n_cells} cells, "
          f"{model.params_per_cell} parameters per cell, {args.optimizer} on {device}")

    def export(model):
        recon = problem.reconstruct(model)
        save_png(os.path.join(args.out_dir, "reconstruction.png"), recon)
        save_png(os.path.join(args.out_dir, "target.png"), img)
        return {"psnr": psnr(recon, img), "ssim": ssim(recon.clip(0, 1), img),
                "image_shape": list(img.shape)}

    m = run_fit(args, "image", problem, model, target=args.target_psnr, export=export)
    print(f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} after {m['train_seconds']:.1f} s "
          f"({m['function_evals']} evaluations); outputs in {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
