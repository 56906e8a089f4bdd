#!/usr/bin/env python
"""An image larger than memory, fitted in bounded memory: build a large RGB TIFF from real
photos (a mosaic at their native resolution), fit it with ``fit_image.py --cells_in_memory``
(the out-of-core path) in a subprocess, and report peak resident memory, PSNR/SSIM and the
evaluation budget.

    python scripts/benchmark_large_image.py --size 8192 --photos ../shared/data/nerf_real/fox/images \
        --max_evals 10 --out bench/large_image.json
    python scripts/benchmark_large_image.py --record docs/results/large_image.json \
        --from bench/large_image.json

The mosaic tiles whole photos side by side (no resampling; photos reused in turn when there
are too few) and is cropped to ``size x size``; it is written band by band through a TIFF
memory map, so building it is bounded too. The fit uses cells of ``--cell_px`` pixels
(``--grid = size / cell_px``), ``configs/image.txt``'s networks and optimiser, a budget of
``--max_evals`` evaluations per band and ``--history_size`` curvature pairs.
"""
import json
import os
import sys
from pathlib import Path

import configargparse
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import (PROVENANCE, add_record_args, add_run_args,  # noqa: E402
                                concat_rows, run_script, write_record)
from kilonerf_lbfgs.config import UserError, parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402

PHOTO_EXTS = (".jpg", ".jpeg", ".png")


