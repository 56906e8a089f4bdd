"""Tests of MultiMLP (kilonerf_lbfgs.multinet) against per-cell nn.Sequential references."""
import math

import pytest
import torch
from torch import nn

from kilonerf_lbfgs.multinet import MultiMLP, pack_by_cell

ACTS = ("sine", "gaussian", "relu_pe")
ATOL = 1e-10


def make_model(activation, n_cells=5, d_in=3, d_out=2, width=8, depth=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # sigma=0.5 / omega_0=3 keep the outputs O(1) so that the comparisons are meaningful
    return MultiMLP(n_cells, d_in, d_out, width=width, depth=depth, activation=activation,
                    omega_0=3.0, sigma=0.5, pe_freqs=3, generator=gen, dtype=torch.float64)


def reference_ragged(model, x, cell):
    """Loop over cells with the per-cell nn.Sequential."""
    out = torch.full((x.shape[0], model.d_out), float("nan"), dtype=x.dtype)
    for c in range(model.n_cells):
        sel = cell == c
        if bool(sel.any()):
            out[sel] = model.cell_module(c)(x[sel])
    return out


def reference_dense(model, x, cells=None):
    cells = range(model.n_cells) if cells is None else cells.tolist()
    return torch.stack([model.cell_module(c)(x[i]) for i, c in enumerate(cells)])


def test_cell_module_is_plain_sequential():
    model = make_model("relu_pe")
    seq = model.cell_module(2)
    assert isinstance(seq, nn.Sequential)
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    assert len(linears) == model.depth + 1
    # a copy, not a view: editing it leaves the MultiMLP alone
    before = model.weights[0][2].detach().clone()
    with torch.no_grad():
        linears[0].weight.add_(1.0)
    assert torch.equal(model.weights[0][2].detach(), before)


def test_cell_module_by_hand():
    """The per-cell reference itself, checked against a hand-written sine MLP."""
    model = make_model("sine", depth=2)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(7, model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
    c = 3
    h = x
    for layer, (w, b) in enumerate(zip(model.weights, model.biases)):
        h = h @ w[c] + b[c]
        if layer < len(model.weights) - 1:
            h = torch.sin(3.0 * h)
    with torch.no_grad():
        torch.testing.assert_close(model.cell_module(c)(x), h.detach(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("activation", ACTS)
def test_ragged_forward_matches_per_cell_loop(activation):
    model = make_model(activation, n_cells=6)
    gen = torch.Generator().manual_seed(1)
    # cells 1 and 4 get no points; the others different counts; order shuffled
    counts = {0: 5, 2: 1, 3: 9, 5: 4}
    cell = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in counts.items()])
    perm = torch.randperm(cell.numel(), generator=gen)
    cell = cell[perm]
    x = torch.rand(cell.numel(), model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        out = model(x, cell)
        ref = reference_ragged(model, x, cell)
    assert out.shape == (cell.numel(), model.d_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    # the same points in a different order give the same per-point outputs
    perm2 = torch.randperm(cell.numel(), generator=gen)
    with torch.no_grad():
        out2 = model(x[perm2], cell[perm2])
    torch.testing.assert_close(out2, out[perm2], rtol=0, atol=ATOL)


@pytest.mark.parametrize("activation", ACTS)
def test_ragged_forward_all_points_in_one_cell(activation):
    model = make_model(activation, n_cells=4)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(11, model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
    for c in (0, 3):
        cell = torch.full((11,), c, dtype=torch.long)
        with torch.no_grad():
            out = model(x, cell)
            ref = model.cell_module(c)(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("activation", ACTS)
def test_ragged_forward_no_points(activation):
    model = make_model(activation)
    x = torch.zeros(0, model.d_in, dtype=torch.float64)
    out = model(x, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, model.d_out)
    assert out.dtype == torch.float64


def test_ragged_forward_rejects_bad_cell_ids():
    model = make_model("sine", n_cells=3)
    x = torch.zeros(2, model.d_in, dtype=torch.float64)
    with pytest.raises(ValueError):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        model(x, torch.tensor([-1, 0]))


def test_pack_by_cell_layout():
    cell = torch.tensor([3, 0, 3, 3, 1, 0, 3])
    pk = pack_by_cell(cell, 5, max_group=0)
    assert pk.cells.tolist() == [0, 1, 3]
    assert pk.counts.tolist() == [2, 1, 4] and pk.width == 4 and pk.n_groups == 3
    # stable: within a cell, points keep their input order
    assert pk.order.tolist() == [1, 5, 4, 0, 2, 3, 6]
    assert torch.equal(pk.cells[pk.group], cell[pk.order])
    assert pk.slot.tolist() == [0, 1, 0, 0, 1, 2, 3]


def test_pack_by_cell_splits_large_cells():
    cell = torch.tensor([3, 0, 3, 3, 1, 0, 3, 3])
    pk = pack_by_cell(cell, 5, max_group=2)
    # cell 3 has 5 points -> groups of 2, 2, 1; the others fit in one group
    assert pk.cells.tolist() == [0, 1, 3, 3, 3]
    assert pk.counts.tolist() == [2, 1, 2, 2, 1] and pk.width == 2
    assert torch.equal(pk.cells[pk.group], cell[pk.order])
    assert int(pk.slot.max()) < 2
    # every point lands in exactly one (group, slot)
    keys = pk.group * pk.width + pk.slot
    assert keys.unique().numel() == cell.numel()


@pytest.mark.parametrize("max_group", [None, 0, 1, 3])
def test_ragged_forward_split_groups_match_per_cell(max_group):
    model = make_model("sine", n_cells=4)
    gen = torch.Generator().manual_seed(5)
    cell = torch.tensor([2] * 9 + [0, 3, 3])
    x = torch.rand(cell.numel(), model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        out = model(x, cell, max_group=max_group)
        ref = torch.cat([model.cell_module(int(c))(x[i:i + 1]) for i, c in enumerate(cell)])
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("activation", ACTS)
def test_forward_dense_matches_per_cell_loop(activation):
    model = make_model(activation, n_cells=4)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 6, model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        out = model.forward_dense(x)
        ref = reference_dense(model, x)
    assert out.shape == (4, 6, model.d_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("activation", ACTS)
def test_forward_dense_shared_points_and_subsets(activation):
    model = make_model(activation, n_cells=5)
    gen = torch.Generator().manual_seed(4)
    pts = torch.rand(6, model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        full = model.forward_dense(pts.expand(5, -1, -1).contiguous())
        # shared points, given as [P, d] and as [1, P, d]
        torch.testing.assert_close(model.forward_dense(pts), full, rtol=0, atol=ATOL)
        torch.testing.assert_close(model.forward_dense(pts[None]), full, rtol=0, atol=ATOL)
        torch.testing.assert_close(full, reference_dense(model, pts.expand(5, -1, -1)),
                                   rtol=0, atol=ATOL)
        # a subset of cells (unsorted, with its own points per cell)
        cells = torch.tensor([4, 1, 2])
        xs = torch.rand(3, 6, model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
        xall = torch.zeros(5, 6, model.d_in, dtype=torch.float64)
        xall[cells] = xs
        sub = model.forward_dense(xs, cells=cells)
        torch.testing.assert_close(sub, model.forward_dense(xall)[cells], rtol=0, atol=ATOL)
        torch.testing.assert_close(sub, reference_dense(model, xs, cells), rtol=0, atol=ATOL)
        # a subset with shared points
        torch.testing.assert_close(model.forward_dense(pts, cells=cells), full[cells],
                                   rtol=0, atol=ATOL)
        # a single-cell subset
        one = torch.tensor([3])
        torch.testing.assert_close(model.forward_dense(pts, cells=one), full[one],
                                   rtol=0, atol=ATOL)
        # wrong number of groups
        with pytest.raises(ValueError):
            model.forward_dense(torch.zeros(3, 6, model.d_in, dtype=torch.float64))


@pytest.mark.parametrize("activation", ACTS)
def test_gradients_are_per_cell(activation):
    model = make_model(activation, n_cells=4)
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(4, 7, model.d_in, generator=gen, dtype=torch.float64) * 2 - 1
    y = torch.randn(4, 7, model.d_out, generator=gen, dtype=torch.float64)
    # weight the cells differently so that a gradient leaking between cells would show
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    loss_cells = ((model.forward_dense(x) - y) ** 2).sum(dim=(1, 2)) * scale
    model.zero_grad()
    loss_cells.sum().backward()
    for c in range(4):
        seq = model.cell_module(c)
        loss = ((seq(x[c]) - y[c]) ** 2).sum() * scale[c]
        loss.backward()
        linears = [m for m in seq if isinstance(m, nn.Linear)]
        for layer, lin in enumerate(linears):
            torch.testing.assert_close(model.weights[layer].grad[c], lin.weight.grad.T,
                                       rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(model.biases[layer].grad[c], lin.bias.grad,
                                       rtol=1e-10, atol=1e-12)
    # the ragged path gives the same gradients
    grads_dense = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cell = torch.arange(4).repeat_interleave(7)
    perm = torch.randperm(28, generator=gen)
    out = model(x.reshape(28, -1)[perm], cell[perm])
    ((out - y.reshape(28, -1)[perm]) ** 2 * scale[cell[perm], None]).sum().backward()
    for g_dense, p in zip(grads_dense, model.parameters()):
        torch.testing.assert_close(p.grad, g_dense, rtol=1e-10, atol=1e-12)


def test_gradient_of_one_cell_touches_only_that_cell():
    model = make_model("sine", n_cells=4)
    x = torch.rand(4, 5, model.d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    model.forward_dense(x)[2].pow(2).sum().backward()
    for p in model.parameters():
        others = torch.cat([p.grad[:2], p.grad[3:]])
        assert bool((others == 0).all())
        assert bool((p.grad[2] != 0).any())


# ------------------------------------------------------------------ SIREN statistics

def layer_statistics(model, x, weight_scale=1.0, bias_scale=1.0):
    """Std of omega_0 * pre-activation and of the post-activation of every hidden layer,
    computed by walking ``model.weights`` / ``model.biases`` / ``model.act`` by hand; the
    hidden layers' (not the first layer's) weights and biases are scaled."""
    h = x.expand(model.n_cells, -1, -1)
    pre_std, post_std = [], []
    n_layers = len(model.weights)
    with torch.no_grad():
        for layer in range(n_layers - 1):
            w, b = model.weights[layer], model.biases[layer]
            if layer > 0:
                w, b = w * weight_scale, b * bias_scale
            z = torch.bmm(h, w) + b[:, None, :]
            h = model.act(z)
            pre_std.append(float((model.omega_0 * z).std()))
            post_std.append(float(h.std()))
    return pre_std, post_std


@pytest.fixture(scope="module")
def siren():
    gen = torch.Generator().manual_seed(0)
    width, omega = 256, 30.0
    model = MultiMLP(4, 2, 1, width=width, depth=6, activation="sine", omega_0=omega,
                     generator=gen, dtype=torch.float64)
    x = torch.rand(2048, 2, generator=gen, dtype=torch.float64) * 2 - 1
    return model, x


def test_siren_init_bounds(siren):
    model, _ = siren
    omega = model.omega_0
    w0 = model.weights[0].detach()
    assert float(w0.abs().max()) <= 1.0 / 2 and float(w0.abs().max()) > 0.45
    for w in list(model.weights)[1:]:
        w = w.detach()
        bound = math.sqrt(6.0 / w.shape[1]) / omega
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.95 * bound
        # uniform: std = bound / sqrt(3)
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.02 * bound
    # every cell is initialised (not one cell copied)
    assert not torch.equal(model.weights[1][0], model.weights[1][1])


def test_siren_activation_statistics_are_stable(siren):
    model, x = siren
    omega, width = model.omega_0, model.width
    pre, post = layer_statistics(model, x)
    assert len(post) == model.depth
    # arcsine-distributed activations: std 1/sqrt(2) ~ 0.707 in every hidden layer
    for s in post:
        assert 0.5 < s < 0.9, post
    # pre-activations of the hidden layers (after the first): omega * W h has variance
    # width * (2 / width) * 0.5 = 1 (SIREN), plus the bias U(+-1/sqrt(width)) * omega
    expected = math.sqrt(1.0 + (omega / math.sqrt(width)) ** 2 / 3.0)
    for s in pre[1:]:
        assert abs(s - expected) < 0.1 * expected, (pre, expected)


def test_siren_statistics_test_detects_bad_initialisations(siren):
    """Sanity check of the test above: badly scaled hidden layers leave its bands."""
    model, x = siren
    omega, width = model.omega_0, model.width
    expected = math.sqrt(1.0 + (omega / math.sqrt(width)) ** 2 / 3.0)
    # weights x10: sin of huge pre-activations is still arcsine-like (post std ~0.707),
    # but the pre-activation spread explodes
    pre, _ = layer_statistics(model, x, weight_scale=10.0)
    assert all(abs(s - expected) > 0.1 * expected for s in pre[1:]), pre
    # weights and biases x0.1: the activations collapse layer after layer
    _, post = layer_statistics(model, x, weight_scale=0.1, bias_scale=0.1)
    assert all(not (0.5 < s < 0.9) for s in post[1:]), post


# ------------------------------------------------------------------ arguments

@pytest.mark.parametrize("kwargs,name", [
    (dict(activation="tanh"), "tanh"),
    (dict(width=0), "width"),
    (dict(width=-3), "width"),
    (dict(depth=0), "depth"),
    (dict(depth=-1), "depth"),
])
def test_invalid_arguments(kwargs, name):
    args = dict(n_cells=2, d_in=2, d_out=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        MultiMLP(**args)


def test_params_per_cell():
    model = MultiMLP(3, 2, 4, width=5, depth=2, activation="sine")
    assert model.params_per_cell == (2 * 5 + 5) + (5 * 5 + 5) + (5 * 4 + 4)
    pe = MultiMLP(3, 2, 4, width=5, depth=1, activation="relu_pe", pe_freqs=3)
    assert pe.params_per_cell == (2 * 7 * 5 + 5) + (5 * 4 + 4)


@pytest.mark.parametrize("activation", ["sine", "gaussian", "relu_pe"])
@pytest.mark.parametrize("layout", ["own", "shared", "subset", "ragged"])
def test_chunked_forward_equals_one_call_forward_and_backward(activation, layout):
    """Cache-sized chunks of cells (the CPU default) against one batched call
    (``chunk_bytes = 0``): the same outputs and the same gradients of every parameter."""
    torch.manual_seed(0)
    n, p = 23, 37
    nets = {}
    for name, chunk_bytes in (("one", 0), ("chunked", 4 * 16 * p * 3)):     # 3 cells a chunk
        net = MultiMLP(n, 3, 2, 16, 2, activation, omega_0=20.0,
                       generator=torch.Generator().manual_seed(1))
        net.chunk_bytes = chunk_bytes
        nets[name] = net
    assert nets["chunked"]._chunk_cells(p, "cpu") == 3
    g = torch.Generator().manual_seed(2)
    x_own = torch.rand(n, p, 3, generator=g) * 2 - 1
    cells = torch.tensor([4, 0, 22, 7, 7, 3, 15, 9, 1, 11])
    x_sub = torch.rand(len(cells), p, 3, generator=g) * 2 - 1
    pts = torch.rand(400, 3, generator=g) * 2 - 1
    cell_of = torch.randint(0, n, (400,), generator=g)
    outs = {}
    for name, net in nets.items():
        if layout == "own":
            y = net.forward_dense(x_own)
        elif layout == "shared":
            y = net.forward_dense(x_own[:1])
        elif layout == "subset":
            y = net.forward_dense(x_sub, cells)
        else:
            y = net(pts, cell_of, max_group=20)
        (y.sin() * torch.linspace(0.5, 1.5, y.numel()).view_as(y)).sum().backward()
        outs[name] = (y.detach(), [q.grad.clone() for q in net.parameters()])
    torch.testing.assert_close(outs["chunked"][0], outs["one"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs["chunked"][1], outs["one"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_chunks_are_cache_sized_and_cuda_takes_one_call():
    from kilonerf_lbfgs.backends import CPU_CHUNK_BYTES, dense_chunk_bytes
    net = MultiMLP(256, 2, 3, 32, 3)
    assert net._chunk_cells(1024, "cpu") == CPU_CHUNK_BYTES // (4 * 32 * 1024)
    assert dense_chunk_bytes("cuda") == 0 and dense_chunk_bytes("cpu") == CPU_CHUNK_BYTES
    net.chunk_bytes = 0
    assert net._chunk_cells(1024, "cpu") >= 256


@pytest.mark.cuda
def test_cuda_model_from_a_cpu_generator_starts_where_the_cpu_model_does():
    # the pipelines seed a CPU generator whatever the device; CUDA weights draw on it too
    kw = dict(activation="sine", omega_0=30.0)
    cpu = MultiMLP(5, 3, 4, 16, 2, generator=torch.Generator().manual_seed(3), **kw)
    gpu = MultiMLP(5, 3, 4, 16, 2, generator=torch.Generator().manual_seed(3), device="cuda",
                   **kw)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(a, b.cpu())
