"""Options shared by the NeRF scripts (train, render) and their checks.

The flags are derived from two dataclasses: :class:`SceneOptions` (where the posed images are
and how to load them) and :class:`~kilonerf_lbfgs.nerf.train.pipeline.NerfOptions` (the
training pipeline), one ``--name`` per field; see :func:`kilonerf_lbfgs.config.add_options`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import replace
from typing import Dict, List, NamedTuple, Optional, Sequence

from ..config import UserError, add_options, for_option, option
from ..config import options_from_args as _dataclass_from_args
from .data.demo_scene import default_demo_dir, ensure_demo_scene
from ..io import load_checkpoint
from .data.loaders import NerfSplit, load_dataset
from .fields.background import BackgroundMap
from .fields.kilonerf import KiloNeRFField
from .render.marcher import Marcher
from .render.rendering import RenderSettings
from .train.pipeline import NerfOptions, route_conflict

DEFAULTS = NerfOptions()


@dataclasses.dataclass
class SceneOptions:
    """Where the scene is and how it is loaded; ``aabb``, ``near`` and ``far`` default to
    the scene's own."""
    datadir: Optional[str] = option(
        None, "scene folder holding transforms_{train,test}.json (or instant-ngp "
              "transforms.json); with --demo_scene, default: the user cache "
              "(see nerf.data.demo_scene.default_demo_dir)")
    demo_scene: bool = option(False, "generate the bundled demo scene into --datadir (or the "
                                     "user cache) if it is not there yet")
    demo_size: int = option(64, "demo scene image size", positive=True)
    downsample: int = option(1, "load images downsampled by this factor", positive=True)
    img_wh: Optional[List[int]] = option(None, "load images at this size instead", nargs=2,
                                         metavar=("W", "H"), positive=True)
    test_every: int = option(1, "evaluate every k-th test view", positive=True)
    aabb: Optional[List[float]] = option(
        None, "scene box xmin ymin zmin xmax ymax zmax (default: the scene's, else "
              "[-1.5, 1.5]^3)", nargs=6)
    auto_box: float = option(0.0, "seconds of a coarse pass that finds a tight box around the "
                                  "object inside the scene's box (0: off; masked scenes)",
                             min=0)
    near: Optional[float] = option(None, "default: the scene's (Blender: 2)", min=0)
    far: Optional[float] = option(None, "default: the scene's (Blender: 6)", positive=True)
    white_bkgd: int = option(1, "1: composite on white, 0: on black", choices=(0, 1))


def add_nerf_args(p) -> None:
    """The :class:`SceneOptions` and :class:`NerfOptions` flags; options the parser already
    has (``--max_seconds``, ``--optimizer``, ...) take the pipeline's defaults."""
    add_options(p, SceneOptions)
    add_options(p, NerfOptions)


def resolve_datadir(path: Optional[str], demo_scene: bool = False, demo_size: int = 64,
                    search_dirs: Sequence[str] = ()) -> str:
    """The scene folder: ``path`` from the working folder, else from the first of
    ``search_dirs`` where it exists; without ``path``, the demo scene's default folder (with
    ``demo_scene``)."""
    if path is None:
        if demo_scene:
            return default_demo_dir(demo_size)
        raise UserError("--datadir: give the scene folder (or --demo_scene for the bundled "
                        "demo scene)")
    if os.path.isabs(path) or os.path.exists(path) or demo_scene:
        return path
    for d in search_dirs:
        alt = os.path.join(d, path)
        if os.path.exists(alt):
            return alt
    return path


def load_scene(args, search_dirs: Sequence[str] = ()) -> Dict[str, NerfSplit]:
    """The scene's splits; ``search_dirs`` are also tried for a relative ``--datadir`` (the
    scripts pass the repository root beside them). Problems are one :class:`UserError`
    naming the flag."""
    datadir = resolve_datadir(args.datadir, args.demo_scene, args.demo_size, search_dirs)
    if args.demo_scene:
        with for_option("--datadir", datadir):
            ensure_demo_scene(datadir, size=args.demo_size)
    bg = (1.0, 1.0, 1.0) if args.white_bkgd else (0.0, 0.0, 0.0)
    with for_option("--datadir", datadir):
        return load_dataset(datadir, downsample=args.downsample,
                            img_wh=tuple(args.img_wh) if args.img_wh else None, background=bg,
                            test_every=args.test_every)


def options_from_args(args, train: NerfSplit) -> NerfOptions:
    """:class:`NerfOptions` from the parsed flags and the training split (its box, near and
    far where the flags leave them open); cross-option checks as :class:`UserError`."""
    box = args.aabb or [*train.scene_box[0], *train.scene_box[1]]
    if not all(h > l for l, h in zip(box[:3], box[3:])):
        raise UserError(f"--aabb {' '.join(map(str, box))}: each max must exceed its min")
    if args.teacher_fraction + args.distill_fraction > 1:
        raise UserError("--teacher_fraction + --distill_fraction must be at most 1")
    if args.tv_weight > 0 and args.teacher != "dense":
        raise UserError(f"--tv_weight applies to the dense teacher only (--teacher "
                        f"{args.teacher}); drop it or use --teacher dense")
    conflict = route_conflict(args)
    if conflict:
        raise UserError(conflict)
    near = train.near if args.near is None else args.near
    far = train.far if args.far is None else args.far
    if not near < far:
        raise UserError(f"--near {near} must be below --far {far}")
    return _dataclass_from_args(NerfOptions, args, aabb=[float(v) for v in box],
                                near=near, far=far,
                                background=[1.0] * 3 if args.white_bkgd else [0.0] * 3,
                                progress=not args.no_progress)


class TrainedNerf(NamedTuple):
    """What a train_nerf.py checkpoint holds: the cells, the occupancy grid, the options,
    the training camera (``{"W", "H", "intrinsics"}`` or None) and the render settings (with
    the learned background, if the run had one)."""
    field: KiloNeRFField
    marcher: Marcher
    opts: NerfOptions
    camera: Optional[dict]
    rs: RenderSettings


def load_trained(path: str, device) -> TrainedNerf:
    """The trained scene of a train_nerf.py checkpoint; a missing file or a checkpoint of
    another kind is one :class:`UserError` naming ``--ckpt``."""
    if not os.path.isfile(path):
        raise UserError(f"--ckpt {path}: no such checkpoint; train first with "
                        f"scripts/train_nerf.py (it writes OUT_DIR/checkpoint.pt)")
    with for_option("--ckpt", path):
        ckpt = load_checkpoint(path, map_location=device)
    if ckpt.get("kind") != "nerf" or "field" not in ckpt:
        raise UserError(f"--ckpt {path}: not a NeRF checkpoint with trained cell networks "
                        f"(was training stopped before the cells were built?)")
    opts = NerfOptions(**{k: v for k, v in ckpt["options"].items()
                          if k in NerfOptions.__dataclass_fields__})
    field = KiloNeRFField.from_config(ckpt["field"]["config"], device=device)
    state = ckpt["model"] if ckpt.get("fit_stage") else ckpt["field"]["state"]
    field.load_state_dict(state)
    marcher = Marcher(opts.aabb, opts.occ_res, threshold=opts.occ_threshold, device=device)
    marcher.load_state_dict(ckpt["marcher"])
    rs = opts.settings(device)
    if opts.background_model == "learned" and "background" in ckpt:
        bg = BackgroundMap(opts.background_res, device=device)
        bg.load_state_dict(ckpt["background"])
        rs = replace(rs, background=bg.eval())
    return TrainedNerf(field.eval(), marcher, opts, ckpt.get("camera"), rs)
