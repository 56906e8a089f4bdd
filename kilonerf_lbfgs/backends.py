"""The single place that decides devices and optional accelerated libraries.

- device: ``auto`` picks CUDA when ``torch.cuda.is_available()``, else the CPU.
- nerfacc (CUDA ray marching / packed rendering) is used only on a CUDA device; on a machine
  with the CUDA toolkit but no GPU its first CUDA call raises ``OSError: CUDA_HOME...``, so it is
  never touched on the CPU path.
- tinycudann is optional (not on PyPI); a failed import of any kind means "not available".
"""
from __future__ import annotations

import functools

import torch

from .io import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto" | "cpu" | "cuda"`` -> a ``torch.device`` (one clear error if CUDA is missing)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def synchronize(device) -> None:
    """Wait for queued GPU work before reading a clock (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def nerfacc_available() -> bool:
    """nerfacc importable *and* a CUDA device present (its kernels are CUDA-only)."""
    if not torch.cuda.is_available():
        return False
    try:
        import nerfacc  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, OSError (CUDA_HOME), build errors
        return False
    return True


@functools.lru_cache(maxsize=None)
def tinycudann_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, OSError/EnvironmentError
        return False
    return True
