"""Quality metrics: PSNR, SSIM, SNR."""
from __future__ import annotations

import math

import numpy as np
import torch


def psnr_from_mse(mse, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error (``inf`` for 0, ``nan`` for a non-finite MSE)."""
    mse = float(mse)
    if not math.isfinite(mse):
        return float("nan")
    if mse <= 0:
        return float("inf")
    return 10.0 * math.log10(data_range * data_range / mse)


def psnr(pred, target, data_range: float = 1.0) -> float:
    """PSNR of two arrays/tensors of the same shape."""
    pred = torch.as_tensor(pred, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    return psnr_from_mse(torch.mean((pred - target) ** 2), data_range)


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM of two images ``[H, W]`` or ``[H, W, C]`` (scikit-image, Gaussian window as in
    the NeRF/KiloNeRF papers)."""
    from skimage.metrics import structural_similarity

    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    channel_axis = -1 if pred.ndim == 3 else None
    return float(structural_similarity(pred, target, data_range=data_range,
                                       channel_axis=channel_axis, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def snr_db(pred, target) -> float:
    """Signal-to-noise ratio ``10 log10(sum target^2 / sum (pred - target)^2)``."""
    pred = torch.as_tensor(pred, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    noise = float(torch.sum((pred - target) ** 2))
    return float("inf") if noise == 0 else 10.0 * math.log10(float(torch.sum(target ** 2)) / noise)
