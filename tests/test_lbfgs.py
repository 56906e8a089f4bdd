"""Tests of the batched per-cell L-BFGS (kilonerf_lbfgs.optim)."""
import copy

import numpy as np
import math

import pytest
import scipy.optimize as so
import torch

from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.optim import BatchedLBFGS, compact_coefficients, two_loop_direction
from kilonerf_lbfgs.optim.compact import chronological_order
from kilonerf_lbfgs.optim.linesearch import cubic_minimizer

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: with numpy/scipy loaded next to torch, torch's 2-thread pool makes
    every small op ~20x slower on this 2-core machine. Use one thread here, then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- helpers

def rosenbrock(x):
    """Per-row Rosenbrock, ``x [n, D]`` -> ``[n]`` (scipy.optimize.rosen on each row)."""
    return (100.0 * (x[:, 1:] - x[:, :-1] ** 2) ** 2 + (1.0 - x[:, :-1]) ** 2).sum(1)


def make_closure(opt, params, loss_fn, counter=None):
    def closure():
        if counter is not None:
            counter[0] += 1
        opt.zero_grad()
        loss = loss_fn(*params)
        loss.sum().backward()
        return loss
    return closure


def run_lbfgs(x0, loss_fn, n_steps, **kw):
    x = torch.nn.Parameter(x0.clone())
    opt = BatchedLBFGS([x], **kw)
    closure = make_closure(opt, [x], loss_fn)
    for _ in range(n_steps):
        opt.step(closure)
    return x.detach().clone(), opt


def scipy_minimize(fun, jac, x0):
    res = so.minimize(fun, np.asarray(x0, dtype=np.float64), jac=jac, method="L-BFGS-B",
                      options=dict(maxiter=20000, maxfun=40000, maxcor=10, gtol=1e-14,
                                   ftol=1e-22))
    return res


# ---------------------------------------------------------------------------- compact form

def ring_history(n, m, p, n_valid, ptrs, gen, holes=None):
    """Ring buffers of L-BFGS pairs built by hand.

    Cell k holds ``n_valid[k]`` valid pairs in the newest slots, chronological order being
    ``(ptr + j) % m`` oldest first; the other slots hold garbage (also negative curvature)
    that must be ignored. ``holes`` optionally lists (cell, chronological position) pairs
    to invalidate in addition. Returns the tensors compact_coefficients takes, plus the
    valid pairs of each cell oldest first.
    """
    S = torch.randn(n, m, p, generator=gen, dtype=F64)
    Y = torch.randn(n, m, p, generator=gen, dtype=F64)          # garbage by default
    valid = torch.zeros(n, m, dtype=torch.bool)
    pairs = []
    for k in range(n):
        # a random SPD "Hessian" per cell makes y = B s with s.y > 0
        q = torch.randn(p, p, generator=gen, dtype=F64)
        B = q @ q.T / p + 0.5 * torch.eye(p, dtype=F64)
        chron = [(ptrs[k] + j) % m for j in range(m)]
        ok_pos = list(range(m - n_valid[k], m))
        if holes is not None:
            ok_pos = [j for j in ok_pos if (k, j) not in holes]
        cell_pairs = []
        for j in ok_pos:
            slot = chron[j]
            Y[k, slot] = B @ S[k, slot]
            assert float(S[k, slot] @ Y[k, slot]) > 0
            valid[k, slot] = True
            cell_pairs.append((S[k, slot].clone(), Y[k, slot].clone()))
        pairs.append(cell_pairs)
    return S, Y, valid, pairs


@pytest.mark.parametrize("holes", [None, {(3, 2)}])
def test_compact_coefficients_match_two_loop(holes):
    gen = torch.Generator().manual_seed(0)
    n, m, p = 5, 5, 12
    n_valid = [5, 3, 1, 0, 4] if holes is None else [5, 3, 1, 5, 4]
    ptrs = [2, 4, 1, 3, 0]
    S, Y, valid, pairs = ring_history(n, m, p, n_valid, ptrs, gen, holes)
    g = torch.randn(n, p, generator=gen, dtype=F64)
    gamma = torch.rand(n, generator=gen, dtype=F64) + 0.2
    ptr = torch.tensor(ptrs)
    order = chronological_order(ptr, m)
    # the chronological order of a ring with next-write pointer ptr
    for k in range(n):
        assert order[k].tolist() == [(ptrs[k] + j) % m for j in range(m)]
    proj = torch.cat([torch.einsum("nmp,np->nm", S, g), torch.einsum("nmp,np->nm", Y, g)], 1)
    sty = torch.einsum("nip,njp->nij", S, Y)
    yty = torch.einsum("nip,njp->nij", Y, Y)
    coef = compact_coefficients(proj, sty, yty, gamma, valid, order)
    assert coef.shape == (n, 2 * m)
    # zero on invalid slots
    inv = torch.cat([~valid, ~valid], 1)
    assert bool((coef[inv] == 0).all())
    hg = gamma[:, None] * g + torch.einsum("nm,nmp->np", coef[:, :m], S) \
        + torch.einsum("nm,nmp->np", coef[:, m:], Y)
    for k in range(n):
        s_list = [s for s, _ in pairs[k]]
        y_list = [y for _, y in pairs[k]]
        ref = two_loop_direction(g[k], s_list, y_list, float(gamma[k]))
        err = float((hg[k] - ref).norm() / ref.norm())
        assert err < 1e-10, (k, err)
    # a reused workspace gives the same answer
    work = {}
    c1 = compact_coefficients(proj, sty, yty, gamma, valid, order, work)
    c2 = compact_coefficients(proj, sty, yty, gamma, valid, order, work)
    assert torch.equal(c1, coef) and torch.equal(c2, coef)


