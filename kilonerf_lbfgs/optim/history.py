"""Where each cell's curvature pairs are stored, and the two passes over them.

The pairs live in a ring buffer ``sy [n, m, 2, p]`` (``sy[:, i, 0] = s_i``,
``sy[:, i, 1] = y_i``). Every evaluation reads the whole buffer twice: the projection
``[S;Y]^T g`` of the new gradient and the combination ``coef . [S;Y]`` that makes the next
direction. Both passes are memory-bound: at 64 cells x 2241 parameters x 100 pairs the fp32
buffer is 115 MB, read twice per evaluation.

* **Full precision** (the buffer in the parameters' dtype, the default): both passes are
  batched matrix-vector products (:func:`~.compact.project_history`,
  :func:`~.compact.combine_history`).
* **Reduced precision** (``history_dtype`` bfloat16 or float16): ``sy`` in that dtype serves
  the projection, and a blocked copy ``syb [n, P, 2m, B]`` (``P = ceil(p / B)``, zero padded,
  ``B =`` :data:`BLOCK`) serves the combination. Each pass is one fused kernel
  (``torch.compile``, see :class:`~kilonerf_lbfgs.backends.CompiledKernel`) that widens the
  stored values to the parameters' dtype and accumulates there; the outputs are never
  rounded to the storage dtype (the Gram updates subtract projections, which a rounded
  output would ruin). The two half-size buffers take the memory of one fp32 buffer, and each
  pass reads half the bytes. The blocked layout is there because the combination sums over
  the pairs: in the plain layout that sum runs across rows ``p`` apart, in the blocked one
  over ``B``-vectors that sit together.

Only the stored pairs are rounded; the iterate, the gradients, the Gram matrices (float64)
and every product are kept in full precision.

On the CPU with float32 parameters, :mod:`.native` does an evaluation's history work cell by
cell in C instead (one read of the buffer, plain layout only: no blocked copy is kept); the
functions here remain its reference twin and the path everywhere else.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends import CompiledKernel
from . import native
from .compact import cell_dot, combine_history, project_history

# parameters per block of the combination's layout: 32 fp32 values, two AVX-512 vectors
BLOCK = 32

# history_dtype="auto" stores the pairs in bfloat16 from this many bytes of fp32 history on:
# where the buffer outgrows a CPU's last-level cache both passes stream from memory, and half
# the bytes is close to half the time. On the image fidelity shape (64 cells x 2241
# parameters, 2 cores, 32 MB L3) the optimiser's own work per evaluation was the same at
# history 20 (23 MB), 0.5 ms less at 50 (57 MB) and 3 ms less at 100 (115 MB) with bfloat16
# (scripts/benchmark_engine.py measures it). Below it, the exact fp32 path and no compilation.
AUTO_REDUCED_BYTES = 32 << 20


def resolve_dtype(name: Optional[str], param_dtype: torch.dtype, n: int, m: int,
                  p: int) -> torch.dtype:
    """The storage dtype a ``history_dtype`` setting means for an ``[n, m, 2, p]`` history of
    ``param_dtype`` parameters: None is ``param_dtype``; ``"auto"`` is bfloat16 for float32
    parameters whose history reaches :data:`AUTO_REDUCED_BYTES`, else ``param_dtype``.
    (``"auto"`` reaches that dtype once the history is full: see :func:`initial_dtype`.)"""
    if name is None:
        return param_dtype
    if name == "auto":
        big = n * m * 2 * p * 4 >= AUTO_REDUCED_BYTES
        return torch.bfloat16 if param_dtype == torch.float32 and big else param_dtype
    return getattr(torch, name)


def initial_dtype(name: Optional[str], param_dtype: torch.dtype, n: int, m: int,
                  p: int) -> torch.dtype:
    """The dtype the history starts in. ``"auto"`` starts in ``param_dtype`` and narrows to
    :func:`resolve_dtype`'s choice when the history is full (:func:`narrow`): while it fills,
    the exact path reads only the slots in use (``k / m`` of the buffer), where the
    fixed-shape reduced kernels would read all of it; a run shorter than ``m`` evaluations
    never narrows. Every other setting starts in its final dtype."""
    return param_dtype if name == "auto" else resolve_dtype(name, param_dtype, n, m, p)


def is_reduced(sy: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether the buffer ``sy`` is stored in a narrower dtype than ``like`` (the parameters)."""
    return sy.dtype != like.dtype


