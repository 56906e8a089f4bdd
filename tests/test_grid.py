"""Tests of CellGrid (kilonerf_lbfgs.grid) and pack_samples (kilonerf_lbfgs.packing)."""
import math

import pytest
import torch

from kilonerf_lbfgs.grid import CellGrid
from kilonerf_lbfgs.packing import pack_samples

# (lo, hi, resolution) per dimension; deliberately odd sizes and offsets
GRIDS = {
    1: ([-0.5], [2.0], [7]),
    2: ([0.0, -1.0], [3.0, 1.5], [4, 3]),
    3: ([-1.0, 0.25, 2.0], [1.0, 1.0, 5.0], [3, 2, 5]),
    4: ([0.0, 0.0, -2.0, 1.0], [1.0, 2.0, 2.0, 1.5], [2, 3, 1, 4]),
}


def brute_force_ids(x, lo, hi, res):
    """Cell ids by counting, per axis, the interior cell boundaries that lie at or below the
    coordinate (upper face -> last cell); row-major with the last axis fastest."""
    ids = []
    for pt in x.tolist():
        cid = 0
        for a, v in enumerate(pt):
            size = (hi[a] - lo[a]) / res[a]
            k = sum(1 for j in range(1, res[a]) if v >= lo[a] + j * size)
            cid = cid * res[a] + k
        ids.append(cid)
    return torch.tensor(ids, dtype=torch.long)


