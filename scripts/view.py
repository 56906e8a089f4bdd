#!/usr/bin/env python
"""Fly around a trained NeRF checkpoint in the browser (a viser web viewer on this machine).

    python scripts/view.py --ckpt outputs/demo/checkpoint.pt      # then open the printed URL
    python scripts/view.py --ckpt outputs/lego/checkpoint.pt --port 8081 --resolution 400

Drag to orbit, scroll to zoom; the view is rendered from the cells at the browser's camera
(fewer rows while it moves). The panel toggles the cell grid and the occupancy grid.
Over SSH: ``ssh -L 8080:localhost:8080 HOST`` and open http://localhost:8080 here.
"""
import time

import configargparse

from kilonerf_lbfgs.config import UserError, parse_args, require_positive, run_main
from kilonerf_lbfgs.nerf.cli import load_trained
from kilonerf_lbfgs.backends import resolve_device


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train_nerf.py checkpoint")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (0.0.0.0: every interface of this machine)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--resolution", type=int, default=256, help="image rows at rest")
    p.add_argument("--moving_resolution", type=int, default=96,
                   help="image rows while the camera moves")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seconds", type=float, default=0.0,
                   help="stop serving after this many seconds (0: until Ctrl-C)")
    args = parse_args(p)
    require_positive(args, "port", "resolution", "moving_resolution")
    try:
        from kilonerf_lbfgs.nerf.viewer import NerfViewer
    except ImportError as e:
        raise UserError(f"the viewer needs viser ({e}); pip install viser") from e
    device = resolve_device(args.device)
    field, marcher, opts, _, rs = load_trained(args.ckpt, device)
    try:
        viewer = NerfViewer(opts.aabb, rs, grid_res=opts.grid_res,
                            host=args.host, port=args.port, resolution=args.resolution,
                            moving_resolution=args.moving_resolution)
    except OSError as e:
        raise UserError(f"--port {args.port}: cannot serve there ({e}); pick another") from e
    viewer.set_field(field, marcher)
    viewer.update(f"**{args.ckpt}**  \n{field.n_nets} cells with networks, "
                  f"{field.params_per_cell} parameters each")
    print(f"viewer at {viewer.url} (Ctrl-C to stop)", flush=True)
    t0 = time.monotonic()
    try:
        while args.seconds <= 0 or time.monotonic() - t0 < args.seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    viewer.close()


if __name__ == "__main__":
    run_main(main)
