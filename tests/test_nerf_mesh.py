"""Mesh export: marching cubes on a density, slab by slab, against an analytic sphere; the
demo object's analytic surface."""
import numpy as np
import pytest
import torch

from kilonerf_lbfgs.nerf.data.demo_scene import demo_sdf, demo_surface_points
from kilonerf_lbfgs.nerf.mesh import chamfer_to_surface, density_volume, extract_mesh

BOX = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
R = 0.6


def sphere_density(x):
    """100 inside, 0 outside, a smooth shell of width ~0.02 at radius R: the level 50 is
    the sphere."""
    return 100.0 * torch.sigmoid((R - x.double().norm(dim=-1)) / 0.01)


def test_slabs_do_not_change_the_volume():
    a = density_volume(sphere_density, BOX, 20, slab=1)
    b = density_volume(sphere_density, BOX, 20, slab=64)
    np.testing.assert_array_equal(a, b)
    occupied = lambda x: x[:, 0] > 0                              # noqa: E731
    c = density_volume(sphere_density, BOX, 20, occupied=occupied, slab=3)
    assert np.all(c[:10] == 0) and np.array_equal(c[10:], a[10:])


def test_sphere_mesh_is_the_level_set_with_the_field_colour():
    red = lambda x, d: torch.tensor([1.0, 0.0, 0.0]).expand(x.shape[0], 3)   # noqa: E731
    mesh = extract_mesh(sphere_density, BOX, 64, 50.0, color=red, slab=5)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - R).max() < 0.01                            # a third of a voxel
    assert mesh.is_watertight and mesh.volume > 0                 # normals point outwards
    assert np.all(mesh.visual.vertex_colors[:, :3] == [255, 0, 0])
    u = np.random.default_rng(0).normal(size=(5000, 3))
    surface = R * u / np.linalg.norm(u, axis=1, keepdims=True)
    cd, _, _ = chamfer_to_surface(mesh, surface,
                                  lambda p: np.linalg.norm(p, axis=1) - R, n=5000)
    assert cd < 0.005
    with pytest.raises(ValueError, match="never crosses"):
        extract_mesh(sphere_density, BOX, 16, 1000.0)


def test_demo_surface_points_lie_on_the_object():
    p = demo_surface_points(4000, seed=1)
    assert 3000 < len(p) <= 4004 and np.abs(demo_sdf(p)).max() < 1e-9
    assert np.all(np.abs(p) <= 1.0)
    # points pushed along the outward direction of the union are outside it
    assert demo_sdf(np.array([[0.0, 0.0, 0.95]]))[0] > 0
    assert demo_sdf(np.array([[-0.35, -0.3, 0.1]]))[0] == pytest.approx(-0.45)
