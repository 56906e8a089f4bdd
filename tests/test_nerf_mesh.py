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


def test_a_scene_rendered_from_a_mesh_loads_like_the_demo(tmp_path):
    """A sphere of radius 0.8 (the mesh is scaled to a longest side of 1.6) seen from 4 units
    away covers the disc the pinhole geometry predicts; the scene loads as Blender data."""
    import math
    import trimesh
    from kilonerf_lbfgs.nerf.data.demo_scene import CAMERA_ANGLE_X
    from kilonerf_lbfgs.nerf.data.loaders import load_dataset
    from kilonerf_lbfgs.nerf.data.mesh_scene import generate_mesh_scene
    out = generate_mesh_scene(trimesh.creation.icosphere(4, radius=3.0), str(tmp_path / "s"),
                              size=32, n_train=3, n_test=2)
    data = load_dataset(out)
    assert len(data["train"]) == 3 and len(data["test"]) == 2 and data["train"].W == 32
    import imageio.v3 as iio
    alpha = iio.imread(tmp_path / "s" / "test" / "r_0.png")[..., 3] / 255.0
    # the sphere's silhouette: a disc of angular radius asin(0.8 / 4)
    f = 0.5 * 32 / math.tan(0.5 * CAMERA_ANGLE_X)
    r_px = f * math.tan(math.asin(0.8 / 4.0))
    assert alpha.sum() == pytest.approx(math.pi * r_px ** 2, rel=0.03)
    assert alpha[0, 0] == 0 and alpha[16, 16] == 1