def to_blocked(sy: torch.Tensor) -> torch.Tensor:
    """``sy [n, m, 2, p] -> syb [n, P, 2m, B]``, ``syb[k, q, 2i + w, b] = sy[k, i, w, qB + b]``
    (zero where ``qB + b >= p``)."""
    n, m, _, p = sy.shape
    n_blocks = -(-p // BLOCK)
    flat = torch.nn.functional.pad(sy.reshape(n, 2 * m, p), (0, n_blocks * BLOCK - p))
    return flat.view(n, 2 * m, n_blocks, BLOCK).permute(0, 2, 1, 3).contiguous()


def needs_blocked(dtype: torch.dtype, param_dtype: torch.dtype, device) -> bool:
    """Whether a history stored in ``dtype`` for ``param_dtype`` parameters keeps the blocked
    copy ``syb``: where it is reduced and the torch path combines it (the native kernel of
    :mod:`.native` reads the plain layout only)."""
    return dtype != param_dtype and not native.serves(device, param_dtype, dtype)


def new_history(n: int, m: int, p: int, dtype: torch.dtype, param_dtype: torch.dtype,
                device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Zeroed buffers: ``sy [n, m, 2, p]`` in ``dtype`` and, where :func:`needs_blocked`,
    the blocked copy ``syb [n, P, 2m, B]`` (else None)."""
    sy = torch.zeros(n, m, 2, p, dtype=dtype, device=device)
    if not needs_blocked(dtype, param_dtype, device):
        return sy, None
    return sy, torch.zeros(n, -(-p // BLOCK), 2 * m, BLOCK, dtype=dtype, device=device)


def warm_kernels(n: int, m: int, p: int, dtype: torch.dtype, param_dtype: torch.dtype,
                 device) -> None:
    """Run (and so compile) the two reduced-precision passes once for an ``[n, m, 2, p]``
    history in ``dtype``, on scratch buffers that are freed again: a history that narrows
    later (``"auto"``) then pays the compilation up front, not in the middle of a run."""
    if dtype == param_dtype:
        return
    sy, syb = (torch.empty(n, m, 2, p, dtype=dtype, device=device),
               torch.empty(n, -(-p // BLOCK), 2 * m, BLOCK, dtype=dtype, device=device))
    v = torch.zeros(n, p, dtype=param_dtype, device=device)
    project(sy, v, m)
    if needs_blocked(dtype, param_dtype, device):
        combine(sy, syb, torch.zeros(n, 2 * m, dtype=torch.float64, device=device), m,
                param_dtype)


def _widened(sy: torch.Tensor, k: int, dtype: torch.dtype):
    """The first ``k`` slots of the history ``sy [n, m, 2, p]`` in ``dtype``, about 64 MB of
    widened pairs at a time: yields ``(cells, pairs)``, a slice of cells and their
    ``[c, k, 2, p]`` pairs."""
    n, _, _, p = sy.shape
    step = max(1, (64 << 20) // (k * 2 * p * torch.finfo(dtype).bits // 8))
    for lo in range(0, n, step):
        cells = slice(lo, lo + step)
        yield cells, sy[cells, :k].to(dtype)


def narrow(sy: torch.Tensor, dtype: torch.dtype, g: torch.Tensor):
    """A full history in the parameters' dtype, ``sy [n, m, 2, p]``, stored from now on in
    ``dtype``. Everything derived from the pairs is recomputed from the rounded pairs, so that
    it stays consistent with their later projections (the Gram updates subtract
    projections, see :func:`~kilonerf_lbfgs.optim.lbfgs.update_history`).

    Args:
        sy: ``[n, m, 2, p]`` the history, every slot in use.
        dtype: the narrower storage dtype.
        g: ``[n, p]`` the current gradient.
    Returns:
        sy ``[n, m, 2, p]`` in ``dtype``; syb, its blocked copy; sty, yty ``[n, m, m]``
        float64, ``s_i . y_j`` and ``y_i . y_j`` of the rounded pairs; proj ``[n, 2m]``
        float64, ``[S;Y]^T g``.
    """
    n, m, _, p = sy.shape
    narrow_sy = sy.to(dtype)
    sty = torch.empty(n, m, m, dtype=torch.float64, device=sy.device)
    yty = torch.empty_like(sty)
    for cells, pairs in _widened(narrow_sy, m, sy.dtype):
        s, y = pairs[:, :, 0], pairs[:, :, 1]                          # [c, m, p]
        sty[cells].copy_(torch.bmm(s, y.transpose(1, 2)))
        yty[cells].copy_(torch.bmm(y, y.transpose(1, 2)))
    syb = to_blocked(narrow_sy) if needs_blocked(dtype, g.dtype, g.device) else None
    return narrow_sy, syb, sty, yty, project(narrow_sy, g, m)


def write_pair(sy: torch.Tensor, syb: Optional[torch.Tensor], slot: torch.Tensor,
               s: torch.Tensor, y: torch.Tensor,
               keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Store ``s, y [n, p]`` in slot ``slot [n]`` (long) of the cells in ``keep [n]`` (bool);
    the other cells' slots keep their pairs. Returns the pair as stored (rounded to the
    buffer's dtype).

    Each write is one ``index_copy_`` of whole rows into a flat view of the buffer (a row per
    cell in ``sy``, ``P`` rows of ``B`` per cell in ``syb``): several times cheaper than
    advanced indexing with a per-cell slot."""
    n, m, _, p = sy.shape
    hs, hy = s.to(sy.dtype), y.to(sy.dtype)
    cells = torch.arange(n, device=sy.device)
    ws, wy = hs, hy
    if keep.device.type == "cpu":
        # on the CPU (no device sync to fear) write the kept cells' rows only
        if not bool(keep.all()):
            cells = keep.nonzero()[:, 0]
            slot, ws, wy = slot[cells], hs[cells], hy[cells]
        mask = None
    else:  # without a host sync: every cell, the others rewritten with what they hold
        mask = keep
    flat = sy.view(n * m * 2, p)
    base = (cells * m + slot) * 2                                          # row of s_slot
    if syb is not None:
        n_blocks = syb.shape[1]
        flat_b = syb.view(-1, BLOCK)
        # syb[k, q, 2 slot + w] is row (k P + q) 2m + 2 slot + w of the flat view
        base_b = ((cells[:, None] * n_blocks + torch.arange(n_blocks, device=sy.device))
                  * (2 * m) + 2 * slot[:, None]).reshape(-1)
    for w, v in ((0, ws), (1, wy)):
        if mask is not None:
            v = torch.where(mask[:, None], v, flat.index_select(0, base + w))
        flat.index_copy_(0, base + w, v)
        if syb is not None:
            block = torch.nn.functional.pad(v, (0, n_blocks * BLOCK - p)).view(-1, BLOCK)
            flat_b.index_copy_(0, base_b + w, block)
    return hs, hy


def _project_widened(flat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``flat [n, r, p]`` (stored dtype), ``v [n, p]`` -> ``flat v`` ``[n, r]`` in ``v``'s dtype."""
    return (flat.to(v.dtype) * v[:, None, :]).sum(-1)


def _combine_widened(blocked: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``blocked [n, P, r, B]`` (stored dtype), ``c [n, r]`` -> ``[n, P B]`` in ``c``'s dtype."""
    return (blocked.to(c.dtype) * c[:, None, :, None]).sum(2).flatten(1)


project_widened = CompiledKernel(_project_widened)
combine_widened = CompiledKernel(_combine_widened)


def project(sy: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
    """``[S^T v, Y^T v]`` ``[n, 2m]`` float64 in slot order, zero beyond slot ``k`` (the slots
    in use; the rest of the buffer is zero). ``v [n, p]`` in the parameters' dtype."""
    if not is_reduced(sy, v):
        return project_history(sy, v, k)
    n, m = sy.shape[:2]
    if k == 0:
        return v.new_zeros(n, 2 * m, dtype=torch.float64)
    # the whole buffer: one kernel shape for every k (the unused slots are zero)
    out = project_widened(sy.view(n, 2 * m, -1), v)                      # [n, 2m] interleaved
    return out.view(n, m, 2).transpose(1, 2).reshape(n, 2 * m).double()


def _combine_plain(sy: torch.Tensor, coef: torch.Tensor, k: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """:func:`combine` of a reduced history from its plain layout, widened a few cells at a
    time (the rare calls outside :mod:`.native`'s kernel: a restart on a new objective)."""
    n, m, _, p = sy.shape
    out = torch.zeros(n, p, dtype=dtype, device=sy.device)
    if k == 0:
        return out
    c = torch.stack([coef[:, :k], coef[:, m:m + k]], -1).reshape(n, 1, 2 * k).to(dtype)
    for cells, pairs in _widened(sy, k, dtype):
        out[cells] = torch.bmm(c[cells], pairs.reshape(-1, 2 * k, p))[:, 0]
    return out


def combine(sy: torch.Tensor, syb: Optional[torch.Tensor], coef: torch.Tensor, k: int,
            dtype: torch.dtype) -> torch.Tensor:
    """``coef[:, :m] S + coef[:, m:] Y`` ``[n, p]`` in ``dtype`` (the parameters'), over the
    first ``k`` slots; ``coef [n, 2m]`` float64 in slot order, zero on unused slots."""
    if syb is None and sy.dtype == dtype:
        return combine_history(sy, coef, k)
    n, m, _, p = sy.shape
    if syb is None:  # a reduced history without its blocked copy (the native kernel's)
        return _combine_plain(sy, coef, k, dtype)
    if k == 0:
        return sy.new_zeros(n, p, dtype=dtype)
    c = torch.stack([coef[:, :m], coef[:, m:]], -1).reshape(n, 2 * m).to(dtype)
    return combine_widened(syb, c)[:, :p]


def stored_dots(hs: torch.Tensor, hy: torch.Tensor, g: torch.Tensor):
    """``s.y``, ``y.y``, ``s.g``, ``y.g`` ``[n]`` float64 of a pair as stored (``hs, hy``) and
    ``g [n, p]``, in ``g``'s dtype: the Gram entries of the rounded pair, consistent with
    every later projection of it."""
    s, y = hs.to(g.dtype), hy.to(g.dtype)
    return cell_dot(s, y), cell_dot(y, y), cell_dot(s, g), cell_dot(y, g)
