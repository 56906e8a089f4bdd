"""A tight scene box from a coarse pass (KiloNeRF derives its boxes from a coarse field too).

The cells are spread evenly over the scene box, so a box much larger than the object wastes
most of them on empty space (the standard NeRF-synthetic box [-1.5, 1.5]^3 holds lego's
object in a sixth of its volume). :func:`find_tight_box` trains a coarse dense-grid field on
the photos for a few seconds, renders a set of training rays with it, and bounds the points
where the opaque ones end (:func:`surface_bounds`: robust percentiles and a margin, the box
colmap2nerf.py makes from COLMAP's sparse points). Where rays end is what the photos
constrain; the occupancy of the coarse field also holds floaters and unseen space. With
``background_model learned`` the coarse pass learns a background map too, so rays into the
far background do not count.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence

import numpy as np
import torch

from ..data.rays import RayBank
from ..fields.background import BackgroundMap
from ..render.marcher import Marcher
from ..render.rendering import render_rays
from .photometric import LoopState, PhotometricConfig, train_photometric


def surface_bounds(points: np.ndarray, aabb: Sequence[float],
                   percentiles: Sequence[float] = (2.0, 98.0),
                   margin: float = 0.1) -> List[float]:
    """The box ``[6]`` of surface points ``[N, 3]``: per axis the ``percentiles`` (robust
    to stray points), widened by ``margin`` of its size on each side, clipped to ``aabb``.
    (colmap2nerf.py makes the same box from COLMAP's sparse points.)

    Example::

        pts = np.random.default_rng(0).uniform([0, 1, 2], [1, 2, 3], (10000, 3))
        surface_bounds(pts, [-9, -9, -9, 9, 9, 9], (0, 100), 0.0)   # about [0, 1, 2, 1, 2, 3]
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) < 8:
        raise ValueError(f"{len(points)} surface points: too few to bound (is the scene inside "
                         f"the start box?)")
    lo = np.percentile(points, percentiles[0], axis=0)
    hi = np.percentile(points, percentiles[1], axis=0)
    pad = margin * (hi - lo)
    lo = np.maximum(lo - pad, np.asarray(aabb[:3], float))
    hi = np.minimum(hi + pad, np.asarray(aabb[3:], float))
    return [float(v) for v in (*lo, *hi)]


def find_tight_box(bank: RayBank, opts, seconds: float, device, seed: int = 0,
                   progress: bool = True, max_steps: int = 0) -> List[float]:
    """Train a coarse dense-grid field (``opts``' teacher settings, 64^3 density) on
    ``bank``'s rays within ``opts.aabb`` for ``seconds`` (or ``max_steps`` > 0 steps) with
    Adam, then return :func:`surface_bounds` of the points where 32k of the training rays end (their
    expected depth, on rays the coarse field makes opaque)."""
    from .pipeline import new_teacher, teacher_lr     # the pipeline imports this module

    coarse = replace(opts, teacher="dense", teacher_res=64, teacher_color_res=32)
    rs = coarse.settings(device)
    teacher = new_teacher(coarse, device)
    opt = teacher.optimizer(lr_grid=teacher_lr(coarse, teacher))
    if coarse.background_model == "learned":     # unmasked: the far field is not the object
        background = BackgroundMap(coarse.background_res, device=device)
        rs = replace(rs, background=background)
        opt.add_param_group({"params": list(background.parameters()),
                             "lr": coarse.background_lr})
    marcher = Marcher(coarse.aabb, 64, threshold=coarse.occ_threshold, device=device)
    cfg = PhotometricConfig(optimizer="adam", batch_rays=coarse.batch_rays, seconds=seconds,
                            max_steps=max_steps, desc="finding the box")
    train_photometric(teacher, marcher, bank, rs, cfg, LoopState(), opt,
                      torch.Generator().manual_seed(seed), progress=progress)
    # where training rays end: their expected depth, on rays the coarse field makes opaque
    # (rays that pass into a learned background or a constant one are left out)
    gen = torch.Generator().manual_seed(seed + 1)
    points = []
    with torch.no_grad():
        for _ in range(4):
            o, d, _ = bank.sample(8192, gen)
            out = render_rays(teacher, marcher, o, d, rs, chunk=8192)
            keep = out["opacity"] > 0.5
            points.append((o[keep] + out["depth"][keep, None] * d[keep]).cpu().numpy())
    return surface_bounds(np.concatenate(points), coarse.aabb)
