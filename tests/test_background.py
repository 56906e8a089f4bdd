"""The learned background: direction mapping, sampling, wrap-around, fitting, and its path
through rendering, training and checkpoints."""
import math

import numpy as np
import pytest
import torch

from conftest import REPO  # noqa: F401  (puts the repository on the path)
from kilonerf_lbfgs.nerf.cli import load_trained
from kilonerf_lbfgs.nerf.data.demo_scene import generate_demo_scene
from kilonerf_lbfgs.nerf.data.loaders import load_dataset
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.fields.background import BackgroundMap, direction_to_equirect
from kilonerf_lbfgs.nerf.fields.kilonerf import KiloNeRFField
from kilonerf_lbfgs.nerf.render.marcher import Marcher
from kilonerf_lbfgs.nerf.render.rendering import RenderSettings, render_rays
from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions, NerfPipeline


def sphere(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)


def test_directions_map_to_longitude_and_latitude():
    d = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, -1.0], [-1.0, 1e-9, 0]])
    uv = direction_to_equirect(d)
    assert torch.allclose(uv[:, 0], torch.tensor([0.0, 0.5, 0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(uv[:, 1], torch.tensor([0.0, 0.0, -1.0, 1.0, 0.0]), atol=1e-6)


def test_map_returns_its_texels_and_wraps_around_in_longitude():
    bg = BackgroundMap(height=4)
    with torch.no_grad():
        bg.logits.copy_(torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1)))
    H, W = 4, 8
    # the direction through the centre of texel (row i, column j) returns that texel
    for i, j in [(0, 0), (1, 5), (3, 7), (2, 3)]:
        lon = ((j + 0.5) / W * 2 - 1) * math.pi
        lat = -((i + 0.5) / H * 2 - 1) * 0.5 * math.pi
        d = torch.tensor([[math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon),
                           math.sin(lat)]])
        assert torch.allclose(bg(d)[0], torch.sigmoid(bg.logits[:, i, j]), atol=1e-5)
    # across the seam at longitude +-pi the colour is continuous
    eps = 1e-4
    a = torch.tensor([[math.cos(math.pi - eps), math.sin(math.pi - eps), 0.2]])
    b = torch.tensor([[math.cos(math.pi - eps), -math.sin(math.pi - eps), 0.2]])
    assert torch.allclose(bg(a), bg(b), atol=1e-3)
    with pytest.raises(ValueError, match="height"):
        BackgroundMap(height=1)


def test_map_learns_a_smooth_environment():
    def env(d):                          # a sky-to-ground gradient with a warm side
        return torch.stack([0.5 + 0.4 * d[:, 0], 0.5 + 0.3 * d[:, 2], 0.4 + 0.2 * d[:, 1]], -1)
    bg = BackgroundMap(height=16)
    opt = torch.optim.Adam(bg.parameters(), lr=5e-2)
    for step in range(300):
        d = sphere(4096, seed=step)
        loss = ((bg(d) - env(d)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = sphere(4096, seed=10_000)
    with torch.no_grad():
        mse = float(((bg(d) - env(d)) ** 2).mean())
    assert -10 * math.log10(mse) > 35.0, mse


def test_rays_that_miss_every_cell_see_the_learned_background():
    box = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    field = KiloNeRFField(box, 2, torch.ones(8, dtype=torch.bool), width=8, depth=1,
                          feature_dim=2, head_width=8)
    marcher = Marcher(box, 8)
    marcher.grid.binary.zero_()                     # empty space everywhere: no samples
    bg = BackgroundMap(height=8)
    with torch.no_grad():
        bg.logits.normal_()
    rs = RenderSettings(near=0.1, far=10.0, step_size=0.05, background=bg)
    o = torch.tensor([[0.0, 0.0, 3.0]]).expand(64, 3)
    d = sphere(64, seed=3)
    out = render_rays(field, marcher, o, d, rs)
    assert torch.allclose(out["rgb"], bg(d), atol=1e-6)
    assert rs.device == torch.device("cpu")


def test_pipeline_trains_and_checkpoints_the_background(tmp_path):
    scene = generate_demo_scene(str(tmp_path / "scene"), size=16, n_train=6, n_test=2)
    data = load_dataset(scene)
    train = data["train"]
    opts = NerfOptions(route="direct", optimizer="adam", grid_res=2, occ_res=16,
                       batch_rays=256, max_seconds=1e9, max_steps=20, progress=False,
                       near=train.near, far=train.far, background_model="learned",
                       background_res=8)
    pipe = NerfPipeline(opts, RayBank(train), "cpu", str(tmp_path / "ckpt.pt"))
    before = pipe.background.logits.detach().clone()
    pipe.run()
    assert not torch.equal(before, pipe.background.logits)       # Adam trained it
    trained = load_trained(str(tmp_path / "ckpt.pt"), "cpu")
    d = sphere(32)
    assert torch.allclose(trained.rs.background(d), pipe.background(d))
    # the coupled L-BFGS route cannot train it: one clear error
    with pytest.raises(ValueError, match="background_model learned"):
        NerfPipeline(NerfOptions(route="direct", optimizer="lbfgs", background_model="learned"),
                     RayBank(train), "cpu", str(tmp_path / "x.pt"))
