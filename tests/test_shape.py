"""The shape adapter: labels, round trip, metrics on a sphere, a tiny fit, the script."""
import json
import os

import numpy as np
import pytest
import torch
import trimesh

from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.signals.shape import (inside_mesh, iou, make_shape_problem,
                                          normalize_mesh, sample_points, signed_distance,
                                          torus_knot_mesh)
from kilonerf_lbfgs.signals.shape_export import chamfer, extract_mesh, field_volume

C, R = np.array([0.5, 0.5, 0.5]), 0.3


def sphere_mesh(subdiv=4):
    m = trimesh.creation.icosphere(subdiv, radius=R)
    m.apply_translation(C)
    return m


def sphere_sdf(p):
    return np.linalg.norm(p - C, axis=1) - R


def test_normalize_into_unit_box_with_margin():
    m = normalize_mesh(torus_knot_mesh(), margin=0.05)
    lo, hi = m.bounds
    assert lo.min() >= 0.05 - 1e-9 and hi.max() <= 0.95 + 1e-9
    assert np.isclose((hi - lo).max(), 0.9)
    assert m.is_watertight


def test_labels_on_a_sphere_with_a_hole():
    """Winding numbers give the right side even with faces removed (a small hole)."""
    m = sphere_mesh(3)
    holed = trimesh.Trimesh(m.vertices, m.faces[3:], process=False)
    assert not holed.is_watertight
    p = sample_points(m, 4000, near_fraction=0.0, seed=1)
    truth = sphere_sdf(p) < 0
    assert (inside_mesh(holed, p) == truth).mean() > 0.99
    sd = signed_distance(m, p)
    assert np.abs(sd - sphere_sdf(p)).max() < 0.01          # polygonal sphere


def test_every_point_in_exactly_one_cell_and_back():
    prob = make_shape_problem(sphere_mesh(2), (3, 2, 2), n_points=3000, n_eval=1000)
    idx = prob.packed.index[prob.packed.index >= 0]
    assert sorted(idx.tolist()) == list(range(3000))
    cells = torch.arange(prob.n_cells)[:, None].expand_as(prob.packed.index)
    keep = prob.packed.index >= 0
    back = prob.grid.to_global(prob.packed.x[keep].double(), cells[keep])
    pts = sample_points(sphere_mesh(2), 3000, 0.5, 0.01, 0)
    np.testing.assert_allclose(back.numpy(), pts[prob.packed.index[keep].numpy()], atol=1e-6)


def test_metrics_of_a_perfect_fit_on_a_sphere():
    """The analytic SDF as the 'fit': IoU 1 against itself and ~1 against the mesh labels;
    its marching-cubes surface is within a tiny Chamfer distance of the sphere mesh."""
    mesh = sphere_mesh(5)
    p = sample_points(mesh, 20000, near_fraction=0.0, seed=3)
    assert iou(sphere_sdf(p) < 0, sphere_sdf(p) < 0) == 1.0
    assert iou(sphere_sdf(p) < 0, inside_mesh(mesh, p)) > 0.995
    fitted = extract_mesh(field_volume(sphere_sdf, 64), 0.0, inside_is_low=True)
    assert fitted.is_watertight and fitted.volume > 0          # outward normals
    assert chamfer(fitted, mesh, n=20000) < 4e-3             # point-sampling noise level
    far = trimesh.creation.icosphere(3, radius=0.1)
    assert chamfer(far, mesh, n=5000) > 0.05


def test_problem_quality_of_a_perfect_model_is_one():
    mesh = sphere_mesh(5)
    prob = make_shape_problem(mesh, (2, 2, 2), "sdf", n_points=2000, n_eval=5000)

    class Analytic:                                         # an exact 'network' per cell
        def forward_dense(self, x, cells=None):
            n, k = x.shape[:2]
            ids = torch.arange(n)[:, None].expand(n, k).reshape(-1)
            g = prob.grid.to_global(x.reshape(-1, 3).double(), ids).numpy()
            return torch.as_tensor(sphere_sdf(g)).reshape(n, k, 1)

    prob.model = Analytic()
    assert prob.quality(torch.zeros(prob.n_cells)) > 0.995


@pytest.mark.parametrize("target,bar", [("occupancy", 0.95), ("sdf", 0.95)])
def test_tiny_shape_fit_reaches_stated_iou(target, bar):
    """A sphere, 2x2x2 cells, 6000 points, sine 2x32 (omega_0 5): IoU >= 0.95."""
    prob = make_shape_problem(sphere_mesh(3), (2, 2, 2), target, n_points=6000, n_eval=4000)
    model = MultiMLP(8, 3, 1, 32, 2, omega_0=5.0, generator=torch.Generator().manual_seed(0))
    res = fit(model, prob, FitConfig(max_seconds=600, max_evals=100, target=bar, progress=False))
    assert res.reached_target, res.quality


def test_fit_shape_script_outputs(script, tmp_path):
    out = tmp_path / "run"
    r = script("fit_shape.py", "--grid", 2, 2, 2, "--points", 5000, "--eval_points", 3000,
               "--width", 16, "--depth", 2, "--resolution", 40, "--max_seconds", 2,
               "--out_dir", out, "--no_progress")
    assert r.returncode == 0, r.stderr
    for f in ("metrics.json", "mesh.ply", "preview.png", "checkpoint.pt"):
        assert os.path.isfile(out / f), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["modality"] == "shape" and 0 < m["iou"] <= 1 and m["chamfer"] > 0
    ply = trimesh.load(out / "mesh.ply", force="mesh")
    assert len(ply.vertices) == m["mesh_vertices"] and 100 < len(ply.vertices) < 40 ** 3