def test_compact_coefficients_shared_shift_equals_the_general_permutation():
    """Cells that share their oldest slot take a block-copy permutation: bit for bit the
    general (per-cell order) path's answer, for every shift."""
    gen = torch.Generator().manual_seed(4)
    n, m, p = 3, 6, 10
    for shift in range(m):
        S, Y, valid, _ = ring_history(n, m, p, [6, 6, 4], [shift] * n, gen)
        g = torch.randn(n, p, generator=gen, dtype=F64)
        gamma = torch.rand(n, generator=gen, dtype=F64) + 0.2
        order = chronological_order(torch.full((n,), shift), m)
        proj = torch.cat([torch.einsum("nmp,np->nm", S, g),
                          torch.einsum("nmp,np->nm", Y, g)], 1)
        sty = torch.einsum("nip,njp->nij", S, Y)
        yty = torch.einsum("nip,njp->nij", Y, Y)
        general = compact_coefficients(proj, sty, yty, gamma, valid, order)
        shared = compact_coefficients(proj, sty, yty, gamma, valid, order, shift=shift)
        assert torch.equal(general, shared), shift
        assert bool(general.abs().sum() > 0)


def test_two_loop_direction_oracle_sanity():
    """Sanity checks of the oracle itself: the newest secant equation H y = s holds, and
    with pairs along A's eigenvectors (A-conjugate) the L-BFGS matrix is exactly A^-1."""
    gen = torch.Generator().manual_seed(1)
    p = 6
    q = torch.randn(p, p, generator=gen, dtype=F64)
    A = q @ q.T + torch.eye(p, dtype=F64)
    s_list = [torch.randn(p, generator=gen, dtype=F64) for _ in range(4)]
    y_list = [A @ s for s in s_list]
    torch.testing.assert_close(two_loop_direction(y_list[-1], s_list, y_list, 0.7), s_list[-1],
                               rtol=1e-10, atol=1e-12)
    evals, evecs = torch.linalg.eigh(A)
    s_list = [evecs[:, i] * (i + 1.0) for i in range(p)]
    y_list = [A @ s for s in s_list]
    g = torch.randn(p, generator=gen, dtype=F64)
    torch.testing.assert_close(two_loop_direction(g, s_list, y_list, 0.7),
                               torch.linalg.solve(A, g), rtol=1e-10, atol=1e-12)
    # no pairs: H = gamma I
    torch.testing.assert_close(two_loop_direction(g, [], [], 0.7), 0.7 * g, rtol=0, atol=0)


# ---------------------------------------------------------------------------- line search

def test_cubic_minimizer_exact_on_quadratic_and_cubic():
    d = dict(dtype=F64)
    # f(t) = (t - 0.3)^2 sampled at 0 and 1 (a quadratic is a cubic): minimiser 0.3
    t1, t2 = torch.tensor([0.0], **d), torch.tensor([1.0], **d)
    f = lambda t: (t - 0.3) ** 2
    fp = lambda t: 2 * (t - 0.3)
    out = cubic_minimizer(t1, f(t1), fp(t1), t2, f(t2), fp(t2))
    torch.testing.assert_close(out, torch.tensor([0.3], **d), rtol=0, atol=1e-14)
    # f(t) = t^3 - 3t: local minimiser 1, in both argument orders, on several intervals
    c = lambda t: t ** 3 - 3 * t
    cp = lambda t: 3 * t ** 2 - 3
    a = torch.tensor([0.0, 2.0, 0.5, 1.7], **d)
    b = torch.tensor([2.0, 0.0, 1.7, 0.5], **d)
    out = cubic_minimizer(a, c(a), cp(a), b, c(b), cp(b))
    torch.testing.assert_close(out, torch.ones(4, **d), rtol=0, atol=1e-12)
    # shifted/scaled: f(t) = 2 (t - 5)^3 - 6 (t - 5) has its local minimiser at 6
    h = lambda t: 2 * (t - 5) ** 3 - 6 * (t - 5)
    hp = lambda t: 6 * (t - 5) ** 2 - 6
    a, b = torch.tensor([5.2], **d), torch.tensor([7.5], **d)
    torch.testing.assert_close(cubic_minimizer(a, h(a), hp(a), b, h(b), hp(b)),
                               torch.tensor([6.0], **d), rtol=0, atol=1e-12)


def test_cubic_minimizer_clamps_and_falls_back_to_midpoint():
    d = dict(dtype=F64)
    c = lambda t: t ** 3 - 3 * t
    cp = lambda t: 3 * t ** 2 - 3
    # minimiser 1 lies left of [1.5, 3]: clamped to the interval
    a, b = torch.tensor([1.5, 3.0], **d), torch.tensor([3.0, 1.5], **d)
    out = cubic_minimizer(a, c(a), cp(a), b, c(b), cp(b))
    torch.testing.assert_close(out, torch.tensor([1.5, 1.5], **d), rtol=0, atol=1e-12)
    # non-finite inputs: midpoint
    t1 = torch.tensor([0.0, 0.0, 2.0, 1.0], **d)
    t2 = torch.tensor([1.0, 4.0, 1.0, 3.0], **d)
    f1 = torch.tensor([0.0, 0.0, float("nan"), 0.0], **d)
    f2 = torch.tensor([float("inf"), 1.0, 1.0, 1.0], **d)
    g1 = torch.tensor([-1.0, -1.0, 1.0, float("nan")], **d)
    g2 = torch.tensor([float("inf"), float("inf"), 1.0, 1.0], **d)
    out = cubic_minimizer(t1, f1, g1, t2, f2, g2)
    assert torch.equal(out, 0.5 * (t1 + t2))
    # a cubic without a local minimiser (t^3 + t is increasing): midpoint
    e = lambda t: t ** 3 + t
    ep = lambda t: 3 * t ** 2 + 1
    a, b = torch.tensor([0.0], **d), torch.tensor([1.0], **d)
    assert torch.equal(cubic_minimizer(a, e(a), ep(a), b, e(b), ep(b)),
                       torch.tensor([0.5], **d))


