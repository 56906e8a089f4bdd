"""The teachers: the hash encoding against plain references, and both teachers on a tiny scene."""
import pytest
import torch
import torch.nn.functional as F

from kilonerf_lbfgs.backends import tinycudann_available
from kilonerf_lbfgs.io import load_checkpoint
from kilonerf_lbfgs.nerf.data.loaders import load_dataset
from kilonerf_lbfgs.nerf.data.demo_scene import generate_demo_scene
from kilonerf_lbfgs.nerf.evaluate import evaluate
from kilonerf_lbfgs.nerf.fields.hash_encoding import (TcnnHashEncoding, TorchHashEncoding,
                                                      level_resolutions, make_hash_encoding)
from kilonerf_lbfgs.nerf.render.marcher import Marcher
from kilonerf_lbfgs.nerf.train.photometric import LoopState, PhotometricConfig, train_photometric
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions, NerfPipeline, new_teacher, teacher_lr
from kilonerf_lbfgs.nerf.fields.teacher import DenseGridTeacher, HashGridTeacher

BOX = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]


def test_one_to_one_level_is_a_trilinear_grid_lookup():
    """A level whose lattice fits the table is a dense grid: grid_sample on the same values."""
    enc = TorchHashEncoding(n_levels=1, n_features=2, log2_table=12, base_res=8, max_res=8,
                            init_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert bool(enc.dense.all())
    r = 8
    # rows are x + 9 (y + 9 z): as a volume [z, y, x, F] -> grid_sample's [1, F, D, H, W]
    vol = enc.table.detach()[0, :(r + 1) ** 3].view(r + 1, r + 1, r + 1, 2).permute(3, 0, 1, 2)
    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(1))
    ref = F.grid_sample(vol[None], (x * 2 - 1).view(1, -1, 1, 1, 3), mode="bilinear",
                        align_corners=True).view(2, -1).T
    torch.testing.assert_close(enc(x), ref, rtol=1e-5, atol=1e-6)


def test_hashed_level_reads_the_hashed_row_at_lattice_vertices():
    enc = TorchHashEncoding(n_levels=1, n_features=3, log2_table=10, base_res=64, max_res=64,
                            init_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert not bool(enc.dense.any())                     # 65^3 vertices > 1024 rows
    v = torch.randint(0, 64, (200, 3), generator=torch.Generator().manual_seed(2))
    rows = [(a * 1 ^ b * 2654435761 ^ c * 805459861) % 1024 for a, b, c in v.tolist()]
    torch.testing.assert_close(enc(v.float() / 64), enc.table.detach()[0, rows])


def test_corner_weights_sum_to_one_at_every_level():
    enc = TorchHashEncoding(n_levels=6, n_features=2, log2_table=11, base_res=4, max_res=200)
    assert enc.res.tolist() == level_resolutions(6, 4, 200)
    assert bool(enc.dense.any()) and not bool(enc.dense.all())    # both kinds of level
    with torch.no_grad():
        enc.table.fill_(1.0)
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(3)) * 1.4 - 0.2
    x[:3] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0]])
    torch.testing.assert_close(enc(x), torch.ones(300, 12))


def test_encoding_backend_choice():
    assert isinstance(make_hash_encoding({}, "cpu"), TorchHashEncoding)
    assert isinstance(make_hash_encoding({}, "cpu", backend="torch"), TorchHashEncoding)
    if not tinycudann_available():
        with pytest.raises(ValueError, match="tinycudann"):
            make_hash_encoding({}, "cpu", backend="tcnn")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher_scene")
    generate_demo_scene(str(d), size=24, n_train=20, n_test=3)
    return load_dataset(str(d))


def _train_teacher(teacher, data, steps, lr):
    opts = NerfOptions(aabb=BOX, near=data["train"].near, far=data["train"].far)
    rs = opts.settings("cpu")
    marcher = Marcher(BOX, 32, threshold=opts.occ_threshold)
    cfg = PhotometricConfig(optimizer="adam", batch_rays=1024, seconds=1e9, max_steps=steps)
    train_photometric(teacher, marcher, RayBank(data["train"]), rs, cfg, LoopState(),
                      teacher.optimizer(lr_grid=lr), torch.Generator().manual_seed(0),
                      progress=False)
    marcher.update(teacher.density, rs.step_size)
    return evaluate(teacher, marcher, data["test"], rs, progress=False)["test_psnr"]


@pytest.mark.parametrize("kind", ["dense", "hash"])
def test_teacher_learns_the_tiny_scene(kind, tiny):
    """Both teachers fit the photos well above the empty field (9.4 dB) and the mean colour
    (10.4 dB) within 150 Adam steps."""
    torch.manual_seed(0)
    # small grids and tables for a 24 px scene (the hash teacher's CPU cost grows with levels)
    opts = NerfOptions(aabb=BOX, teacher=kind, teacher_res=48, teacher_color_res=24,
                       hash_levels=4, hash_log2_table=12, hash_max_res=64)
    teacher = new_teacher(opts, "cpu")
    assert isinstance(teacher, {"dense": DenseGridTeacher, "hash": HashGridTeacher}[kind])
    psnr = _train_teacher(teacher, tiny, 150, teacher_lr(opts, teacher))
    assert psnr >= 17.0, psnr


def test_hash_teacher_checkpoint_round_trip(tiny, tmp_path):
    train = tiny["train"]
    opts = NerfOptions(aabb=BOX, near=train.near, far=train.far, teacher="hash",
                       max_seconds=1e9, max_steps=3, batch_rays=256, progress=False)
    pipe = NerfPipeline(opts, RayBank(train), "cpu", str(tmp_path / "ckpt.pt"))
    pipe.run_teacher()                                   # saves a checkpoint when it ends
    again = NerfPipeline(opts, RayBank(train), "cpu", str(tmp_path / "ckpt.pt"))
    again.load(load_checkpoint(str(tmp_path / "ckpt.pt")))
    assert isinstance(again.teacher, HashGridTeacher) and again.stage == "distill"
    x = torch.rand(100, 3) * 2 - 1
    d = F.normalize(torch.randn(100, 3), dim=-1)
    with torch.no_grad():
        for a, b in zip(pipe.teacher(x, d), again.teacher(x, d)):
            torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_tinycudann_hash_teacher_runs(tiny):
    if not tinycudann_available():
        pytest.skip("tinycudann is not installed")
    teacher = HashGridTeacher(BOX, n_levels=16, log2_table=19, max_res=1024, device="cuda")
    assert isinstance(teacher.encoding, TcnnHashEncoding)
    rgb, sigma = teacher(torch.rand(64, 3, device="cuda"),
                         F.normalize(torch.randn(64, 3, device="cuda"), dim=-1))
    assert rgb.shape == (64, 3) and bool(torch.isfinite(sigma).all())
