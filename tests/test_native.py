"""The native per-cell kernel of BatchedLBFGS (optim/native.py) against its torch twin."""
import warnings

import pytest
import torch

from kilonerf_lbfgs import backends
from kilonerf_lbfgs.optim import BatchedLBFGS, lbfgs, native
from kilonerf_lbfgs.optim.history import combine, to_blocked

pytestmark = pytest.mark.skipif(
    not native.serves(torch.device("cpu"), torch.float32, torch.float32),
    reason="no C compiler (or KILONERF_NATIVE=0): the torch path runs instead")


def cauchy_cells(n=6, p=40, seed=0, squares=False, coupled=False):
    """A separable non-convex problem: cell k fits ``A_k x ~ b_k`` with a Cauchy loss, so
    some steps fail the curvature test and some searches need several trials. ``squares``:
    least squares on a consistent system instead (minimum 0). ``coupled``: the closure
    returns the sum (one line search for all cells)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * p, p, generator=gen) / p ** 0.5
    b = 2 * torch.randn(n, 3 * p, generator=gen)
    if squares:
        b = torch.bmm(a, torch.randn(n, p, 1, generator=gen))[..., 0]
    x = torch.nn.Parameter(torch.randn(n, p, generator=gen))

    def closure():
        x.grad = None
        r = torch.bmm(a, x[:, :, None])[..., 0] - b
        loss = r.square().sum(1) if squares else torch.log1p(r.square()).sum(1)
        loss.sum().backward()
        return loss.detach().sum() if coupled else loss.detach()
    return x, closure


def clone_state(st):
    d = lbfgs._tree_map(lambda t: t.clone(), st.to_dict())
    return lbfgs.LBFGSState.from_dict(d)


@pytest.mark.parametrize("history_dtype,max_step,coupled", [
    (None, None, False), ("bfloat16", None, False), ("bfloat16", 0.05, False),
    (None, 0.05, False), ("bfloat16", None, True)])
def test_native_iterate_equals_the_torch_iterate_along_a_run(monkeypatch, history_dtype,
                                                             max_step, coupled):
    """Along a run driven by the torch path, every evaluation is also fed to the native path
    from a copy of the same state: the two states agree (float32 products in another
    summation order; the Gram matrices and coefficients in float64). The run covers the
    ring buffer wrapping, pairs rejected by the curvature test and multi-trial searches."""
    use_native = {"on": False}
    serves = native.serves
    monkeypatch.setattr(native, "serves", lambda *a: use_native["on"] and serves(*a))
    real_iterate = lbfgs.iterate
    seen = {"evals": 0, "rejected": 0, "not_accepted": 0, "wrapped": 0}

    def twin_iterate(st, loss, grad, hp, work=None):
        other = clone_state(st)
        use_native["on"] = True
        keep_seen = {}
        real_pair = lbfgs.curvature_pair

        def spy(st_, out, hp_):
            r = real_pair(st_, out, hp_)
            keep_seen["accept"], keep_seen["keep"] = out.accept, r[-1]
            return r
        monkeypatch.setattr(lbfgs, "curvature_pair", spy)
        real_iterate(other, loss, grad, hp, work)
        monkeypatch.setattr(lbfgs, "curvature_pair", real_pair)
        use_native["on"] = False
        real_iterate(st, loss, grad, hp, work)
        seen["evals"] += 1
        seen["rejected"] += int((keep_seen["accept"] & ~keep_seen["keep"]).sum())
        seen["not_accepted"] += int((~keep_seen["accept"]).sum())
        seen["wrapped"] += int(st.slots_used == st.history_size)
        assert other.syb is None
        for name in ("ptr", "valid", "status", "n_iters", "n_evals"):
            assert torch.equal(getattr(other, name), getattr(st, name)), name
        assert other.slots_used == st.slots_used
        assert torch.equal(other.sy, st.sy)            # the same stored pairs
        for name in ("x0", "g0", "d", "sty", "yty", "proj0", "dcoef", "dgamma", "gamma",
                     "gtd0"):
            a, b = getattr(other, name).double(), getattr(st, name).double()
            scale = b.abs().max().clamp(min=1e-30)
            assert (a - b).abs().max() <= 1e-4 * scale, name
        for f in st.ls._fields:
            torch.testing.assert_close(getattr(other.ls, f), getattr(st.ls, f),
                                       rtol=1e-4, atol=1e-9, equal_nan=True)

    monkeypatch.setattr(lbfgs, "iterate", twin_iterate)
    x, closure = cauchy_cells(coupled=coupled)
    opt = BatchedLBFGS([x], history_size=4, max_eval=10, line_search="strong_wolfe",
                       history_dtype=history_dtype, max_step=max_step)
    for _ in range(4):
        opt.step(closure)
    assert seen["evals"] >= 30 and seen["wrapped"] > 0
    assert seen["not_accepted"] > 0


def test_native_iterate_handles_rejected_pairs_and_restarts(monkeypatch):
    """Pairs that fail the curvature test (kept out of the history) and searches that fail
    and restart from steepest descent, forced by a tiny max_ls and a large curvature_eps:
    the native run follows the torch run's trajectory."""
    x1, c1 = cauchy_cells(seed=3)
    x2, c2 = cauchy_cells(seed=3)
    kw = dict(history_size=3, max_eval=12, max_ls=2, curvature_eps=0.5)
    serves = native.serves
    native_opt = BatchedLBFGS([x1], **kw)
    native_opt.step(c1)
    monkeypatch.setattr(native, "serves", lambda *a: False)
    torch_opt = BatchedLBFGS([x2], **kw)
    torch_opt.step(c2)
    monkeypatch.setattr(native, "serves", serves)
    a, b = native_opt.state[x1], torch_opt.state[x2]
    assert not bool(a["valid"].all())                  # some slots left empty or dropped
    assert torch.equal(a["n_iters"], b["n_iters"])
    torch.testing.assert_close(x1.detach(), x2.detach(), rtol=1e-4, atol=1e-5)