# ---------------------------------------------------------------------------- batching

def test_batched_equals_separate_rosenbrock():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, generator=gen, dtype=F64) * 1.2
    kw = dict(max_eval=7, history_size=4)
    # few enough steps that every cell is still moving (different phases, some backtracking)
    for n_steps in (1, 4):
        xb, ob = run_lbfgs(x0, rosenbrock, n_steps, **kw)
        for k in range(4):
            xs, os_ = run_lbfgs(x0[k:k + 1], rosenbrock, n_steps, **kw)
            torch.testing.assert_close(xb[k:k + 1], xs, rtol=0, atol=1e-8)
            for key in ("n_evals", "n_iters", "status"):
                assert int(ob.status()[key][k]) == int(os_.status()[key][0]), key
    # the cells really did different amounts of work
    assert len(set(ob.status()["n_iters"].tolist())) > 1


def test_batched_equals_separate_multimlp_regression():
    n, P = 4, 9
    gen = torch.Generator().manual_seed(3)
    model = MultiMLP(n, 2, 1, width=6, depth=2, activation="sine", omega_0=3.0,
                     generator=gen, dtype=F64)
    x = torch.rand(n, P, 2, generator=gen, dtype=F64) * 2 - 1
    y = torch.sin(3 * x[..., :1]) * torch.randn(n, 1, 1, generator=gen, dtype=F64) + x[..., 1:]
    init = [p.detach().clone() for p in model.parameters()]

    def fit(cells, n_steps):
        m = MultiMLP(len(cells), 2, 1, width=6, depth=2, activation="sine", omega_0=3.0,
                     dtype=F64)
        with torch.no_grad():
            for p, q in zip(m.parameters(), init):
                p.copy_(q[cells])
        opt = BatchedLBFGS(m.parameters(), max_eval=6, history_size=5)

        def closure():
            opt.zero_grad()
            loss = ((m.forward_dense(x[cells]) - y[cells]) ** 2).mean(dim=(1, 2))
            loss.sum().backward()
            return loss
        for _ in range(n_steps):
            opt.step(closure)
        return [p.detach().clone() for p in m.parameters()], opt

    batched, ob = fit(list(range(n)), 5)
    for k in range(n):
        single, os_ = fit([k], 5)
        for pb, ps in zip(batched, single):
            torch.testing.assert_close(pb[k:k + 1], ps, rtol=0, atol=1e-8)
        assert int(ob.status()["n_iters"][k]) == int(os_.status()["n_iters"][0])
    # it optimised something
    for pb, p0 in zip(batched, init):
        assert not torch.equal(pb, p0)


def test_step_runs_max_eval_closures_and_returns_loss_at_params():
    gen = torch.Generator().manual_seed(4)
    x = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=F64))
    opt = BatchedLBFGS([x], max_eval=5, history_size=3)
    counter = [0]
    closure = make_closure(opt, [x], rosenbrock, counter)
    assert opt.status() == {}
    for i in range(3):
        loss = opt.step(closure)
        assert counter[0] == 5 * (i + 1)
        with torch.no_grad():
            torch.testing.assert_close(loss, rosenbrock(x), rtol=0, atol=0)
    st = opt.status()
    assert set(st) == {"status", "n_evals", "n_iters"}
    assert st["status"].shape == (3,)
    assert bool((st["n_evals"] <= 15).all()) and bool((st["n_iters"] >= 1).all())


# ---------------------------------------------------------------------------- vs scipy

@pytest.mark.parametrize("starts", [
    [[-1.2, 1.0], [2.0, -1.0], [-0.5, 2.5]],
    [[-1.2, 1.0, -1.2, 1.0, -1.2, 1.0], [0.5] * 6, [1.2, 0.8, 1.3, 0.9, 1.1, 1.0]],
], ids=["2d", "6d"])
def test_rosenbrock_matches_scipy(starts):
    x0 = torch.tensor(starts, dtype=F64)
    x, opt = run_lbfgs(x0, rosenbrock, 5, max_eval=20, history_size=10)
    f = rosenbrock(x)
    for k in range(x0.shape[0]):
        res = scipy_minimize(so.rosen, so.rosen_der, starts[k])
        np.testing.assert_allclose(x[k].numpy(), res.x, rtol=0, atol=1e-5)
        assert abs(float(f[k]) - res.fun) < 1e-10
        # and both found the global minimum (1, ..., 1)
        np.testing.assert_allclose(x[k].numpy(), np.ones(len(starts[k])), rtol=0, atol=1e-5)
    assert bool((opt.status()["status"] != 0).all())   # nobody still running