def random_interior(n, lo, hi, gen):
    lo_t = torch.tensor(lo, dtype=torch.float64)
    hi_t = torch.tensor(hi, dtype=torch.float64)
    u = torch.rand(n, len(lo), generator=gen, dtype=torch.float64)
    return lo_t + u * (hi_t - lo_t)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_cell_of_matches_brute_force(d):
    lo, hi, res = GRIDS[d]
    grid = CellGrid(lo, hi, res)
    assert grid.dim == d
    assert grid.n_cells == math.prod(res)
    gen = torch.Generator().manual_seed(d)
    x = random_interior(300, lo, hi, gen)
    ids = grid.cell_of(x)
    assert ids.dtype == torch.long
    assert torch.equal(ids, brute_force_ids(x, lo, hi, res))
    # every cell of this small grid is hit, so the id layout is fully exercised
    assert set(ids.tolist()) == set(range(grid.n_cells))
    # the float32 path agrees too for points away from boundaries
    assert torch.equal(grid.cell_of(x.float()), brute_force_ids(x.float().double(), lo, hi, res))


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_row_major_ids_last_axis_fastest(d):
    lo, hi, res = GRIDS[d]
    grid = CellGrid(lo, hi, res)
    centers = grid.centers()
    # centres listed in id order must enumerate the per-axis indices like itertools.product
    import itertools
    expected = torch.tensor(list(itertools.product(*[range(r) for r in res])), dtype=torch.long)
    assert torch.equal(grid.cell_coords(torch.arange(grid.n_cells)), expected)
    lo_t = torch.tensor(lo, dtype=torch.float64)
    size = (torch.tensor(hi, dtype=torch.float64) - lo_t) / torch.tensor(res, dtype=torch.float64)
    torch.testing.assert_close(centers, lo_t + (expected.double() + 0.5) * size, rtol=0, atol=1e-12)
    assert torch.equal(grid.cell_of(centers), torch.arange(grid.n_cells))


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_local_coordinates_and_round_trip(d):
    lo, hi, res = GRIDS[d]
    grid = CellGrid(lo, hi, res)
    gen = torch.Generator().manual_seed(10 + d)
    x = random_interior(300, lo, hi, gen)
    # add the box corners and the cells' lower corners (points exactly on boundaries);
    # the upper corners are left out: see test_points_inside_the_box_are_never_outside
    blo, _ = grid.cell_bounds(torch.arange(grid.n_cells))
    x = torch.cat([x, blo, torch.tensor([lo, hi], dtype=torch.float64)])
    cell = grid.cell_of(x)
    local = grid.to_local(x, cell)
    assert local.dtype == torch.float64
    assert bool((local >= -1.0).all()) and bool((local <= 1.0).all())
    torch.testing.assert_close(grid.to_global(local, cell), x, rtol=0, atol=1e-12)
    # local coordinates are the affine map of the cell's box onto [-1, 1]^d
    clo, chi = grid.cell_bounds(cell)
    torch.testing.assert_close(local, 2 * (x - clo) / (chi - clo) - 1, rtol=0, atol=1e-12)
    # the centre of every cell maps to the origin
    c = grid.centers()
    torch.testing.assert_close(grid.to_local(c, torch.arange(grid.n_cells)),
                               torch.zeros_like(c), rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_upper_face_goes_to_last_cell(d):
    lo, hi, res = GRIDS[d]
    grid = CellGrid(lo, hi, res)
    gen = torch.Generator().manual_seed(20 + d)
    x = random_interior(50, lo, hi, gen)
    for a in range(d):
        xa = x.clone()
        xa[:, a] = hi[a]
        ijk = grid.cell_coords(grid.cell_of(xa))
        assert bool((ijk[:, a] == res[a] - 1).all())
        # the other axes are unaffected
        expected = brute_force_ids(xa, lo, hi, res)
        assert torch.equal(grid.cell_of(xa), expected)
    corner_hi = torch.tensor([hi], dtype=torch.float64)
    corner_lo = torch.tensor([lo], dtype=torch.float64)
    assert grid.cell_of(corner_hi).tolist() == [grid.n_cells - 1]
    assert grid.cell_of(corner_lo).tolist() == [0]
    # float32 input that is exactly the upper corner
    assert grid.cell_of(corner_hi.float()).tolist() == [grid.n_cells - 1]


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_outside_points_raise_or_are_marked(d):
    lo, hi, res = GRIDS[d]
    grid = CellGrid(lo, hi, res)
    gen = torch.Generator().manual_seed(30 + d)
    x = random_interior(4 * d + 3, lo, hi, gen)
    outside = torch.zeros(x.shape[0], dtype=torch.bool)
    # just above the upper face / just below the lower face on each axis, and far away.
    # A point just past the upper face of a non-first axis would land in the next row's
    # first cell if ids were wrapped.
    for a in range(d):
        x[4 * a, a] = hi[a] + 1e-9
        x[4 * a + 1, a] = lo[a] - 1e-9
        x[4 * a + 2, a] = hi[a] + 10 * (hi[a] - lo[a])
        x[4 * a + 3, a] = lo[a] - 0.6 * (hi[a] - lo[a])
        outside[4 * a: 4 * a + 4] = True
    assert torch.equal(grid.inside(x), ~outside)
    with pytest.raises(ValueError):
        grid.cell_of(x)
    with pytest.raises(ValueError):
        grid.cell_of(x, outside="raise")
    ids = grid.cell_of(x, outside="mark")
    assert bool((ids[outside] == -1).all())
    assert torch.equal(ids[~outside], brute_force_ids(x[~outside], lo, hi, res))
    # a single point just outside the upper face of the last axis (the fastest one)
    p = torch.tensor([[0.5 * (l + h) for l, h in zip(lo, hi)]], dtype=torch.float64)
    p[0, -1] = hi[-1] + 1e-6
    assert grid.cell_of(p, outside="mark").tolist() == [-1]
    with pytest.raises(ValueError):
        grid.cell_of(p)


def test_cell_of_wrong_dimension_raises():
    grid = CellGrid([0.0, 0.0], [1.0, 1.0], 2)
    with pytest.raises(ValueError):
        grid.cell_of(torch.zeros(3, 3))


@pytest.mark.parametrize("res", [3, 6, 7])
def test_points_inside_the_box_are_never_outside(res):
    grid = CellGrid([0.0], [1.0], [res])
    x = torch.tensor([[math.nextafter(1.0, 0.0)]], dtype=torch.float64)
    assert bool(grid.inside(x).all())
    assert grid.cell_of(x, outside="mark").tolist() == [res - 1]


def test_cell_upper_corners_are_inside_cells():
    grid = CellGrid([-1.0], [1.0], [3])
    _, bhi = grid.cell_bounds(torch.arange(3))
    assert bool(grid.inside(bhi).all())
    ids = grid.cell_of(bhi)                       # raises ValueError today
    assert bool((ids >= 0).all())


@pytest.mark.parametrize("lo,hi,res", [
    ([0.0, 0.0], [1.0, 1.0], [2, 0]),         # zero resolution
    ([0.0, 0.0], [1.0, 1.0], [2, -3]),        # negative resolution
    ([0.0], [1.0], 0),                        # int resolution, non-positive
    ([0.0, 0.0], [1.0, 0.0], [2, 2]),         # hi == lo on one axis
    ([0.0, 1.0], [1.0, 0.5], [2, 2]),         # hi < lo on one axis
    ([0.0, 0.0], [1.0, 1.0, 1.0], [2, 2]),    # lo / hi lengths differ
    ([0.0, 0.0], [1.0, 1.0], [2, 2, 2]),      # resolution length differs
    ([0.0, 0.0], [1.0, 1.0], [2]),            # resolution too short
    ([], [], []),                             # empty box
])
def test_invalid_construction_raises(lo, hi, res):
    with pytest.raises(ValueError):
        CellGrid(lo, hi, res)


def test_int_resolution_broadcasts():
    grid = CellGrid([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], 4)
    assert grid.resolution == (4, 4, 4)
    assert grid.n_cells == 64


# ---------------------------------------------------------------------------- packing

def pixel_image(h, w, c, seed):
    """Pixel centres of an h x w image in the box [0, h] x [0, w] and random values."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    coords = torch.stack([rows + 0.5, cols + 0.5], -1).reshape(-1, 2)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(h * w, c, generator=gen, dtype=torch.float64)
    return coords, values


def check_packing(packed, coords, values, grid):
    n_cells = grid.n_cells
    M = coords.shape[0]
    P = packed.x.shape[1]
    assert packed.n_samples == M
    assert packed.x.shape == (n_cells, P, 2) and packed.y.shape == (n_cells, P, values.shape[1])
    assert packed.index.shape == (n_cells, P)
    # every sample appears exactly once
    idx = packed.index[packed.index >= 0]
    assert sorted(idx.tolist()) == list(range(M))
    # counts: brute force
    cell = grid.cell_of(coords)
    expected_counts = torch.tensor([int((cell == c).sum()) for c in range(n_cells)])
    assert torch.equal(packed.counts, expected_counts)
    assert P == int(expected_counts.max())
    for c in range(n_cells):
        row = packed.index[c]
        k = int(expected_counts[c])
        # real samples first, then padding; they belong to cell c
        assert bool((row[:k] >= 0).all()) and bool((row[k:] == -1).all())
        assert bool((cell[row[:k]] == c).all())
        # targets and local coordinates of real samples
        assert torch.equal(packed.y[c, :k], values[row[:k]])
        torch.testing.assert_close(packed.x[c, :k],
                                   grid.to_local(coords[row[:k]], cell[row[:k]]),
                                   rtol=0, atol=1e-12)
        assert bool((packed.x[c, k:] == 0).all()) and bool((packed.y[c, k:] == 0).all())
    # unpack of the packed targets is the original array, exactly
    assert torch.equal(packed.unpack(packed.y), values)


def test_pack_samples_uneven_round_trip():
    h, w = 7, 5
    coords, values = pixel_image(h, w, 3, seed=0)
    grid = CellGrid([0.0, 0.0], [float(h), float(w)], [2, 3])
    # feed the samples in a shuffled order so that `index` is not the identity
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(1))
    coords, values = coords[perm], values[perm]
    packed = pack_samples(coords, values, grid, dtype=torch.float64)
    check_packing(packed, coords, values, grid)
    counts = packed.counts
    assert len(set(counts.tolist())) > 1          # really uneven
    assert packed.mask is not None
    assert packed.mask.shape == packed.index.shape
    assert torch.equal(packed.mask, (packed.index >= 0).to(packed.mask.dtype))
    assert set(packed.mask.unique().tolist()) == {0.0, 1.0}
    # select() keeps rows of the listed cells
    sel = torch.tensor([4, 0])
    sub = packed.select(sel)
    assert torch.equal(sub.index, packed.index[sel]) and torch.equal(sub.y, packed.y[sel])
    assert torch.equal(sub.counts, packed.counts[sel])


def test_pack_samples_even_layout_has_no_mask():
    h, w = 6, 6
    coords, values = pixel_image(h, w, 2, seed=2)
    grid = CellGrid([0.0, 0.0], [float(h), float(w)], [2, 3])
    packed = pack_samples(coords, values, grid, dtype=torch.float64)
    check_packing(packed, coords, values, grid)
    assert packed.mask is None
    assert bool((packed.counts == 6).all())
    assert bool((packed.index >= 0).all())


def test_pack_samples_default_dtype_is_float32_and_rows_checked():
    coords, values = pixel_image(3, 4, 1, seed=3)
    grid = CellGrid([0.0, 0.0], [3.0, 4.0], [1, 2])
    packed = pack_samples(coords, values, grid)
    assert packed.x.dtype == torch.float32 and packed.y.dtype == torch.float32
    torch.testing.assert_close(packed.unpack(packed.y), values.float(), rtol=0, atol=0)
    with pytest.raises(ValueError):
        pack_samples(coords, values[:-1], grid)


def test_regrouped_losses_and_gradients_equal_the_padded_layout():
    from kilonerf_lbfgs.multinet import MultiMLP
    from kilonerf_lbfgs.packing import per_cell_mse, regroup
    from kilonerf_lbfgs.problems import PackedMSEProblem
    g = torch.Generator().manual_seed(0)
    grid = CellGrid([0.0, 0.0], [1.0, 1.0], [3, 3])
    # very uneven: most points crowd into one corner cell, one cell stays empty
    crowd = torch.rand(900, 2, generator=g) * 0.3
    rest = torch.rand(200, 2, generator=g) * torch.tensor([1.0, 0.6])
    pts = torch.cat([crowd, rest]).double()
    vals = torch.sin(6 * pts).float()
    packed = pack_samples(pts, vals, grid)
    assert int((packed.counts == 0).sum()) >= 1 and packed.mask is not None
    problem = PackedMSEProblem(packed)
    assert problem.groups is not None                     # uneven enough to regroup
    assert problem.groups.mask.numel() < 1.5 * int(packed.counts.sum())
    model = MultiMLP(9, 2, 2, 16, 2, generator=torch.Generator().manual_seed(1))
    fast = problem.loss_and_backward(model)
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = per_cell_mse(model.forward_dense(packed.x), packed)
    ref.sum().backward()
    torch.testing.assert_close(fast, ref.detach(), rtol=1e-5, atol=1e-7)
    for a, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    # every real sample appears exactly once in the groups
    gr = regroup(packed, max_group=50)
    assert int(gr.mask.sum()) == int(packed.counts.sum())
    assert int(gr.mask.sum(1).max()) <= 50
    per_cell = torch.zeros(9).index_add(0, gr.cells, gr.mask.sum(1))
    assert torch.equal(per_cell.long(), packed.counts)
