"""Rendering whole views in bounded memory, and the test-split evaluation."""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..backends import synchronize
from ..io import save_png
from ..metrics import psnr, ssim
from .data.loaders import NerfSplit
from .render.rendering import RenderSettings, render_rays
from .data.rays import camera_rays


@torch.no_grad()
def render_view(model: nn.Module, marcher, pose: torch.Tensor, intrinsics: torch.Tensor,
                H: int, W: int, rs: RenderSettings, chunk: int = 8192,
                distortion: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One camera ``pose [4, 4]``, ``intrinsics [4]`` (and lens ``distortion [4]``) ->
    image ``[H, W, 3]`` (rays in chunks)."""
    device = rs.device
    o, d = camera_rays(pose.to(device), intrinsics.to(device), H, W,
                       None if distortion is None else distortion.to(device))
    out = torch.empty(H * W, 3, device=device)
    for s in range(0, H * W, chunk):
        out[s:s + chunk] = render_rays(model, marcher, o[s:s + chunk], d[s:s + chunk], rs,
                                       chunk=chunk)["rgb"]
    return out.view(H, W, 3).clamp(0, 1)


@torch.no_grad()
def evaluate(model: nn.Module, marcher, split: NerfSplit, rs: RenderSettings,
             out_dir: Optional[str] = None, chunk: int = 8192, progress: bool = True) -> Dict:
    """Render every view of ``split``; per-view PSNR/SSIM, means, and rendering speed.

    Writes ``out_dir/test_{i:03d}.png`` (rendered | ground truth side by side) when given.
    ``render_fps`` is views per second of rendering at ``split.H x split.W`` (no metrics, no
    I/O in the timing).
    """
    device = rs.device
    views = range(len(split))
    if progress:
        from tqdm.auto import tqdm
        views = tqdm(views, desc="test views")
    per_psnr, per_ssim, seconds = [], [], 0.0
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    for i in views:
        synchronize(device)
        t0 = time.perf_counter()
        img = render_view(model, marcher, split.poses[i], split.intrinsics[i], split.H,
                          split.W, rs, chunk,
                          None if split.distortion is None else split.distortion[i])
        synchronize(device)
        seconds += time.perf_counter() - t0
        pred = img.cpu().numpy()
        gt = split.images[i].numpy()
        per_psnr.append(psnr(pred, gt))
        per_ssim.append(ssim(pred, gt))
        if out_dir:
            save_png(os.path.join(out_dir, f"test_{i:03d}.png"), np.concatenate([pred, gt], 1))
    return {"test_psnr": float(np.mean(per_psnr)), "test_ssim": float(np.mean(per_ssim)),
            "test_psnr_per_view": per_psnr, "test_ssim_per_view": per_ssim,
            "render_fps": len(split) / max(seconds, 1e-9),
            "render_resolution": [split.W, split.H], "n_test_views": len(split)}
