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
    p.add_argument("--cells_in_memory", type=int, default=0,
                   help="fit the cells in bands of at most this many, reading the image "
                        "lazily (a TIFF, plain, tiled or compressed, or .npy) and writing "
                        "reconstruction.tif "
                        "band by band: memory set by the band, not the image (0: all at once)")
    args = parse_args(p)
    require_positive(args, "grid")
    if len(args.grid) > 2:
        raise UserError(f"--grid takes one or two numbers (ROWS [COLS]), got {args.grid}")
    if args.cells_in_memory < 0:
        raise UserError(f"--cells_in_memory {args.cells_in_memory}: must be >= 0")
    device = setup_run(args)
    if args.cells_in_memory:
        return fit_banded(args, device)
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


def fit_banded(args, device):
    """The out-of-core path: the image read lazily, the cells fitted band by band."""
    from kilonerf_lbfgs.io import save_json
    from kilonerf_lbfgs.runner import fit_config_from_args
    from kilonerf_lbfgs.signals.large_image import fit_large_image, open_lazy
    if args.image is None or args.image in ("astronaut", "camera", "coffee"):
        raise UserError("--cells_in_memory needs --image FILE (a TIFF or .npy)")
    with for_option("--image", args.image):
        image = open_lazy(args.image)
    rows, cols = args.grid[0], args.grid[-1]
    channels = 1 if image.ndim == 2 else min(image.shape[2], 3)
    print(f"image {image.shape[0]}x{image.shape[1]}x{channels} ({image.dtype}), "
          f"{rows * cols} cells in bands of at most {max(args.cells_in_memory, cols)}, "
          f"{args.optimizer} on {device}")

    os.makedirs(args.out_dir, exist_ok=True)
    cfg = fit_config_from_args(args, args.target_psnr, desc="band")
    with for_option("--grid", args.grid):
        m = fit_large_image(image, (rows, cols), args.cells_in_memory,
                            lambda n, band: make_model(args, n, 2, channels, device, band), cfg,
                            os.path.join(args.out_dir, "reconstruction.tif"),
                            os.path.join(args.out_dir, "weights"), resume=args.resume,
                            device=device)
    m.update(modality="image", optimizer=args.optimizer, seed=args.seed,
             cells_in_memory=args.cells_in_memory)
    save_json(os.path.join(args.out_dir, "metrics.json"), m)
    print(f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} after {m['train_seconds']:.1f} s "
          f"({m['function_evals']} evaluations), peak memory {m['peak_rss_mb']:.0f} MB; "
          f"outputs in {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
