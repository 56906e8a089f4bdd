"""The curvature history in reduced precision (kilonerf_lbfgs.optim.history): the compiled
passes against their eager twins and the full-precision reference, the blocked layout, the
pair writes, and BatchedLBFGS with ``history_dtype`` against fp32 and against one run per cell.
"""
import copy
import shutil
import warnings

import pytest
import torch

from kilonerf_lbfgs import backends
from kilonerf_lbfgs.optim import BatchedLBFGS
from kilonerf_lbfgs.optim import history as H
from kilonerf_lbfgs.optim.compact import combine_history, project_history

HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None

# one shape for every kernel test, so each kernel compiles once per session
N, M, P = 3, 4, 37


def _history(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(N, M, 2, P, generator=g)
    return full, full.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_blocked_puts_every_value_where_the_layout_says(dtype):
    _, sy = _history(dtype)
    syb = H.to_blocked(sy)
    n_blocks = -(-P // H.BLOCK)
    assert syb.shape == (N, n_blocks, 2 * M, H.BLOCK)
    for k, i, w, q in [(0, 0, 0, 0), (2, 3, 1, 5), (1, 2, 0, 36), (2, 1, 1, 32)]:
        assert syb[k, q // H.BLOCK, 2 * i + w, q % H.BLOCK] == sy[k, i, w, q]
    # the padding of the last block is zero
    flat = syb.permute(0, 2, 1, 3).reshape(N, 2 * M, n_blocks * H.BLOCK)
    assert torch.equal(flat[:, :, :P], sy.reshape(N, 2 * M, P))
    assert flat[:, :, P:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_passes_equal_the_fp32_reference_on_the_stored_values(dtype):
    """The projection and the combination read the rounded pairs and accumulate in fp32: they
    equal the fp32 reference run on the widened buffer, and are not rounded to ``dtype``."""
    _, sy = _history(dtype)
    syb = H.to_blocked(sy)
    wide = sy.float()
    g = torch.Generator().manual_seed(1)
    v = torch.randn(N, P, generator=g)
    coef = torch.randn(N, 2 * M, generator=g, dtype=torch.float64)
    proj = H.project(sy, v, M)
    ref = project_history(wide, v, M)
    assert proj.dtype == torch.float64 and proj.shape == (N, 2 * M)
    torch.testing.assert_close(proj, ref, rtol=1e-5, atol=1e-5)
    comb = H.combine(sy, syb, coef, M, torch.float32)
    ref_c = combine_history(wide, coef, M)
    assert comb.dtype == torch.float32 and comb.shape == (N, P)
    torch.testing.assert_close(comb, ref_c, rtol=1e-5, atol=1e-5)
    # an output rounded to the storage dtype would be ~1e-2 off; these carry fp32 precision
    assert (proj - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_kernels_equal_their_eager_twins_and_do_compile():
    _, sy = _history(torch.bfloat16)
    syb = H.to_blocked(sy)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(N, P, generator=g)
    c = torch.randn(N, 2 * M, generator=g)
    flat = sy.view(N, 2 * M, P)
    torch.testing.assert_close(H.project_widened(flat, v), H.project_widened.fn(flat, v),
                               rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(H.combine_widened(syb, c), H.combine_widened.fn(syb, c),
                               rtol=1e-6, atol=1e-5)
    # the compiled path ran (a silent fallback to the twin would make this test vacuous)
    assert H.project_widened._compiled and not H.project_widened._failed
    assert H.combine_widened._compiled and not H.combine_widened._failed


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_kernel_compiles_more_shapes_than_torch_compile_keeps_per_function():
    """torch.compile keeps 8 kernels per function (then runs it eagerly, with a warning);
    each signature here gets its own compiled copy, so the 12th shape still compiles."""
    k = backends.CompiledKernel(lambda x: (x * 2).sum(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no "recompile_limit" warning
        for n in range(1, 13):
            torch.testing.assert_close(k(torch.ones(n, 3)), torch.full((n,), 6.0))
    assert len(k._compiled) == 12 and not k._failed


def test_compiled_kernel_falls_back_to_eager_once_with_a_warning(monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    calls = []

    def double(x):
        calls.append(1)
        return 2 * x
    k = backends.CompiledKernel(double)
    with pytest.warns(RuntimeWarning, match="torch.compile of double failed.*eagerly"):
        assert torch.equal(k(torch.ones(2)), torch.full((2,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(k(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 2


def test_compile_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("KILONERF_COMPILE", "0")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    k = backends.CompiledKernel(lambda x: x + 1)
    assert torch.equal(k(torch.zeros(1)), torch.ones(1))


@pytest.mark.parametrize("host_sync", [True, False])
def test_write_pair_writes_kept_cells_only_in_both_layouts(host_sync):
    """The CPU path (kept rows only) and the sync-free path (every row, masked) store the
    same buffers: the kept cells' slots hold the rounded pair, the others are untouched."""
    _, sy = _history(torch.bfloat16)
    syb = H.to_blocked(sy)
    sy0, syb0 = sy.clone(), syb.clone()
    g = torch.Generator().manual_seed(3)
    s, y = torch.randn(N, P, generator=g), torch.randn(N, P, generator=g)
    slot = torch.tensor([1, 3, 0])
    keep = torch.tensor([True, False, True])
    if not host_sync:  # the path a CUDA device takes, forced on the CPU
        keep = _FakeDevice(keep)
    hs, hy = H.write_pair(sy, syb, slot, s, y, keep)
    assert torch.equal(hs, s.bfloat16()) and torch.equal(hy, y.bfloat16())
    expect = sy0.clone()
    for k in (0, 2):
        expect[k, slot[k], 0], expect[k, slot[k], 1] = hs[k], hy[k]
    assert torch.equal(sy, expect)
    assert torch.equal(syb, H.to_blocked(expect))
    assert not torch.equal(syb, syb0)


class _FakeDevice(torch.Tensor):
    """A bool mask that reports a non-CPU device: write_pair then takes its sync-free path."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_subclass(cls, data)

    @property
    def device(self):
        return torch.device("meta")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args = [a.as_subclass(torch.Tensor) if isinstance(a, _FakeDevice) else a for a in args]
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------- the optimiser

def _mlp_problem(n_cells, seed=0, dtype=torch.float32):
    """A small sine-MLP regression per cell: ``[n_cells]`` losses."""
    from kilonerf_lbfgs.multinet import MultiMLP
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n_cells, 64, 2, generator=g) * 2 - 1).to(dtype)
    t = torch.sin(3 * x[..., :1]) * torch.cos(2 * x[..., 1:])
    model = MultiMLP(n_cells, 2, 1, 16, 2, "sine", omega_0=10.0,
                     generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    return model, x, t


def _closure(model, opt, x, t):
    """The closure of the per-cell mean squared error of ``model`` on ``(x, t)``."""
    def closure():
        opt.zero_grad()
        loss = ((model.forward_dense(x) - t) ** 2).mean((1, 2))
        loss.sum().backward()
        return loss.detach()
    return closure


def _fit(model, x, t, n_steps, **kw):
    opt = BatchedLBFGS(model.parameters(), max_eval=5, **kw)
    losses = []

    closure = _closure(model, opt, x, t)
    for _ in range(n_steps):
        losses.append(opt.step(closure).clone())
    return opt, torch.stack(losses)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_history_follows_the_fp32_iterates_on_a_small_problem(dtype, lbfgs_path):
    """Stated tolerance: 3 sine MLPs (337 parameters each, 10 pairs), 12 steps of 5
    evaluations, over which the losses fall ~1000x. The per-cell losses stay within 1% of
    the fp32 run's for the first 2 steps and within a factor 1.25 at every step (rounding
    the pairs moves the iterates a little, and the runs drift apart slowly), and the fit
    falls 500x as the fp32 one does."""
    model, x, t = _mlp_problem(3)
    ref_model = copy.deepcopy(model)
    _, ref = _fit(ref_model, x, t, 12, history_size=10)
    opt, red = _fit(model, x, t, 12, history_size=10, history_dtype=dtype)
    st = opt.state[next(model.parameters())]
    assert st["sy"].dtype == getattr(torch, dtype)
    # the native kernel reads the plain layout; the torch path keeps a blocked copy for
    # its combination (float16 always takes the torch path)
    assert (st["syb"] is None) == (lbfgs_path == "native" and dtype == "bfloat16")
    ratio = red / ref
    assert ((ratio[:2] - 1).abs() < 0.01).all(), ratio
    assert ((ratio > 1 / 1.25) & (ratio < 1.25)).all(), ratio
    assert (red[-1] < 2e-3 * red[0]).all() and (ref[-1] < 2e-3 * ref[0]).all()


def test_reduced_history_batched_equals_one_run_per_cell():
    """In float64 (as the fp32-history twin test in test_lbfgs.py): in float32 the batched
    and single-cell forward passes round differently, and a pair rounded to bfloat16
    amplifies that; in float64 every cell stores the same rounded pairs either way."""
    model, x, t = _mlp_problem(3, seed=4, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, together = _fit(model, x, t, 8, history_size=6, history_dtype="bfloat16")
    for c in range(3):
        one = type(model)(1, 2, 1, 16, 2, "sine", omega_0=10.0, dtype=torch.float64)
        one.load_state_dict({k: v[c:c + 1] for k, v in state.items()})
        _, alone = _fit(one, x[c:c + 1], t[c:c + 1], 8, history_size=6,
                        history_dtype="bfloat16")
        torch.testing.assert_close(together[:, c], alone[:, 0], rtol=1e-9, atol=1e-14)


def test_reduced_history_state_dict_resumes_exactly_and_rebuilds_the_blocked_copy(
        lbfgs_path):
    model, x, t = _mlp_problem(2, seed=7)
    opt, _ = _fit(model, x, t, 3, history_size=6, history_dtype="bfloat16")
    sd = opt.state_dict()
    assert sd["param_groups"][0]["history_dtype"] == "bfloat16"
    twin = copy.deepcopy(model)
    resumed = BatchedLBFGS(twin.parameters(), max_eval=5, history_size=6,
                           history_dtype="bfloat16")
    resumed.load_state_dict(sd)
    # the blocked copy is derived data: not saved, rebuilt on load
    assert "syb" not in sd["state"][0]
    if lbfgs_path == "torch":
        assert torch.equal(resumed.state[resumed._params[0]]["syb"],
                           opt.state[opt._params[0]]["syb"])
    else:
        assert resumed.state[resumed._params[0]]["syb"] is None
    a = opt.step(_closure(model, opt, x, t))
    b = resumed.step(_closure(twin, resumed, x, t))
    assert torch.equal(a, b)


@pytest.mark.parametrize("value", ["int8", "bf16", 3, torch.int32])
def test_bad_history_dtype_raises_value_error_naming_it(value):
    with pytest.raises(ValueError, match="history_dtype"):
        BatchedLBFGS([torch.nn.Parameter(torch.zeros(2, 3))], history_dtype=value)


def _squares_closure(opt, x):
    """Closure of the per-cell loss ``sum(x^2)`` ``[n]``."""
    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum(1)
        loss.sum().backward()
        return loss.detach()
    return closure


def test_history_dtype_is_fixed_after_the_first_step_and_accepts_torch_dtypes():
    x = torch.nn.Parameter(torch.randn(2, 3))
    opt = BatchedLBFGS([x], history_size=3, history_dtype=torch.bfloat16)
    assert opt.param_groups[0]["history_dtype"] == "bfloat16"
    closure = _squares_closure(opt, x)
    opt.step(closure)
    opt.param_groups[0]["history_dtype"] = None
    with pytest.raises(ValueError, match="history_dtype cannot change"):
        opt.step(closure)


def test_auto_resolves_to_bfloat16_only_for_large_float32_histories():
    f32, f64 = torch.float32, torch.float64
    big = H.AUTO_REDUCED_BYTES // (4 * 2 * 10) + 1          # parameters per cell, m = 10, n = 1
    assert H.resolve_dtype("auto", f32, 1, 10, big) == torch.bfloat16
    assert H.resolve_dtype("auto", f32, 1, 10, big - 2) == f32
    assert H.resolve_dtype("auto", f64, 1, 10, big) == f64      # float64 stays exact
    assert H.resolve_dtype(None, f32, 1, 10, big) == f32
    assert H.resolve_dtype("float16", f32, 1, 1, 1) == torch.float16
    # auto starts exact; every explicit setting starts where it ends
    assert H.initial_dtype("auto", f32, 1, 10, big) == f32
    assert H.initial_dtype("bfloat16", f32, 1, 1, 1) == torch.bfloat16


def _fit_watching(model, x, t, n_evals, **kw):
    """One evaluation per step; the per-cell losses and a copy of the state after each."""
    opt = BatchedLBFGS(model.parameters(), max_eval=1, **kw)

    closure = _closure(model, opt, x, t)
    losses, states = [], []
    for _ in range(n_evals):
        losses.append(opt.step(closure).clone())
        states.append({k: v.clone() if torch.is_tensor(v) else v      # (updated in place)
                       for k, v in opt.state[opt._params[0]].items()})
    return opt, torch.stack(losses), states, closure


def test_auto_runs_exact_while_the_history_fills_then_narrows_consistently(monkeypatch,
                                                                           lbfgs_path):
    """With ``auto`` resolving to bfloat16 (threshold lowered to this problem): the history
    is fp32 and the iterates are the fp32 run's, bit for bit, until every slot is in use;
    then the pairs are stored in bfloat16 with the blocked copy, and the Gram matrices and
    ``proj0`` are those of the rounded pairs. The run then follows the fp32 run within the
    bfloat16 test's tolerance, and a state saved while filling resumes exactly."""
    monkeypatch.setattr(H, "AUTO_REDUCED_BYTES", 1)
    m, n_evals = 6, 40
    model, x, t = _mlp_problem(3, seed=2)
    ref_model, early = copy.deepcopy(model), copy.deepcopy(model)
    _, ref, _, _ = _fit_watching(ref_model, x, t, n_evals, history_size=m)
    opt, auto, states, closure = _fit_watching(model, x, t, n_evals, history_size=m,
                                               history_dtype="auto")
    full_at = next(i for i, st in enumerate(states) if st["slots_used"] == m)
    for st in states[:full_at]:
        assert st["sy"].dtype == torch.float32 and st["syb"] is None
    assert torch.equal(auto[:full_at + 1], ref[:full_at + 1])
    st = states[full_at]
    assert st["sy"].dtype == torch.bfloat16
    if lbfgs_path == "torch":
        assert torch.equal(st["syb"], H.to_blocked(st["sy"]))
    else:
        assert st["syb"] is None
    wide = st["sy"].double()
    s, y = wide[:, :, 0], wide[:, :, 1]
    # fp32 accumulation: within 1e-5 of each matrix's largest entry (the pairs before
    # rounding would be ~1e-2 off)
    for got, want in ((st["sty"], s @ y.transpose(1, 2)), (st["yty"], y @ y.transpose(1, 2)),
                      (st["proj0"], project_history(wide, st["g0"].double(), m))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    ratio = auto / ref
    assert ((ratio > 1 / 1.25) & (ratio < 1.25)).all(), ratio
    assert (auto[-1] < 2e-3 * auto[0]).all()
    # a state saved while the history is still fp32 loads (auto allows both dtypes) and
    # continues bit for bit
    opt2, _, _, closure2 = _fit_watching(early, x, t, full_at - 1, history_size=m,
                                         history_dtype="auto")
    twin = copy.deepcopy(early)
    resumed = BatchedLBFGS(twin.parameters(), max_eval=1, history_size=m, history_dtype="auto")
    resumed.load_state_dict(opt2.state_dict())
    closure3 = _closure(twin, resumed, x, t)
    for _ in range(3):                       # across the narrowing
        assert torch.equal(opt2.step(closure2), resumed.step(closure3))
    assert resumed.state[resumed._params[0]]["sy"].dtype == torch.bfloat16


def test_auto_stays_exact_for_small_histories():
    model, x, t = _mlp_problem(2, seed=3)
    opt, _, states, _ = _fit_watching(model, x, t, 12, history_size=4, history_dtype="auto")
    assert all(st["sy"].dtype == torch.float32 and st["syb"] is None for st in states)


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on the CPU needs a C++ compiler")
def test_auto_compiles_its_kernels_at_the_first_step(monkeypatch, lbfgs_path):
    """The kernels of the final dtype compile before the history fills (in a race's untimed
    warm-up), not at the evaluation where it narrows: the projection (narrowing and restarts
    use it) and, on the torch path, the combination (the native kernel does its own)."""
    monkeypatch.setattr(H, "AUTO_REDUCED_BYTES", 1)
    calls = []
    real = backends.CompiledKernel.__call__

    def spy(self, *args):
        calls.append((self.fn.__name__, tuple(args[0].shape), args[0].dtype))
        return real(self, *args)
    monkeypatch.setattr(backends.CompiledKernel, "__call__", spy)
    model, x, t = _mlp_problem(2, seed=5)
    opt, _, states, _ = _fit_watching(model, x, t, 1, history_size=5, history_dtype="auto")
    p = states[0]["x0"].shape[1]
    assert states[0]["sy"].dtype == torch.float32       # the history itself is still fp32
    want = [("_project_widened", (2, 10, p), torch.bfloat16)]
    if lbfgs_path == "torch":
        want.append(("_combine_widened", (2, -(-p // H.BLOCK), 10, H.BLOCK), torch.bfloat16))
    assert calls == want


def test_history_wider_than_the_parameters_is_refused():
    with pytest.raises(ValueError, match="history_dtype float64 is wider"):
        BatchedLBFGS([torch.nn.Parameter(torch.zeros(2, 3))], history_dtype="float64")


@pytest.mark.cuda
def test_cuda_kernels_equal_their_eager_twins_and_the_cpu():
    """On CUDA the history kernels compile through Triton: the same numbers as the eager twin
    and as the CPU, forward only (the passes run under no_grad)."""
    _, sy = _history(torch.bfloat16)
    syb = H.to_blocked(sy)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(N, P, generator=g)
    coef = torch.randn(N, 2 * M, generator=g, dtype=torch.float64)
    cpu_p, cpu_c = H.project(sy, v, M), H.combine(sy, syb, coef, M, torch.float32)
    dev = torch.device("cuda")
    sy_d, syb_d, v_d, coef_d = sy.to(dev), syb.to(dev), v.to(dev), coef.to(dev)
    flat = sy_d.view(N, 2 * M, P)
    torch.testing.assert_close(H.project_widened(flat, v_d), H.project_widened.fn(flat, v_d),
                               rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(H.project(sy_d, v_d, M).cpu(), cpu_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(H.combine(sy_d, syb_d, coef_d, M, torch.float32).cpu(), cpu_c,
                               rtol=1e-5, atol=1e-5)
    # the sync-free write path (a CUDA mask) against the CPU one
    s, y = torch.randn(N, P, generator=g), torch.randn(N, P, generator=g)
    slot, keep = torch.tensor([1, 3, 0]), torch.tensor([True, False, True])
    H.write_pair(sy, syb, slot, s, y, keep)
    H.write_pair(sy_d, syb_d, slot.to(dev), s.to(dev), y.to(dev), keep.to(dev))
    assert torch.equal(sy_d.cpu(), sy) and torch.equal(syb_d.cpu(), syb)