def test_quadratic_matches_scipy_and_exact_solution():
    n, D = 3, 20
    gen = torch.Generator().manual_seed(5)
    Q = torch.randn(n, D, D, generator=gen, dtype=F64)
    A = Q @ Q.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=F64)
    b = torch.randn(n, D, generator=gen, dtype=F64)

    def loss_fn(x):
        return 0.5 * torch.einsum("ni,nij,nj->n", x, A, x) - (b * x).sum(1)

    x0 = torch.randn(n, D, generator=gen, dtype=F64)
    x, opt = run_lbfgs(x0, loss_fn, 5, max_eval=25, history_size=10)
    f = loss_fn(x)
    exact = torch.linalg.solve(A, b[..., None])[..., 0]
    for k in range(n):
        Ak, bk = A[k].numpy(), b[k].numpy()
        res = scipy_minimize(lambda z: 0.5 * z @ Ak @ z - bk @ z, lambda z: Ak @ z - bk,
                             x0[k].numpy())
        np.testing.assert_allclose(x[k].numpy(), res.x, rtol=0, atol=1e-5)
        assert abs(float(f[k]) - res.fun) < 1e-10
        np.testing.assert_allclose(x[k].numpy(), exact[k].numpy(), rtol=0, atol=1e-6)


def test_coupled_scalar_loss_matches_scipy():
    n, D = 3, 5
    gen = torch.Generator().manual_seed(6)
    Q = torch.randn(n, D, D, generator=gen, dtype=F64)
    A = Q @ Q.transpose(1, 2) + 0.5 * torch.eye(D, dtype=F64)
    b = torch.randn(n, D, generator=gen, dtype=F64)

    def loss_fn(x):
        return (0.5 * torch.einsum("ni,nij,nj->n", x, A, x) - (b * x).sum(1)).sum() \
            + 0.1 * x.sum() ** 2

    x = torch.nn.Parameter(torch.zeros(n, D, dtype=F64))
    opt = BatchedLBFGS([x], max_eval=20, history_size=10)

    def closure():
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        return loss
    for _ in range(5):
        loss = opt.step(closure)
    assert loss.dim() == 0
    st = opt.status()
    # one shared line search: every cell did the same number of iterations
    assert len(set(st["n_iters"].tolist())) == 1 and int(st["n_iters"][0]) > 0

    An, bn = A.numpy(), b.numpy()

    def fun(z):
        z = z.reshape(n, D)
        return float(sum(0.5 * z[k] @ An[k] @ z[k] - bn[k] @ z[k] for k in range(n))
                     + 0.1 * z.sum() ** 2)

    def jac(z):
        z = z.reshape(n, D)
        g = np.stack([An[k] @ z[k] - bn[k] for k in range(n)]) + 0.2 * z.sum()
        return g.reshape(-1)
    res = scipy_minimize(fun, jac, np.zeros(n * D))
    np.testing.assert_allclose(x.detach().numpy().reshape(-1), res.x, rtol=0, atol=1e-5)
    assert abs(float(loss) - res.fun) < 1e-10
    # the exact joint minimiser (block-diagonal + rank-one Hessian)
    H = torch.block_diag(*A) + 0.2 * torch.ones(n * D, n * D, dtype=F64)
    exact = torch.linalg.solve(H, b.reshape(-1))
    np.testing.assert_allclose(x.detach().numpy().reshape(-1), exact.numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- robustness

def test_nonpositive_curvature_pairs_are_skipped():
    def fprime(v):
        return -2 * v + 0.4 * v ** 3

    def loss_fn(x):
        concave = -x[0, 0] ** 2 + 0.1 * x[0, 0] ** 4      # f'' < 0 for |x| < 1.29
        convex = 2 * x[1, 0] ** 2
        return torch.stack([concave, convex])

    m = 4
    x = torch.nn.Parameter(torch.tensor([[0.1], [1.0]], dtype=F64))
    opt = BatchedLBFGS([x], lr=0.05, line_search=None, max_eval=1, history_size=m)
    closure = make_closure(opt, [x], loss_fn)
    opt.step(closure)                      # max_eval=1: the first call only evaluates
    prev = x.detach().clone()
    for it in range(1, 8):
        opt.step(closure)
        cur = x.detach().clone()
        st = opt.state_dict()["state"][0]
        # both cells took a step (fixed step length: every finite trial is accepted)
        assert bool((cur != prev).all())
        assert opt.status()["n_iters"].tolist() == [it, it]
        # the concave cell's pair really has s.y < 0 (oracle from the analytic gradient)
        s = float(cur[0, 0] - prev[0, 0])
        y = float(fprime(cur[0, 0]) - fprime(prev[0, 0]))
        assert s * y < 0 and abs(float(cur[0, 0])) < 1.2
        valid = st["valid"].sum(1).tolist()
        assert valid[0] == 0, valid                      # skipped, history does not grow
        assert valid[1] == min(it, m), valid            # convex cell: one more pair each step
        prev = cur


def test_nan_in_one_cell_stays_in_that_cell():
    n, D, k_nan = 4, 3, 1
    gen = torch.Generator().manual_seed(7)
    target = torch.tensor([[1.0, -0.5, 0.3], [4.0, 4.0, 4.0], [-2.0, 0.5, 1.0],
                           [0.2, 0.2, -0.4]], dtype=F64)
    x0 = torch.randn(n, D, generator=gen, dtype=F64) * 0.5
    cell_ids = torch.arange(n)
    nan_hits = [0]

    def base(x):
        # nonconvex; cell k_nan's minimiser (near 3.6) lies inside the NaN region x > 2
        return ((x - target) ** 2).sum(1) + 0.01 * (x ** 4).sum(1) \
            + torch.sin(3 * x).sum(1)

    def with_nan(x):
        loss = base(x)
        bad = (x > 2).any(1) & (cell_ids == k_nan)
        nan_hits[0] += int(bad.sum())
        return torch.where(bad, torch.full_like(loss, float("nan")), loss)

    for ls in ("strong_wolfe", "armijo", None):
        nan_hits[0] = 0
        kw = dict(max_eval=6, history_size=5, line_search=ls)
        x_nan = torch.nn.Parameter(x0.clone())
        x_ref = torch.nn.Parameter(x0.clone())
        o_nan, o_ref = BatchedLBFGS([x_nan], **kw), BatchedLBFGS([x_ref], **kw)
        c_nan = make_closure(o_nan, [x_nan], with_nan)
        c_ref = make_closure(o_ref, [x_ref], base)
        for _ in range(6):
            o_nan.step(c_nan)
            o_ref.step(c_ref)
            others = cell_ids != k_nan
            assert torch.equal(x_nan.detach()[others], x_ref.detach()[others])
            assert bool(torch.isfinite(x_nan.detach()).all())
            # an accepted point of the NaN cell never lies in the NaN region
            assert bool((x_nan.detach()[k_nan] <= 2).all())
            st = o_nan.state_dict()["state"][0]
            for key in ("sy", "sty", "yty", "gamma", "x0", "g0", "f0"):
                assert bool(torch.isfinite(st[key]).all()), key
        assert nan_hits[0] > 0, "the NaN region was never tried"
        # the unconstrained run does leave the region
        assert bool((x_ref.detach()[k_nan] > 2).any())
        assert bool((o_nan.status()["n_evals"][others] == o_ref.status()["n_evals"][others]).all())


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randn(3, 4, generator=gen, dtype=F64)
    kw = dict(max_eval=4, history_size=3)
    x = torch.nn.Parameter(x0.clone())
    opt = BatchedLBFGS([x], **kw)
    closure = make_closure(opt, [x], rosenbrock)
    for _ in range(3):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    x_saved = x.detach().clone()

    # an uninterrupted reference run
    x_ref = torch.nn.Parameter(x0.clone())
    o_ref = BatchedLBFGS([x_ref], **kw)
    c_ref = make_closure(o_ref, [x_ref], rosenbrock)
    for _ in range(6):
        o_ref.step(c_ref)

    x2 = torch.nn.Parameter(x_saved.clone())
    opt2 = BatchedLBFGS([x2], **kw)
    opt2.load_state_dict(sd)
    closure2 = make_closure(opt2, [x2], rosenbrock)
    for _ in range(3):
        l1 = opt.step(closure)
        l2 = opt2.step(closure2)
        assert torch.equal(l1, l2)
        assert torch.equal(x.detach(), x2.detach())
    assert torch.equal(x.detach(), x_ref.detach())
    for key in ("status", "n_evals", "n_iters"):
        assert torch.equal(opt.status()[key], opt2.status()[key])
    # the continuation moved the parameters (the comparison is not vacuous)
    assert not torch.equal(x.detach(), x_saved)


# ---------------------------------------------------------------------------- arguments

BAD_ARGUMENTS = [
    ("lr", 0.0), ("lr", -1.0), ("lr", float("nan")), ("lr", float("inf")), ("lr", "big"),
    ("history_size", 0), ("history_size", 2.5), ("history_size", True),
    ("max_eval", 0), ("max_eval", -3),
    ("max_ls", 0), ("max_ls", 1.5),
    ("line_search", "wolfe"), ("line_search", 3),
    ("c1", 0.0), ("c1", 1.0), ("c1", -0.1),
    ("c2", 1.0), ("c2", 0.0), ("c2", 1e-5),           # c2 <= c1 (1e-4)
    ("tolerance_grad", -1e-9), ("tolerance_change", -1.0), ("curvature_eps", -1.0),
    ("tolerance_grad", float("nan")),
    ("max_step", 0.0), ("max_step", -1.0), ("max_step", float("inf")),
]


@pytest.mark.parametrize("name,value", BAD_ARGUMENTS)
def test_bad_constructor_argument_raises_value_error_naming_it(name, value):
    x = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match=name):
        BatchedLBFGS([x], **{name: value})