def write_mosaic(photos, path: str, size: int) -> dict:
    """Tile the photos (sorted by name, reused in turn) at native resolution into a
    ``size x size`` RGB uint8 TIFF at ``path``; returns what was used."""
    import imageio.v3 as iio
    import tifffile
    first = iio.imread(photos[0])
    ph, pw = first.shape[:2]
    cols, rows = -(-size // pw), -(-size // ph)
    tmp = path + ".part.tif"
    out = tifffile.memmap(tmp, shape=(size, size, 3), dtype=np.uint8, photometric="rgb")
    used = 0
    for r in range(rows):
        y0, y1 = r * ph, min(size, (r + 1) * ph)
        for c in range(cols):
            x0, x1 = c * pw, min(size, (c + 1) * pw)
            img = iio.imread(photos[used % len(photos)])
            used += 1
            if img.shape[:2] != (ph, pw):
                raise UserError(f"--photos: {photos[used % len(photos) - 1]} is "
                                f"{img.shape[1]}x{img.shape[0]}, the first photo {pw}x{ph}; "
                                f"the mosaic needs photos of one size")
            out[y0:y1, x0:x1] = img[:y1 - y0, :x1 - x0, :3]
        out.flush()
    del out
    os.replace(tmp, path)
    return {"photos_used": used, "distinct_photos": min(used, len(photos)),
            "photo_size": [pw, ph], "tiles": [cols, rows]}


def run_fit(args, image: str) -> dict:
    grid = args.size // args.cell_px
    out = os.path.join(args.runs_dir, f"fit_{args.size}")
    cmd = [sys.executable, str(ROOT / "scripts" / "fit_image.py"), "--config",
           str(ROOT / "configs" / "image.txt"), "--image", image, "--grid", str(grid),
           "--cells_in_memory", str(args.cells_in_memory), "--max_evals", str(args.max_evals),
           "--max_seconds", "1e9", "--history_size", str(args.history_size),
           "--target_psnr", "1000", "--out_dir", out, "--no_progress"]
    wall = run_script(cmd, args.threads, "fit_image.py")
    m = json.loads(Path(out, "metrics.json").read_text())
    import tifffile
    with tifffile.TiffFile(os.path.join(out, "reconstruction.tif")) as t:
        recon_shape = list(t.series[0].shape)
    return {"command": " ".join(["python"] + cmd[1:]), "grid": [grid, grid],
            "cell_px": args.cell_px, "cells_in_memory": args.cells_in_memory,
            "max_evals_per_band": args.max_evals, "history_size": args.history_size,
            "psnr": m["psnr"], "ssim": m["ssim"], "peak_rss_mb": m["peak_rss_mb"],
            "train_seconds": m["train_seconds"], "wall_seconds": wall,
            "function_evals": m["function_evals"], "bands": m["bands"], "cells": m["cells"],
            "params_per_cell": m["params_per_cell"],
            "image_shape": m["image_shape"], "reconstruction_shape": recon_shape}


COLUMNS = ["image", "cells", "cells_in_memory", "evals_per_band", "history", "psnr_db",
           "ssim", "peak_rss_mb", "image_as_float32_mb", "weights_mb", "train_s",
           "reconstruction"]


def to_record(report, command, date, machine, threads, notes):
    rows = []
    for r in report["rows"]:
        h, w, c = r["image_shape"]
        p = r["params_per_cell"]
        rows.append([f"{w}x{h}x{c} uint8 TIFF", r["cells"], r["cells_in_memory"],
                     r["max_evals_per_band"], r["history_size"], round(r["psnr"], 2),
                     round(r["ssim"], 4), round(r["peak_rss_mb"]), round(h * w * c * 4 / 1e6),
                     round(r["cells"] * p * 4 / 1e6), round(r["train_seconds"]),
                     "x".join(str(s) for s in r["reconstruction_shape"]) + " TIFF"])
    return {
        "title": "An image larger than memory: an 8192x8192 mosaic of real photos fitted band "
                 "by band",
        "command": command, "date": date, "machine": machine, "threads": threads,
        "conditions": f"The image: {report['mosaic']['distinct_photos']} photos of the fox "
                      f"capture ({report['mosaic']['photo_size'][0]}x"
                      f"{report['mosaic']['photo_size'][1]} JPEG) tiled at native resolution "
                      f"and cropped, stored as an uncompressed TIFF. scripts/fit_image.py "
                      f"--config configs/image.txt (sine 3x32 per cell, batched L-BFGS) with "
                      f"--cells_in_memory: the TIFF memory-mapped, cells of "
                      f"{report['rows'][0]['cell_px']}x{report['rows'][0]['cell_px']} pixels "
                      f"fitted one band of whole cell rows at a time, each band's weights "
                      f"written to disk, the reconstruction written into a TIFF memory map. "
                      f"Budget: a fixed number of evaluations per band. Peak memory: the fit "
                      f"process's peak resident set (VmHWM), memory-mapped pages of the "
                      f"input and output TIFFs included.",
        "notes": notes,
        "provenance": PROVENANCE,
        "columns": COLUMNS, "rows": rows}


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "nerf_real" / "fox"
                                           / "images"), help="a folder of photos of one size")
    p.add_argument("--size", type=int, default=8192, help="the mosaic's side in pixels")
    p.add_argument("--image", default=None,
                   help="the mosaic TIFF (built if missing; default bench/large/mosaic_SIZE.tif)")
    p.add_argument("--cell_px", type=int, default=32, help="cell side in pixels")
    p.add_argument("--cells_in_memory", type=int, default=256)
    p.add_argument("--max_evals", type=int, default=10, help="evaluations per band")
    p.add_argument("--history_size", type=int, default=100)
    add_run_args(p, "large_image")
    add_record_args(p)
    args = parse_args(p)
    if args.record:
        write_record(args, concat_rows, to_record, "python scripts/benchmark_large_image.py")
        return
    if args.size % args.cell_px:
        raise UserError(f"--size {args.size} is not a multiple of --cell_px {args.cell_px}")
    image = args.image or os.path.join(args.runs_dir, f"mosaic_{args.size}.tif")
    os.makedirs(os.path.dirname(os.path.abspath(image)), exist_ok=True)
    mosaic = {}
    if not os.path.isfile(image):
        if not os.path.isdir(args.photos):
            raise UserError(f"--photos: {args.photos} is not a folder")
        photos = sorted(str(q) for q in Path(args.photos).iterdir()
                        if q.suffix.lower() in PHOTO_EXTS)
        if not photos:
            raise UserError(f"--photos: no JPEG/PNG files in {args.photos}")
        mosaic = write_mosaic(photos, image, args.size)
        print(f"wrote {image}: {mosaic}")
        save_json(image + ".json", mosaic)
    elif os.path.isfile(image + ".json"):
        mosaic = json.loads(Path(image + ".json").read_text())
    row = run_fit(args, image)
    print(json.dumps(row), flush=True)
    save_json(args.out, {"threads": args.threads, "mosaic": mosaic, "rows": [row]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
