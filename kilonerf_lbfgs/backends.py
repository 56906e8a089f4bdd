"""The single place that decides devices and optional accelerated libraries.

- device: ``auto`` picks CUDA when ``torch.cuda.is_available()``, else the CPU.
- nerfacc (CUDA ray marching / packed rendering) is used only on a CUDA device; on a machine
  with the CUDA toolkit but no GPU its first CUDA call raises ``OSError: CUDA_HOME...``, so it is
  never touched on the CPU path.
- tinycudann is optional (not on PyPI); a failed import of any kind means "not available".
- torch.compile (inductor: C++ on the CPU, Triton on CUDA) builds the fused kernels of
  :class:`CompiledKernel`; where it is unavailable or fails, or with ``KILONERF_COMPILE=0``
  in the environment, the same function runs eagerly (slower, same result within rounding).
- native C kernels (:func:`native_library`): compiled at first use with the system's C compiler
  (``cc``, or ``$CC``) for this CPU, and cached; used on the CPU only. Without a compiler, on a
  failed build, or with ``KILONERF_NATIVE=0`` in the environment, the callers keep their
  PyTorch path (the reference twin the tests compare the kernels with).
- the C allocator (glibc on Linux): the command-line entry points call
  :func:`tune_cpu_allocator` so that freed tensor memory is reused instead of returned to
  the system and faulted in again (``KILONERF_MALLOC=0`` leaves the allocator alone).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto" | "cpu" | "cuda"`` -> a ``torch.device``; ``ValueError`` for another name or
    for ``cuda`` without a visible GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is visible; use cpu or auto")
    return torch.device(name)


def synchronize(device) -> None:
    """Wait for queued GPU work before reading a clock (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# the CPU evaluates the cell networks a chunk of cells at a time, each chunk's hidden
# activations about this large: a chunk's layers then run on data still in the cache. Measured
# on a 2-core CPU with a 32 MB L3 (256 image cells x 1024 points, sine 3x32, forward+backward):
# 0.29 s in one call, 0.108 / 0.090 / 0.085 / 0.085 s in chunks of 64 / 32 / 16 / 8 cells
# (8 / 4 / 2 / 1 MB per activation tensor); scripts/benchmark_engine.py measures it.
CPU_CHUNK_BYTES = 2 << 20


def dense_chunk_bytes(device) -> int:
    """Bytes of one hidden activation tensor per chunk of cells in
    :meth:`~kilonerf_lbfgs.multinet.MultiMLP.forward_dense` on ``device``: the cache-sized
    :data:`CPU_CHUNK_BYTES` on the CPU, 0 (no chunks: one batched call keeps a GPU busy)
    on CUDA."""
    return 0 if torch.device(device).type == "cuda" else CPU_CHUNK_BYTES


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


def nerf_backend(name: str = "auto", device=None) -> str:
    """Ray-marching / volume-rendering backend for rays on ``device``: ``"torch"`` or ``"nerfacc"``.

    ``auto`` picks nerfacc only for a CUDA device with nerfacc importable (see
    :func:`nerfacc_available`), else the pure-PyTorch path; ``nerfacc`` asked for where it cannot
    run is a ``ValueError``.
    """
    dev = torch.device(device) if device is not None else resolve_device("auto")
    if name == "torch":
        return "torch"
    if name == "auto":
        return "nerfacc" if dev.type == "cuda" and nerfacc_available() else "torch"
    if name == "nerfacc":
        if dev.type != "cuda" or not nerfacc_available():
            raise ValueError(f"backend nerfacc: needs a CUDA device and an importable nerfacc "
                            f"(device {dev}, CUDA available: {torch.cuda.is_available()}); "
                            f"use backend torch or auto")
        return "nerfacc"
    raise ValueError(f"backend {name}: choose auto, torch or nerfacc")


# glibc's mallopt parameters (malloc.h) and the values tune_cpu_allocator sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20),    # the largest glibc accepts on 64-bit
                      (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))