def test_c1_must_be_below_c2():
    x = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="c1"):
        BatchedLBFGS([x], c1=0.5, c2=0.5)
    BatchedLBFGS([x], c1=0.4, c2=0.5)                                       # fine


def test_bad_params():
    x = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="params"):
        BatchedLBFGS([])
    with pytest.raises(ValueError, match="dim 0"):
        BatchedLBFGS([x, torch.nn.Parameter(torch.zeros(4, 2, dtype=F64))])
    with pytest.raises(ValueError, match="dtype"):
        BatchedLBFGS([x, torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float32))])
    with pytest.raises(ValueError, match="single parameter group"):
        BatchedLBFGS([{"params": [x]}, {"params": [torch.nn.Parameter(torch.zeros(3, 1))]}])
    with pytest.raises(ValueError, match="cells"):
        BatchedLBFGS([torch.nn.Parameter(torch.zeros(0, 2, dtype=F64))])
    with pytest.raises(TypeError):
        BatchedLBFGS(x)                                    # a bare tensor, as torch.optim
    BatchedLBFGS([x, torch.nn.Parameter(torch.zeros(3, 5, 2, dtype=F64))])   # fine
    opt = BatchedLBFGS([x], line_search=None, max_eval=3.0)                  # integral float
    assert opt.param_groups[0]["line_search"] == "none"
    assert opt.param_groups[0]["max_eval"] == 3


