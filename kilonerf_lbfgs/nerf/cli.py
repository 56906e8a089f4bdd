"""Options shared by the NeRF scripts (train, render, benchmark) and their checks."""
from __future__ import annotations

import os
from typing import Dict

from ..config import REPO_ROOT
from ..io import UserError
from .data.loaders import NerfSplit, load_dataset
from .data.demo_scene import ensure_demo_scene
from .train.pipeline import NerfOptions

DEFAULTS = NerfOptions()


def add_nerf_args(p) -> None:
    a = p.add_argument
    a("--datadir", default="datasets/nerf_synthetic/lego",
      help="scene folder holding transforms_{train,test}.json (or instant-ngp transforms.json)")
    a("--demo_scene", action="store_true",
      help="generate the bundled demo scene into --datadir if it is not there yet")
    a("--demo_size", type=int, default=64, help="demo scene image size")
    a("--downsample", type=int, default=1, help="load images downsampled by this factor")
    a("--img_wh", type=int, nargs=2, default=None, metavar=("W", "H"),
      help="load images at this size instead")
    a("--test_every", type=int, default=1, help="evaluate every k-th test view")
    a("--aabb", type=float, nargs=6, default=None,
      help="scene box xmin ymin zmin xmax ymax zmax (default: the scene's, else [-1.5, 1.5]^3)")
    a("--near", type=float, default=None, help="default: the scene's (Blender: 2)")
    a("--far", type=float, default=None, help="default: the scene's (Blender: 6)")
    a("--white_bkgd", type=int, default=1, help="1: composite on white, 0: on black")
    a("--route", default=DEFAULTS.route, choices=["distill", "direct"])
    a("--grid_res", type=int, default=DEFAULTS.grid_res, help="KiloNeRF cells per axis")
    a("--width", type=int, default=DEFAULTS.width, help="hidden width per cell network")
    a("--depth", type=int, default=DEFAULTS.depth, help="hidden layers per cell network")
    a("--feature_dim", type=int, default=DEFAULTS.feature_dim)
    a("--head_width", type=int, default=DEFAULTS.head_width)
    a("--activation", default=DEFAULTS.activation)
    a("--omega_0", type=float, default=DEFAULTS.omega_0)
    a("--head_omega", type=float, default=DEFAULTS.head_omega)
    a("--occ_res", type=int, default=DEFAULTS.occ_res, help="occupancy grid voxels per axis")
    a("--occ_threshold", type=float, default=DEFAULTS.occ_threshold,
      help="a voxel is occupied when one marching step there has alpha above this")
    a("--step_size", type=float, default=DEFAULTS.step_size,
      help="marching step (0: box diagonal / 256)")
    a("--batch_rays", type=int, default=DEFAULTS.batch_rays)
    a("--teacher_fraction", type=float, default=DEFAULTS.teacher_fraction)
    a("--distill_fraction", type=float, default=DEFAULTS.distill_fraction)
    a("--teacher", default=DEFAULTS.teacher, choices=["dense", "hash"],
      help="distill route's teacher: dense grids, or a hash encoding (tinycudann on CUDA "
           "where installed, else pure PyTorch)")
    a("--teacher_res", type=int, default=DEFAULTS.teacher_res, help="dense teacher only")
    a("--teacher_color_res", type=int, default=DEFAULTS.teacher_color_res,
      help="dense teacher only")
    a("--teacher_lr", type=float, default=DEFAULTS.teacher_lr,
      help="Adam rate of the teacher (default: dense 0.3, hash 1e-2)")
    a("--hash_levels", type=int, default=DEFAULTS.hash_levels, help="hash teacher only")
    a("--hash_log2_table", type=int, default=DEFAULTS.hash_log2_table,
      help="hash teacher only: 2^k feature rows per level (Instant-NGP: 19)")
    a("--hash_max_res", type=int, default=DEFAULTS.hash_max_res,
      help="hash teacher only: finest lattice resolution (Instant-NGP: 2048)")
    a("--tv_weight", type=float, default=DEFAULTS.tv_weight,
      help="total-variation weight on the dense teacher's density grid")
    a("--distill_rays", type=int, default=DEFAULTS.distill_rays)
    a("--distill_max_per_cell", type=int, default=DEFAULTS.distill_max_per_cell)
    a("--evals_per_step", type=int, default=DEFAULTS.evals_per_step)
    a("--finetune_lr", type=float, default=DEFAULTS.finetune_lr)
    a("--direct_lr", type=float, default=DEFAULTS.direct_lr)
    a("--max_steps", type=int, default=0,
      help="photometric stages also stop after this many steps (0: time budget only); "
           "makes runs reproducible across machines and restarts")
    p.set_defaults(history_size=DEFAULTS.history_size, ckpt_every=60.0, max_seconds=600.0)


def resolve_datadir(path: str) -> str:
    """A relative path that does not exist from the working folder is also tried from the
    repository root (scripts are documented as run from there)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(REPO_ROOT, path)
    return alt if os.path.exists(alt) else path


def load_scene(args) -> Dict[str, NerfSplit]:
    if args.downsample < 1:
        raise UserError(f"--downsample must be >= 1, got {args.downsample}")
    if args.test_every < 1:
        raise UserError(f"--test_every must be >= 1, got {args.test_every}")
    datadir = resolve_datadir(args.datadir)
    if args.demo_scene:
        ensure_demo_scene(datadir, size=args.demo_size)
    bg = (1.0, 1.0, 1.0) if args.white_bkgd else (0.0, 0.0, 0.0)
    return load_dataset(datadir, downsample=args.downsample,
                        img_wh=tuple(args.img_wh) if args.img_wh else None, background=bg,
                        test_every=args.test_every)


def options_from_args(args, train: NerfSplit) -> NerfOptions:
    box = args.aabb or [*train.scene_box[0], *train.scene_box[1]]
    if not all(h > l for l, h in zip(box[:3], box[3:])):
        raise UserError(f"--aabb {box}: each max must exceed its min")
    for name in ("teacher_fraction", "distill_fraction"):
        v = getattr(args, name)
        if not 0 <= v <= 1:
            raise UserError(f"--{name} must lie in [0, 1], got {v}")
    if args.teacher_fraction + args.distill_fraction > 1:
        raise UserError("--teacher_fraction + --distill_fraction must be at most 1")
    if args.tv_weight > 0 and args.teacher != "dense":
        raise UserError(f"--tv_weight applies to the dense teacher only (--teacher "
                        f"{args.teacher}); drop it or use --teacher dense")
    kw = {k: getattr(args, k) for k in NerfOptions.__dataclass_fields__
          if hasattr(args, k) and k not in ("aabb", "near", "far", "background", "progress")}
    return NerfOptions(**kw, aabb=[float(v) for v in box],
                       near=train.near if args.near is None else args.near,
                       far=train.far if args.far is None else args.far,
                       background=[1.0] * 3 if args.white_bkgd else [0.0] * 3,
                       progress=not args.no_progress)
