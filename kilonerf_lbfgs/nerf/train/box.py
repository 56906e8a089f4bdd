"""A tight scene box from a coarse occupancy pass (KiloNeRF's way to its boxes).

The cells are spread evenly over the scene box, so a box much larger than the object wastes
most of them on empty space (the standard NeRF-synthetic box [-1.5, 1.5]^3 holds lego's
object in a sixth of its volume). :func:`find_tight_box` trains a coarse dense-grid field on
the photos for a few seconds, updates an occupancy grid from it, and returns the bounds of
the occupied voxels: :func:`occupied_bounds`, which drops small floating components (the
coarse field's floaters) and adds a margin. For masked (object) scenes, on a constant
background.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence

import numpy as np
import torch

from ..data.rays import RayBank
from ..render.marcher import Marcher
from .photometric import LoopState, PhotometricConfig, train_photometric


def occupied_bounds(binary: np.ndarray, aabb: Sequence[float], margin_voxels: int = 1,
                    min_component: float = 0.01) -> List[float]:
    """The box ``[6]`` around the occupied voxels of ``binary [Rx, Ry, Rz]`` (a grid over
    ``aabb``), grown by ``margin_voxels`` and clipped to ``aabb``.

    Connected components (26-neighbourhood) holding less than ``min_component`` of the
    occupied voxels are left out: isolated floaters do not stretch the box.

    Example::

        g = np.zeros((8, 8, 8), bool); g[2:4, 3:6, 1:2] = True
        occupied_bounds(g, [0, 0, 0, 8, 8, 8], margin_voxels=0)   # [2, 3, 1, 4, 6, 2]
    """
    from scipy import ndimage

    binary = np.asarray(binary, dtype=bool)
    if not binary.any():
        raise ValueError("no occupied voxel: the coarse pass found nothing to bound (is the "
                         "scene inside the start box, and its background constant?)")
    labels, n = ndimage.label(binary, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.isin(labels, 1 + np.nonzero(sizes >= min_component * binary.sum())[0])
    idx = np.argwhere(keep)
    res = np.array(binary.shape)
    lo, hi = np.asarray(aabb[:3], float), np.asarray(aabb[3:], float)
    vox = (hi - lo) / res
    i0 = np.maximum(idx.min(0) - margin_voxels, 0)
    i1 = np.minimum(idx.max(0) + 1 + margin_voxels, res)
    return [float(v) for v in (*(lo + i0 * vox), *(lo + i1 * vox))]


def find_tight_box(bank: RayBank, opts, seconds: float, device, seed: int = 0,
                   progress: bool = True, max_steps: int = 0) -> List[float]:
    """Train a coarse dense-grid field (``opts``' teacher settings, 64^3 density) on
    ``bank``'s rays within ``opts.aabb`` for ``seconds`` (or ``max_steps`` > 0 steps) with
    Adam, then return :func:`occupied_bounds` of its 64^3 occupancy grid."""
    from .pipeline import new_teacher, teacher_lr     # the pipeline imports this module

    coarse = replace(opts, teacher="dense", teacher_res=64, teacher_color_res=32,
                     background_model="constant")
    rs = coarse.settings(device)
    teacher = new_teacher(coarse, device)
    marcher = Marcher(coarse.aabb, 64, threshold=coarse.occ_threshold, device=device)
    cfg = PhotometricConfig(optimizer="adam", batch_rays=coarse.batch_rays, seconds=seconds,
                            max_steps=max_steps, desc="finding the box")
    train_photometric(teacher, marcher, bank, rs, cfg, LoopState(),
                      teacher.optimizer(lr_grid=teacher_lr(coarse, teacher)),
                      torch.Generator().manual_seed(seed), progress=progress)
    for _ in range(4):                 # settle the grid's moving average on the final field
        marcher.update(teacher.density, rs.step_size)
    return occupied_bounds(marcher.grid.binary.cpu().numpy(), coarse.aabb)