@pytest.mark.parametrize("shape", [(4,), (3, 1), (1,), (2, 3)])
def test_closure_with_wrong_shape_raises(shape):
    x = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    opt = BatchedLBFGS([x])

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum() * torch.ones(shape, dtype=F64)
        loss.sum().backward()
        return loss
    with pytest.raises(ValueError):
        opt.step(closure)


def test_closure_required_and_must_return_tensor():
    x = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    opt = BatchedLBFGS([x])
    with pytest.raises(ValueError):
        opt.step(None)
    with pytest.raises(TypeError):
        opt.step(lambda: 1.0)


def test_scalar_parameter_raises_value_error():
    with pytest.raises(ValueError):
        BatchedLBFGS([torch.nn.Parameter(torch.tensor(1.0, dtype=F64))])


def test_cell_with_zero_gradient_at_start_is_converged():
    x0 = torch.tensor([[0.5, 0.5], [1.0, 2.0]], dtype=F64)
    w = torch.tensor([1.0, 0.0], dtype=F64)            # cell 1 has no data

    def loss_fn(x):
        return w * ((x - 3.0) ** 2).sum(1)
    x, opt = run_lbfgs(x0, loss_fn, 2, max_eval=10, history_size=3)
    torch.testing.assert_close(x[0], torch.full((2,), 3.0, dtype=F64), rtol=0, atol=1e-10)
    assert torch.equal(x[1], x0[1])                    # the stationary cell does not move
    assert opt.status()["status"].tolist() == [1, 1]


# ---------------------------------------------------------------------------- torch.optim API

def _quadratic(x):
    """Per-cell convex quadratic with different curvatures per coordinate."""
    w = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
    return 0.5 * (w * (x - 1.0) ** 2).sum(1)


def test_lr_change_in_param_groups_changes_the_next_step():
    """With a fixed step (line_search=None) every trial is accepted, so a step moves by
    ``lr d``: after identical histories, halving ``param_groups[0]["lr"]`` halves the
    next displacement."""
    gen = torch.Generator().manual_seed(10)
    x0 = torch.randn(3, 4, generator=gen, dtype=F64)
    kw = dict(lr=0.2, line_search=None, max_eval=1, history_size=3)
    xa, xb = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    oa, ob = BatchedLBFGS([xa], **kw), BatchedLBFGS([xb], **kw)
    ca, cb = make_closure(oa, [xa], _quadratic), make_closure(ob, [xb], _quadratic)
    for _ in range(4):                         # with history (first step: evaluation only)
        oa.step(ca)
        ob.step(cb)
    assert torch.equal(xa.detach(), xb.detach())
    before = xa.detach().clone()
    ob.param_groups[0]["lr"] = 0.1
    oa.step(ca)
    ob.step(cb)
    da, db = xa.detach() - before, xb.detach() - before
    assert bool((da.abs() > 1e-6).all())
    torch.testing.assert_close(db, 0.5 * da, rtol=1e-12, atol=0)
    # and the state_dict carries the new rate
    assert ob.state_dict()["param_groups"][0]["lr"] == 0.1
    # an invalid rate set between steps is caught at the next step
    ob.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        ob.step(cb)


def test_max_eval_change_in_param_groups_takes_effect():
    x = torch.nn.Parameter(torch.zeros(2, 3, dtype=F64))
    opt = BatchedLBFGS([x], max_eval=3, history_size=2)
    counter = [0]
    closure = make_closure(opt, [x], rosenbrock, counter)
    opt.step(closure)
    assert counter[0] == 3
    opt.param_groups[0]["max_eval"] = 5
    opt.step(closure)
    assert counter[0] == 8


def test_history_size_is_fixed_after_the_first_step():
    x = torch.nn.Parameter(torch.zeros(2, 3, dtype=F64))
    opt = BatchedLBFGS([x], max_eval=2, history_size=4)
    opt.param_groups[0]["history_size"] = 6              # before the first step: fine
    closure = make_closure(opt, [x], rosenbrock)
    opt.step(closure)
    assert opt.state_dict()["state"][0]["sy"].shape[1] == 6
    opt.param_groups[0]["history_size"] = 3
    with pytest.raises(ValueError, match="history_size"):
        opt.step(closure)