def test_native_fits_as_well_as_torch_to_a_stated_loss(monkeypatch):
    """End to end on consistent least squares (minimum 0): in 60 evaluations both paths
    bring every cell's loss below 1e-6 of its start (a broken kernel, e.g. a wrong sign in
    the combination or a stale Gram row, stalls far above it), and the Cauchy cells end at
    the same loss on both paths."""
    serves = native.serves
    for on in (True, False):
        if not on:
            monkeypatch.setattr(native, "serves", lambda *a: False)
        x, closure = cauchy_cells(n=4, p=24, seed=5, squares=True)
        opt = BatchedLBFGS([x], history_size=8, max_eval=60, history_dtype="bfloat16",
                           tolerance_grad=0.0, tolerance_change=0.0)
        start = closure()
        opt.step(closure)
        assert bool((closure() < 1e-6 * start).all()), on
    ends = []
    for on in (True, False):
        monkeypatch.setattr(native, "serves", serves if on else (lambda *a: False))
        x, closure = cauchy_cells(n=4, p=24, seed=5)
        BatchedLBFGS([x], history_size=8, max_eval=60, history_dtype="bfloat16").step(closure)
        ends.append(closure())
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-4, atol=0)


def test_plain_combine_of_a_reduced_history_equals_the_blocked_one():
    """The native kernel keeps no blocked copy; the rare torch-side combination (a restart
    on a new objective) then widens the plain layout, with the blocked path's result."""
    gen = torch.Generator().manual_seed(1)
    n, m, p = 3, 5, 70
    sy = torch.randn(n, m, 2, p, generator=gen).to(torch.bfloat16)
    coef = torch.randn(n, 2 * m, generator=gen, dtype=torch.float64)
    for k in (0, 3, m):
        coef_k = coef.clone()
        coef_k[:, k:m], coef_k[:, m + k:] = 0, 0
        sy_k = sy.clone()
        sy_k[:, k:] = 0
        plain = combine(sy_k, None, coef_k, k, torch.float32)
        blocked = combine(sy_k, to_blocked(sy_k), coef_k, k, torch.float32)
        torch.testing.assert_close(plain, blocked, rtol=1e-5, atol=1e-5)


def test_native_history_restarts_on_a_new_objective():
    """new_objective with the history kept: the torch-side projection and combination read
    the native path's plain bfloat16 history (no blocked copy) and the run goes on."""
    x, closure = cauchy_cells(n=3, p=20, seed=2)
    opt = BatchedLBFGS([x], history_size=4, max_eval=8, history_dtype="bfloat16")
    opt.step(closure)
    assert opt.state[x]["syb"] is None
    before = float(closure().sum())
    opt.new_objective(keep_history=True)
    opt.step(closure)
    assert float(closure().sum()) < before


def test_native_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    """A compiler that fails: one RuntimeWarning and None (the callers keep the torch path);
    KILONERF_NATIVE=0: None without building."""
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("KILONERF_CACHE", str(tmp_path / "cache"))
    build = backends.native_library.__wrapped__
    with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
        assert build(str(native.SOURCE)) is None
    monkeypatch.setenv("KILONERF_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build(str(native.SOURCE)) is None
    assert not list((tmp_path / "cache").glob("*.so"))


def test_native_batched_equals_one_run_per_cell():
    """BatchedLBFGS on N cells == N runs of one cell, on the native path in float32 (each
    cell's kernel arithmetic does not depend on the other cells or the thread split)."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 6, generator=gen) * 1.2

    def rosenbrock(x):
        return (100.0 * (x[:, 1:] - x[:, :-1] ** 2) ** 2 + (1.0 - x[:, :-1]) ** 2).sum(1)

    def run(start):
        x = torch.nn.Parameter(start.clone())
        opt = BatchedLBFGS([x], max_eval=9, history_size=4, history_dtype="bfloat16")

        def closure():
            opt.zero_grad()
            loss = rosenbrock(x)
            loss.sum().backward()
            return loss.detach()
        for _ in range(3):
            opt.step(closure)
        return x.detach(), opt.status()

    xb, sb = run(x0)
    for k in range(4):
        xs, ss = run(x0[k:k + 1])
        torch.testing.assert_close(xb[k:k + 1], xs, rtol=0, atol=1e-6)
        for key in ("n_evals", "n_iters", "status"):
            assert int(sb[key][k]) == int(ss[key][0]), key
    assert len(set(sb["n_iters"].tolist())) > 1