def tune_cpu_allocator() -> bool:
    """Let glibc's malloc keep the memory of freed tensors for reuse; return whether it did.

    PyTorch has no caching allocator on the CPU: every temporary is a ``malloc`` and a
    ``free``. glibc serves blocks above its mmap threshold with fresh ``mmap`` calls, whose
    pages fault in on first touch, and returns the top of its heap to the system above its
    trim threshold; both start low (128 KB) and only adapt upwards as blocks are freed, and
    every one of the engine's ``[n_cells, p]`` temporaries and activation chunks (0.5-40 MB)
    pays the page faults again until the thresholds have adapted. With blocks up to 32 MB
    from the heap and 1 GB of free heap kept, a fresh process fitting the image fidelity
    preset to 70 dB spends 14% less optimiser time (``docs/results.md#allocator``). The
    price: a process keeps up to 1 GB of freed memory instead of returning it.

    Process-wide, so the library never calls it on import; the scripts do (through
    :func:`~kilonerf_lbfgs.config.run_main`). ``KILONERF_MALLOC=0`` in the environment, a
    C library without ``mallopt`` (not glibc), or a refused setting: returns False and
    changes nothing further.
    """
    if os.environ.get("KILONERF_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS)


def compile_enabled() -> bool:
    """Whether :class:`CompiledKernel` may call ``torch.compile``: not when the environment
    sets ``KILONERF_COMPILE=0`` (e.g. to compare with the eager twins, or where no C++
    compiler is installed)."""
    return os.environ.get("KILONERF_COMPILE", "1") != "0"


class CompiledKernel:
    """``fn`` compiled with ``torch.compile`` (static shapes) on first use, and ``fn`` itself,
    eagerly, where compilation is off or fails (one warning, then eager for good). ``fn``
    must be a pure tensor function; its eager run is the reference twin the tests compare
    the compiled one with.

    Each argument signature (shapes, strides, dtypes, devices) gets its own compilation of
    its own copy of ``fn``: ``torch.compile`` keeps at most ``recompile_limit`` (8) kernels
    per function and runs it eagerly beyond that, which a process fitting several problems
    (or a test suite) would reach. At most :attr:`max_kernels` signatures are compiled;
    later ones run eagerly."""

    max_kernels = 64

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: dict = {}
        self._failed = False
        functools.update_wrapper(self, fn)

    def _signature(self, args) -> tuple:
        return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if torch.is_tensor(a)
                     else a for a in args)

    def __call__(self, *args):
        if self._failed or not compile_enabled():
            return self.fn(*args)
        key = self._signature(args)
        kernel = self._compiled.get(key)
        if kernel is None:
            if len(self._compiled) >= self.max_kernels:
                return self.fn(*args)
            fn = self.fn
            copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                      fn.__defaults__, fn.__closure__)
            kernel = self._compiled[key] = torch.compile(copy, dynamic=False)
        try:
            return kernel(*args)
        except Exception as err:  # noqa: BLE001 - no compiler, unsupported op, backend error
            self._failed = True
            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}); running "
                          f"it eagerly (set KILONERF_COMPILE=0 to skip compiling)",
                          RuntimeWarning)
            return self.fn(*args)


# flags of the native kernels: -march=native (the CPU's vector units), reassociation of
# floating-point sums (vectorised dot products) without the rest of -ffast-math, and OpenMP
# (libgomp: the loader reuses the copy PyTorch's Linux builds have already loaded)
NATIVE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math",
                "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC",
                "-std=c11")


def native_enabled() -> bool:
    """Whether :func:`native_library` may build and load C kernels: not with
    ``KILONERF_NATIVE=0`` in the environment."""
    return os.environ.get("KILONERF_NATIVE", "1") != "0"


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags (Linux), else the
    machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            head = f.read().split("\n\n")[0]
        return "\n".join(line for line in head.splitlines()
                         if line.startswith(("model name", "flags")))
    except OSError:
        return platform.machine()


@functools.lru_cache(maxsize=None)
def native_library(source: str) -> Optional[ctypes.CDLL]:
    """The shared library built from the C file ``source`` with :data:`NATIVE_FLAGS`, or None
    where native kernels are off, no C compiler is found, or the build fails (one warning).

    Built once per source, compiler, flags and CPU, into ``$KILONERF_CACHE`` (default
    ``~/.cache/kilonerf_lbfgs``), atomically: concurrent processes may build at once.
    """
    if not native_enabled():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = Path(source)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        key = hashlib.sha256("\0".join([src.read_text(), cc, version, " ".join(NATIVE_FLAGS),
                                         _cpu_identity()]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("KILONERF_CACHE",
                                    Path.home() / ".cache" / "kilonerf_lbfgs"))
        target = cache / f"{src.stem}-{key}.so"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            try:
                done = subprocess.run([cc, *NATIVE_FLAGS, str(src), "-o", tmp],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip().splitlines()[-1:] or done.returncode)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target))
    except Exception as e:  # noqa: BLE001 - a missing or broken toolchain: keep the torch path
        warnings.warn(f"native kernels unavailable ({src.name}: {e}); using the PyTorch path "
                      f"(set KILONERF_NATIVE=0 to silence this)", RuntimeWarning)
        return None