def test_state_dict_has_the_torch_optim_layout():
    x = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    y = torch.nn.Parameter(torch.zeros(3, 4, dtype=F64))
    opt = BatchedLBFGS([x, y], lr=0.5, history_size=3, max_eval=2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"} and sd["state"] == {}
    group = sd["param_groups"][0]
    assert group["params"] == [0, 1] and group["lr"] == 0.5 and group["history_size"] == 3
    assert group["line_search"] == "strong_wolfe"

    def loss_fn(a, b):
        return rosenbrock(torch.cat([a, b], 1))
    closure = make_closure(opt, [x, y], loss_fn)
    opt.step(closure)
    sd = opt.state_dict()
    assert list(sd["state"]) == [0]
    st = sd["state"][0]
    assert st["sy"].shape == (3, 3, 2, 6) and st["sty"].shape == (3, 3, 3)
    assert st["x0"].shape == (3, 6) and st["status"].shape == (3,)
    # a copy: stepping on does not change a saved state
    saved = st["x0"].clone()
    opt.step(closure)
    assert torch.equal(st["x0"], saved)
    # extra keys in the group (e.g. a scheduler's initial_lr) survive a round trip
    opt.param_groups[0]["initial_lr"] = 0.5
    opt2 = BatchedLBFGS([x, y], history_size=3)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["initial_lr"] == 0.5 and opt2.param_groups[0]["lr"] == 0.5
    assert opt2.param_groups[0]["params"][0] is x


@pytest.mark.parametrize("other,match", [
    (dict(shape=(4, 3)), "cells"),
    (dict(shape=(3, 5)), "parameters per cell"),
    (dict(shape=(3, 3), history_size=5), "history_size"),
    (dict(shape=(3, 3), n_tensors=2), "parameter tensors"),
    (dict(shape=(3, 3), dtype=torch.float32), "float"),
])
def test_load_state_dict_rejects_a_state_that_does_not_fit(other, match):
    def trained(shape, history_size=4, n_tensors=1, dtype=F64):
        ps = [torch.nn.Parameter(torch.full(shape, 0.3, dtype=dtype)) for _ in range(n_tensors)]
        opt = BatchedLBFGS(ps, history_size=history_size, max_eval=3)
        closure = make_closure(opt, ps, lambda *a: rosenbrock(torch.cat(a, 1)))
        opt.step(closure)
        return opt, ps

    here, ps = trained((3, 3))
    before = copy.deepcopy(here.state_dict())
    there, _ = trained(**other)
    with pytest.raises(ValueError, match=match):
        here.load_state_dict(there.state_dict())
    # a rejected state leaves the optimiser as it was
    after = here.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, v in before["state"][0].items():
        if torch.is_tensor(v):
            assert torch.equal(after["state"][0][k], v), k


def test_load_state_dict_rejects_malformed_input():
    x = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    opt = BatchedLBFGS([x], history_size=3)
    good = opt.state_dict()
    with pytest.raises(ValueError):
        opt.load_state_dict({"state": {}})                                   # no groups
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict({**good, "param_groups": [{**good["param_groups"][0], "lr": 0}]})
    opt.step(make_closure(opt, [x], rosenbrock))
    sd = opt.state_dict()
    del sd["state"][0]["yty"]
    with pytest.raises(ValueError, match="yty"):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------------------- twins

@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_incremental_gram_matrices_equal_einsum_over_history(dtype, tol):
    """Twin of the incremental Gram update: after every step, ``S^T Y`` and ``Y^T Y`` kept by
    the optimiser equal an einsum over the stored ring buffer, well after the buffer wrapped
    around (more than 5 m pairs per cell). Tolerance: ``|G - G_ref|_ij <= tol ||a_i|| ||b_j||``
    (measured: 2e-15 in float64, 4e-7 in float32)."""
    n, P, m = 4, 24, 5
    gen = torch.Generator().manual_seed(9)
    model = MultiMLP(n, 2, 1, width=8, depth=2, activation="sine", omega_0=6.0,
                     generator=gen, dtype=dtype)
    x = (torch.rand(n, P, 2, generator=gen, dtype=F64) * 2 - 1).to(dtype)
    y = torch.sin(5 * x[..., :1]) * torch.cos(4 * x[..., 1:])
    opt = BatchedLBFGS(model.parameters(), max_eval=1, history_size=m)

    def closure():
        opt.zero_grad()
        loss = ((model.forward_dense(x) - y) ** 2).mean(dim=(1, 2))
        loss.sum().backward()
        return loss
    kept = torch.zeros(n, dtype=torch.long)
    prev_ptr = None
    for _ in range(40):
        opt.step(closure)
        st = opt.state_dict()["state"][0]
        if prev_ptr is not None:
            kept += (st["ptr"] != prev_ptr).long()             # ptr moves iff a pair is kept
        prev_ptr = st["ptr"]
        S, Y = st["sy"][:, :, 0].double(), st["sy"][:, :, 1].double()
        s_norm, y_norm = S.norm(dim=2), Y.norm(dim=2)
        for got, a, b, an, bn in ((st["sty"], S, Y, s_norm, y_norm),
                                  (st["yty"], Y, Y, y_norm, y_norm)):
            ref = torch.einsum("nip,njp->nij", a, b)
            bound = tol * an[:, :, None] * bn[:, None, :]
            assert bool(((got - ref).abs() <= bound).all()), float((got - ref).abs().max())
    assert bool((kept > 5 * m).all()), kept
    assert bool(st["valid"].all())
    assert bool((opt.status()["status"] == 0).all())     # still running: no shortcut taken


# ------------------------------------------------------------------ a new objective (batch)

def _quadratic_cells(n=3, p=6, seed=0):
    """Per-cell SPD matrices ``A [n, p, p]`` (condition ~50) for f_B(x) = 1/2 (x-b)^T A (x-b)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, p, p, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(50.0), p, dtype=torch.float64).expand(n, p)
    return q @ torch.diag_embed(eig) @ q.transpose(1, 2)


def _batch_closure(opt, x, A, b):
    def closure():
        opt.zero_grad()
        r = x - b
        losses = 0.5 * torch.einsum("np,npq,nq->n", r, A, r)
        losses.sum().backward()
        return losses.detach()
    return closure


def test_same_batch_pairs_satisfy_the_secant_condition_on_a_quadratic():
    """Each batch moves the minimum (b) but keeps the curvature (A): every stored pair was
    measured within one batch, so y = A s holds for all of them, across batch changes."""
    A = _quadratic_cells()
    x = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    opt = BatchedLBFGS([x], history_size=20, max_eval=4)
    g = torch.Generator().manual_seed(1)
    for k in range(4):
        b = torch.randn(3, 6, generator=g, dtype=torch.float64)
        if k:
            opt.new_objective(keep_history=True)
        opt.step(_batch_closure(opt, x, A, b))
    st = opt.state_dict()["state"][0]
    valid = st["valid"]
    assert int(valid.sum()) >= 3 * 8                       # pairs from several batches
    s, y = st["sy"][:, :, 0], st["sy"][:, :, 1]
    As = torch.einsum("npq,nmq->nmp", A, s)
    err = (As - y).norm(dim=-1)[valid] / y.norm(dim=-1)[valid]
    assert float(err.max()) < 1e-10, float(err.max())


def test_new_objective_without_history_equals_a_new_optimiser():
    A = _quadratic_cells(seed=2)
    g = torch.Generator().manual_seed(3)
    b1, b2 = (torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    opt = BatchedLBFGS([x], history_size=5, max_eval=6)
    opt.step(_batch_closure(opt, x, A, b1))
    x_ref = x.detach().clone().requires_grad_(True)
    ref = BatchedLBFGS([x_ref], history_size=5, max_eval=6)
    opt.new_objective(keep_history=False)
    for _ in range(3):
        out = opt.step(_batch_closure(opt, x, A, b2))
        out_ref = ref.step(_batch_closure(ref, x_ref, A, b2))
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.detach(), x_ref.detach(), rtol=1e-10, atol=1e-12)


def test_kept_history_solves_the_next_batch_in_fewer_evaluations():
    """The curvature carries over: on the next batch the kept pairs give a near-Newton step."""
    A = _quadratic_cells(n=4, p=12, seed=4)
    g = torch.Generator().manual_seed(5)
    b1, b2 = (torch.randn(4, 12, generator=g, dtype=torch.float64) for _ in range(2))
    evals = {}
    for keep in (True, False):
        x = torch.zeros(4, 12, dtype=torch.float64, requires_grad=True)
        opt = BatchedLBFGS([x], history_size=30, max_eval=40)
        opt.step(_batch_closure(opt, x, A, b1))           # learns the curvature
        opt.new_objective(keep_history=keep)
        opt.param_groups[0]["max_eval"] = 1               # one evaluation per step from here
        n = 0
        while n < 60 and float((x.detach() - b2).abs().max()) >= 1e-6:
            opt.step(_batch_closure(opt, x, A, b2))
            n += 1
        evals[keep] = n
    assert evals[True] < evals[False], evals


def test_new_objective_before_the_first_step_is_a_no_op_and_kind_must_match():
    x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    opt = BatchedLBFGS([x], max_eval=2)
    opt.new_objective()                                    # nothing to restart yet
    A = _quadratic_cells(n=2, p=3)
    b = torch.ones(2, 3, dtype=torch.float64)
    opt.step(_batch_closure(opt, x, A, b))
    opt.new_objective()

    def coupled():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss.detach()
    with pytest.raises(ValueError, match="separable"):
        opt.step(coupled)


# ------------------------------------------------------------------ per-cell trust region

def test_max_step_bounds_every_cells_step_and_is_per_cell():
    """With ``line_search=None`` every step is ``lr`` times the direction, and ``max_step``
    caps each cell's direction in max-norm: no parameter moves more than ``lr * max_step``
    per step. A cell whose direction is already short is untouched; the batched run equals
    one run per cell (the cap is per cell)."""
    A = _quadratic_cells(n=3, p=6, seed=4)
    scale = torch.tensor([1e-4, 1.0, 30.0], dtype=F64)[:, None]   # far and near minima
    b = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=F64) * scale
    kw = dict(lr=0.5, history_size=5, max_eval=1, line_search=None, max_step=0.05)

    def run(cells, n_steps=12):
        x = torch.zeros(len(cells), 6, dtype=F64, requires_grad=True)
        opt = BatchedLBFGS([x], **kw)
        xs = [x.detach().clone()]
        for _ in range(n_steps):
            opt.step(_batch_closure(opt, x, A[cells], b[cells]))
            xs.append(x.detach().clone())
        return torch.stack(xs)
    batched = run([0, 1, 2])
    moves = (batched[1:] - batched[:-1]).abs().amax(-1)            # [steps, n]
    assert float(moves.max()) <= 0.5 * 0.05 * (1 + 1e-12)
    # (the first call only evaluates; the first move is steepest descent, at most lr in l1)
    assert float(moves[2:, 2].min()) > 0.5 * 0.05 * 0.99          # the far cell: capped
    assert float(moves[:, 0].max()) < 0.5 * 0.05 * 0.5             # the near one: not
    for k in range(3):
        torch.testing.assert_close(batched[:, k], run([k])[:, 0], rtol=0, atol=1e-12)


def test_max_step_large_changes_nothing_and_old_groups_load():
    """A trust region wider than every step gives the same iterates as none; a state saved
    by a group without ``max_step`` (before it existed) still loads and runs."""
    A = _quadratic_cells(seed=6)
    b = torch.randn(3, 6, generator=torch.Generator().manual_seed(7), dtype=F64)
    out = []
    for ms in (None, 1e6):
        x = torch.zeros(3, 6, dtype=F64, requires_grad=True)
        opt = BatchedLBFGS([x], history_size=5, max_eval=8, max_step=ms)
        opt.step(_batch_closure(opt, x, A, b))
        out.append((x.detach().clone(), opt.state_dict()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    sd = copy.deepcopy(out[0][1])
    del sd["param_groups"][0]["max_step"]
    x = torch.zeros(3, 6, dtype=F64, requires_grad=True)
    opt = BatchedLBFGS([x], history_size=5, max_eval=8)
    opt.load_state_dict(sd)
    opt.step(_batch_closure(opt, x, A, b))
