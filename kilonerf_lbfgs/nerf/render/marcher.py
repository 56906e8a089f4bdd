"""Ray marching with empty-space skipping and early termination; the one place that picks the
NeRF backend (pure PyTorch on any device, nerfacc on CUDA) through
:func:`kilonerf_lbfgs.backends.nerf_backend`.

Sampling rule (both backends): a ray ``o + t d`` (``d`` unit) is cut into steps
``[near + k h, near + (k + 1) h]`` (``h = step_size``, integer ``k``), so steps sit at fixed
offsets from ``near`` and two calls over overlapping ranges agree. A step is kept when its
midpoint lies in ``[t0, t1)`` with ``t0 = max(near, t_enter)``, ``t1 = min(far, t_exit)``
(the ray's entry and exit of the occupancy box) and in an occupied voxel. This is the rule
nerfacc's ``traverse_grids`` follows; it accumulates ``t`` in float32 where we compute
``near + k h``, so a step whose midpoint is within rounding of a voxel face can fall on the
other side (about 1 sample in 10^4 in a float32 emulation of its traversal). With
``sigma_fn`` the samples are then filtered as nerfacc's visibility functions do: drop those
whose transmittance before the sample is below ``early_stop_eps`` and, when
``alpha_thre > 0``, those with opacity below it. (This filter is ours on both backends:
``OccGridEstimator.sampling`` would silently lower ``alpha_thre`` to the mean of its EMA
densities.)

The torch marcher tests every step of a chunk of rays against the bits, holding at most
``Marcher.max_candidates`` (default 2^21) steps at once. The nerfacc backend keeps
:class:`OccupancyGrid` as the source of truth and copies its bits into an
``OccGridEstimator`` (created lazily, never part of the state dict) before each march.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...backends import nerf_backend
from .occupancy import OccupancyGrid
from .volrend import composite, render_weights

SigmaFn = Callable[[Tensor, Tensor, Tensor], Tensor]
RgbSigmaFn = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]

#: at most this many candidate steps are held at once by the torch marcher
MAX_CANDIDATES = 2 ** 21


@dataclass
class RaySamples:
    """Packed samples: ``ray_indices [S]`` long (non-decreasing, samples of a ray ordered front
    to back), ``t_starts [S]``, ``t_ends [S]``, and the number of rays they index."""
    ray_indices: Tensor
    t_starts: Tensor
    t_ends: Tensor
    n_rays: int

    def __len__(self) -> int:
        return int(self.ray_indices.shape[0])

    @property
    def n_samples(self) -> int:
        return len(self)

    def t_mids(self) -> Tensor:
        return 0.5 * (self.t_starts + self.t_ends)

    def positions(self, rays_o: Tensor, rays_d: Tensor) -> Tensor:
        """``[S, 3]`` midpoints ``o + t_mid d`` of the samples."""
        ri = self.ray_indices
        return rays_o[ri] + self.t_mids()[:, None].to(rays_o.dtype) * rays_d[ri]

    def select(self, mask: Tensor) -> "RaySamples":
        return RaySamples(self.ray_indices[mask], self.t_starts[mask], self.t_ends[mask],
                          self.n_rays)


# ---------------------------------------------------------------------------- pure helpers
def ray_aabb_intersect(rays_o: Tensor, rays_d: Tensor, aabb: Tensor) -> Tuple[Tensor, Tensor]:
    """Slab test. ``rays_o, rays_d [R, 3]``, ``aabb [6]`` -> ``(t_enter [R], t_exit [R])``;
    a ray misses the box when ``t_exit < t_enter`` (values may be negative or infinite)."""
    aabb = aabb.to(rays_o)
    tiny = 1e-12
    d = torch.where(rays_d.abs() < tiny, torch.full_like(rays_d, tiny), rays_d)
    ta = (aabb[:3] - rays_o) / d
    tb = (aabb[3:] - rays_o) / d
    t_enter = torch.minimum(ta, tb).amax(-1)
    t_exit = torch.maximum(ta, tb).amin(-1)
    return t_enter, t_exit


def _step_range(t0: Tensor, t1: Tensor, near: float, step: float) -> Tuple[Tensor, Tensor]:
    """Steps ``k`` whose midpoint ``near + (k + 1/2) step`` lies in ``[t0, t1)``:
    ``(k_first [R] long, count [R] long)``."""
    t0, t1 = t0.double(), t1.double()
    k_lo = torch.ceil((t0 - near) / step - 0.5)
    k_hi = torch.ceil((t1 - near) / step - 0.5)
    ok = torch.isfinite(k_lo) & torch.isfinite(k_hi) & (k_hi > k_lo)
    k_lo = torch.where(ok, k_lo, torch.zeros_like(k_lo))
    count = torch.where(ok, k_hi - k_lo, torch.zeros_like(k_hi))
    return k_lo.long(), count.long()


def _march(rays_o: Tensor, rays_d: Tensor, near: float, far: float, step: float,
           aabb: Optional[Tensor], grid: Optional[OccupancyGrid],
           max_candidates: int = MAX_CANDIDATES) -> RaySamples:
    """Uniform marching in ``[near, far)`` (clipped to ``aabb`` when given), keeping steps whose
    midpoint is in an occupied voxel of ``grid`` (all steps when ``grid`` is None)."""
    if step <= 0:
        raise ValueError(f"step_size must be positive, got {step}")
    n_rays, dev, dt = rays_o.shape[0], rays_o.device, rays_o.dtype
    t0 = torch.full((n_rays,), float(near), device=dev, dtype=torch.float64)
    t1 = torch.full((n_rays,), float(far), device=dev, dtype=torch.float64)
    if aabb is not None:
        t_in, t_out = ray_aabb_intersect(rays_o, rays_d, aabb)
        t0, t1 = torch.maximum(t0, t_in.double()), torch.minimum(t1, t_out.double())
    k_lo, count = _step_range(t0, t1, float(near), float(step))
    if grid is not None:
        bits = grid.binary.reshape(-1)
        res = grid.resolution
        lo = grid.aabb[:3].to(torch.float64)
        scale = torch.tensor(res, device=dev, dtype=torch.float64) / \
            (grid.aabb[3:] - grid.aabb[:3]).to(torch.float64)
        # voxel coordinate along axis a of step k's midpoint: u_a = base_a + slope_a * (k - k_lo)
        mid0 = near + (k_lo.double() + 0.5) * step                       # [R]
        base = ((rays_o.double() + mid0[:, None] * rays_d.double() - lo) * scale).to(dt)
        slope = (rays_d.double() * (step * scale)).to(dt)                 # [R, 3]
    out_r, out_k = [], []
    max_count = int(count.max()) if n_rays else 0
    if max_count > 0:
        rows_per_chunk = max(1, max_candidates // max_count)
        for s in range(0, n_rays, rows_per_chunk):
            e = min(n_rays, s + rows_per_chunk)
            cnt = count[s:e]
            k_max = int(cnt.max())
            if k_max == 0:
                continue
            j = torch.arange(k_max, device=dev)
            keep = j[None, :] < cnt[:, None]                               # [Rc, K]
            if grid is not None:
                jf = j.to(dt)[None, :]
                flat = None
                for a in range(3):
                    u = torch.addcmul(base[s:e, a, None], slope[s:e, a, None], jf)
                    # clamp then truncate == floor, clamped into the grid
                    ia = u.clamp_(0, res[a] - 1).to(torch.int32)
                    flat = ia if flat is None else flat.mul_(res[a]).add_(ia)
                keep &= bits[flat]
            rows, cols = keep.nonzero(as_tuple=True)
            out_r.append(rows + s)
            out_k.append(k_lo[s:e][rows] + cols)
    if out_r:
        ray_indices = torch.cat(out_r)
        k = torch.cat(out_k).double()
    else:
        ray_indices = torch.zeros(0, dtype=torch.long, device=dev)
        k = torch.zeros(0, dtype=torch.float64, device=dev)
    t_starts = (near + k * step).to(dt)
    t_ends = (near + (k + 1.0) * step).to(dt)
    return RaySamples(ray_indices, t_starts, t_ends, n_rays)


def march_dense_reference(rays_o: Tensor, rays_d: Tensor, near: float, far: float,
                          step_size: float, aabb: Optional[Sequence[float]] = None) -> RaySamples:
    """Every step whose midpoint lies in ``[near, far)`` (and, when ``aabb`` is given, inside the
    ray's span through the box), no skipping: the reference the marcher is tested against."""
    box = None if aabb is None else torch.as_tensor(aabb, dtype=rays_o.dtype, device=rays_o.device)
    return _march(rays_o, rays_d, near, far, step_size, box, None)


def visible_samples(samples: RaySamples, sigma_fn: SigmaFn, early_stop_eps: float,
                    alpha_thre: float) -> RaySamples:
    """Drop samples behind an almost opaque prefix (transmittance before the sample
    ``< early_stop_eps``) and, when ``alpha_thre > 0``, samples with opacity ``< alpha_thre``.
    ``sigma_fn(t_starts, t_ends, ray_indices) -> sigma [S]`` runs under ``no_grad``."""
    if len(samples) == 0 or (early_stop_eps <= 0 and alpha_thre <= 0):
        return samples
    with torch.no_grad():
        sig = sigma_fn(samples.t_starts, samples.t_ends, samples.ray_indices).reshape(-1)
        if sig.shape[0] != len(samples):
            raise ValueError(f"sigma_fn returned {sig.shape[0]} values for {len(samples)} samples")
        _, trans, alphas = render_weights(sig.to(samples.t_starts.dtype), samples.t_starts,
                                          samples.t_ends, samples.ray_indices, samples.n_rays)
        keep = trans >= early_stop_eps
        if alpha_thre > 0:
            keep &= alphas >= alpha_thre
    return samples.select(keep)


# ---------------------------------------------------------------------------- the module
class Marcher(nn.Module):
    """Occupancy-grid ray marcher and volume renderer with one interface for both backends.

    Args:
        aabb, resolution, ema_decay, threshold: the :class:`OccupancyGrid` (``self.grid``).
        backend: ``"auto"`` (nerfacc on a CUDA device when it imports, else torch),
            ``"torch"`` or ``"nerfacc"``; resolved per call from the rays' device.
        device: where to put the grid (``None``: leave it on the CPU; ``.to()`` works too).
    """

    def __init__(self, aabb: Sequence[float], resolution=64, ema_decay: float = 0.95,
                 threshold: float = 0.01, backend: str = "auto", device=None):
        super().__init__()
        if backend not in ("auto", "torch", "nerfacc"):
            nerf_backend(backend)  # raises the one clear error
        self.grid = OccupancyGrid(aabb, resolution, ema_decay, threshold)
        self.backend_name = backend
        self._estimators: Dict[str, object] = {}
        if device is not None:
            self.to(device)
            nerf_backend(backend, torch.device(device))  # fail early on an impossible request
        self.max_candidates = MAX_CANDIDATES

    def backend(self, device=None) -> str:
        """The backend used for rays on ``device`` (default: the grid's device)."""
        return nerf_backend(self.backend_name, device if device is not None else
                            self.grid.binary.device)

    # -------------------------------------------------------------- occupancy
    def update(self, density_fn: Callable[[Tensor], Tensor], step_size: float, **kwargs) -> None:
        """Refresh the occupancy grid (see :meth:`OccupancyGrid.update`)."""
        self.grid.update(density_fn, step_size, **kwargs)

    def _estimator(self, device):
        """nerfacc's OccGridEstimator on ``device`` holding a copy of the grid's bits."""
        key = str(device)
        est = self._estimators.get(key)
        if est is None:
            from nerfacc import OccGridEstimator  # lazy: CUDA only
            est = OccGridEstimator(roi_aabb=self.grid.aabb.detach().float().cpu(),
                                   resolution=list(self.grid.resolution), levels=1).to(device)
            self._estimators[key] = est
        est.binaries.copy_(self.grid.binary.to(device).reshape(est.binaries.shape))
        est.occs.copy_(self.grid.density.to(device).reshape(-1).clamp(max=1e6))
        return est

    # -------------------------------------------------------------- sampling
    def sample(self, rays_o: Tensor, rays_d: Tensor, near: float, far: float, step_size: float,
               sigma_fn: Optional[SigmaFn] = None, early_stop_eps: float = 1e-4,
               alpha_thre: float = 0.0) -> RaySamples:
        """March ``rays_o, rays_d [R, 3]`` (``d`` unit) through the occupied voxels.

        ``sigma_fn(t_starts [S], t_ends [S], ray_indices [S]) -> sigma [S]`` (optional, under
        ``no_grad``; ``ray_indices`` index these rays) enables early termination and the alpha
        threshold. Not differentiable. Returns packed :class:`RaySamples` over ``R`` rays.
        """
        backend = self.backend(rays_o.device)
        if backend == "nerfacc":
            est = self._estimator(rays_o.device)
            with torch.no_grad():
                ri, ts, te = est.sampling(rays_o.float().contiguous(), rays_d.float().contiguous(),
                                          sigma_fn=None, near_plane=float(near),
                                          far_plane=float(far), render_step_size=float(step_size),
                                          early_stop_eps=0.0, alpha_thre=0.0, stratified=False)
            samples = RaySamples(ri.long(), ts.to(rays_o.dtype), te.to(rays_o.dtype),
                                 rays_o.shape[0])
            if sigma_fn is not None:
                samples = visible_samples(samples, sigma_fn, early_stop_eps, alpha_thre)
            return samples
        with torch.no_grad():
            samples = _march(rays_o.detach(), rays_d.detach(), near, far, step_size,
                             self.grid.aabb, self.grid, self.max_candidates)
        if sigma_fn is not None:
            samples = visible_samples(samples, sigma_fn, early_stop_eps, alpha_thre)
        return samples

    # -------------------------------------------------------------- rendering
    def render(self, rays_o: Tensor, rays_d: Tensor, rgb_sigma_fn: RgbSigmaFn, near: float,
               far: float, step_size: float, background, early_stop_eps: float = 1e-4,
               alpha_thre: float = 0.0, chunk: int = 8192,
               sigma_fn: Optional[SigmaFn] = None) -> Dict[str, object]:
        """Render ``R`` rays in chunks of ``chunk`` rays.

        Args:
            rgb_sigma_fn: ``(t_starts [S], t_ends [S], ray_indices [S]) -> (rgb [S, 3],
                sigma [S])``, differentiable; ``ray_indices`` index the *full* ``rays_o``
                passed here (the chunk offset is added), as do those given to ``sigma_fn``.
            sigma_fn: optional density-only function for early termination / alpha threshold
                while sampling (without it only the occupancy grid skips samples).
            background: ``[3]`` or ``[R, 3]``.

        Returns:
            dict ``rgb [R, 3]``, ``opacity [R]``, ``depth [R]`` (normalised by opacity, as in
            :func:`composite`), ``n_samples`` (int, all chunks).
        """
        n_rays = rays_o.shape[0]
        dev, dt = rays_o.device, rays_o.dtype
        if n_rays == 0:
            empty = torch.zeros(0, device=dev, dtype=dt)
            return {"rgb": empty.reshape(0, 3), "opacity": empty, "depth": empty, "n_samples": 0}
        bg = torch.as_tensor(background, device=dev, dtype=dt)
        per_ray_bg = bg.dim() == 2
        backend = self.backend(dev)
        rgbs, opas, depths, n_total = [], [], [], 0
        chunk = max(1, int(chunk))
        for s in range(0, n_rays, chunk):
            e = min(n_rays, s + chunk)
            o, d = rays_o[s:e], rays_d[s:e]
            n = e - s
            bg_c = bg[s:e] if per_ray_bg else bg
            sfn = None
            if sigma_fn is not None:
                sfn = (lambda ts, te, ri, _s=s: sigma_fn(ts, te, ri + _s))
            smp = self.sample(o, d, near, far, step_size, sigma_fn=sfn,
                              early_stop_eps=early_stop_eps, alpha_thre=alpha_thre)
            n_total += len(smp)
            if len(smp) == 0:
                rgbs.append(bg_c.expand(n, 3).clone())
                opas.append(torch.zeros(n, device=dev, dtype=dt))
                depths.append(torch.zeros(n, device=dev, dtype=dt))
                continue
            rgb_s, sig_s = rgb_sigma_fn(smp.t_starts, smp.t_ends, smp.ray_indices + s)
            sig_s = sig_s.reshape(-1)
            if backend == "nerfacc":
                import nerfacc  # lazy: CUDA only
                color, opacity, depth, _ = nerfacc.rendering(
                    smp.t_starts, smp.t_ends, smp.ray_indices, n_rays=n,
                    rgb_sigma_fn=lambda *_a: (rgb_s, sig_s), render_bkgd=bg_c)
                rgbs.append(color)
                opas.append(opacity[:, 0])
                depths.append(depth[:, 0])
            else:
                out = composite(rgb_s, sig_s, smp.t_starts, smp.t_ends, smp.ray_indices, n, bg_c)
                rgbs.append(out["rgb"])
                opas.append(out["opacity"])
                depths.append(out["depth"])
        return {"rgb": torch.cat(rgbs), "opacity": torch.cat(opas), "depth": torch.cat(depths),
                "n_samples": n_total}
