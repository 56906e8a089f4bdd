"""The NeRF field, distillation problem and scripts on a tiny generated scene."""
import json
import os
import signal
import subprocess
import sys
import time

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from kilonerf_lbfgs.nerf.data.demo_scene import demo_surface_points, generate_demo_scene
from kilonerf_lbfgs.nerf.data.loaders import load_dataset
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.train.box import find_tight_box, surface_bounds
from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions
from kilonerf_lbfgs.nerf.train.distill import DistillProblem, DistillSamples
from kilonerf_lbfgs.nerf.fields.kilonerf import KiloNeRFField
from kilonerf_lbfgs.optim import BatchedLBFGS

from conftest import REPO

BOX = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
# the tiny scene's test views rendered as plain white (the empty field) score 9.4 dB and
# as their mean colour 10.4 dB; the bars below are far above both
TINY_ARGS = ["--route", "direct", "--optimizer", "adam", "--grid_res", "4", "--occ_res", "32",
             "--batch_rays", "1024", "--direct_lr", "2e-3", "--no_progress"]


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_scene")
    return generate_demo_scene(str(d), size=24, n_train=20, n_test=3)


def small_field(occupied=None, seed=0):
    return KiloNeRFField(BOX, 3, occupied, width=8, depth=2, feature_dim=4, head_width=8,
                         generator=torch.Generator().manual_seed(seed))


def test_field_ragged_equals_per_cell_modules():
    occ = torch.zeros(27, dtype=torch.bool)
    occ[[0, 5, 13, 26]] = True
    field = small_field(occ)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(300, 3, generator=gen) * 2.2 - 1.1          # some points outside the box
    d = torch.nn.functional.normalize(torch.randn(300, 3, generator=gen), dim=-1)
    with torch.no_grad():
        rgb, sigma = field(x, d)
        keep, net, local = field.locate(x)
        for i in torch.nonzero(keep).flatten().tolist():
            k = int(keep[:i].sum())
            n = int(net[k])
            out = field.trunk.cell_module(n)(local[k:k + 1])
            col = field.head.cell_module(n)(torch.cat([out[:, 1:], d[i:i + 1]], -1))
            torch.testing.assert_close(rgb[i], torch.sigmoid(col[0]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(sigma[i], field.to_sigma(out[0, 0]), rtol=1e-5,
                                       atol=1e-6)
    # points in empty cells or outside the box have no density
    assert bool((sigma[~keep] == 0).all()) and int((~keep).sum()) > 0
    torch.testing.assert_close(field.density(x), sigma)


def _distill_samples(n_nets, P=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(5, P + 1, (n_nets,), generator=gen)
    mask = torch.arange(P)[None] < counts[:, None]
    return DistillSamples(local=torch.rand(n_nets, P, 3, generator=gen) * 2 - 1,
                          dirs=torch.nn.functional.normalize(
                              torch.randn(n_nets, P, 3, generator=gen), dim=-1),
                          alpha=torch.rand(n_nets, P, generator=gen) * mask,
                          rgb=torch.rand(n_nets, P, 3, generator=gen), mask=mask, counts=counts)


def test_distillation_batched_lbfgs_equals_independent_runs():
    """BatchedLBFGS on the separable distillation losses of 4 cells == 4 separate runs."""
    occ = torch.zeros(27, dtype=torch.bool)
    occ[[1, 4, 9, 20]] = True
    field = small_field(occ).double()
    samples = _distill_samples(4)
    samples = DistillSamples(*(t.double() if t.is_floating_point() else t for t in
                               (samples.local, samples.dirs, samples.alpha, samples.rgb,
                                samples.mask, samples.counts)))
    problem = DistillProblem(samples, step_size=0.05)
    singles = [field.subset(torch.tensor([i])).double() for i in range(4)]
    opt = BatchedLBFGS(list(field.parameters()), history_size=10, max_eval=20)
    for _ in range(5):
        def closure():
            opt.zero_grad()
            losses = problem.cell_losses(field)
            losses.sum().backward()
            return losses.detach()
        opt.step(closure)
    for i, one in enumerate(singles):
        sub = problem.subset(torch.tensor([i]))
        o1 = BatchedLBFGS(list(one.parameters()), history_size=10, max_eval=20)
        for _ in range(5):
            def closure1():
                o1.zero_grad()
                losses = sub.cell_losses(one)
                losses.sum().backward()
                return losses.detach()
            o1.step(closure1)
        for p_all, p_one in zip(field.parameters(), one.parameters()):
            torch.testing.assert_close(p_all[i:i + 1], p_one, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        final = problem.cell_losses(field)
        first = DistillProblem(samples, 0.05).cell_losses(small_field(occ).double())
    assert bool((final < first).all())


def test_demo_like_scene_trains_to_psnr(tiny_scene, script, tmp_path):
    out = tmp_path / "run"
    r = script("train_nerf.py", "--datadir", tiny_scene, *TINY_ARGS, "--max_seconds", "600",
               "--max_steps", "150", "--out_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_psnr"] >= 20.0, m["test_psnr"]      # 23.4-24.0 dB measured
    assert 0 < m["test_ssim"] <= 1 and m["render_fps"] > 0
    assert len(m["test_psnr_per_view"]) == 3
    for name in ("checkpoint.pt", "convergence.png", "test/test_000.png"):
        assert (out / name).is_file(), name
    # the checkpoint renders an orbit video with exactly n_frames frames
    v = tmp_path / "video"
    r = script("render_video.py", "--ckpt", out / "checkpoint.pt", "--n_frames", "4",
               "--out_dir", v, "--no_progress")
    assert r.returncode == 0, r.stderr[-2000:]
    reader = imageio.get_reader(str(v / "orbit.mp4"))
    assert reader.count_frames() == 4
    assert tuple(reader.get_meta_data()["size"]) == (24, 24)
    # and exports a coloured mesh close to the demo object's true surface
    r = script("export_mesh.py", "--ckpt", out / "checkpoint.pt", "--resolution", "48",
               "--formats", "ply", "obj", "--compare_demo", "--out_dir", tmp_path / "mesh")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "mesh" / "mesh.json").read_text())
    ply = trimesh.load(tmp_path / "mesh" / "mesh.ply", force="mesh")
    assert len(ply.vertices) == info["vertices"] > 1000
    assert ply.visual.vertex_colors.shape == (len(ply.vertices), 4)
    assert trimesh.load(tmp_path / "mesh" / "mesh.obj", force="mesh").faces.shape[0] > 1000
    # 1.5% of the box diagonal measured (a 48^3 lattice: one voxel is 1.2%)
    assert info["chamfer_fraction_of_box_diagonal"] < 0.04, info


def test_distill_route_writes_every_stage(tiny_scene, script, tmp_path):
    out = tmp_path / "distill"
    r = script("train_nerf.py", "--datadir", tiny_scene, "--route", "distill", "--grid_res", "4",
               "--occ_res", "32", "--teacher_res", "48", "--teacher_color_res", "24",
               "--batch_rays", "1024", "--distill_rays", "4096", "--distill_max_per_cell", "128",
               "--distill_sampling", "mixed", "--distill_uniform_per_cell", "128",
               "--history_size", "10", "--no_progress",
               # step budgets for every stage (teacher and fine-tune: steps, distillation:
               # evaluations): the result does not hinge on how busy the machine is
               "--max_seconds", "1800", "--max_steps", "120", "--teacher_fraction", "0.33",
               "--distill_fraction", "0.33", "--distill_evals", "40",
               "--out_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["stages"]) == {"teacher", "distill", "finetune"}
    assert m["stages"]["distill"]["function_evals"] > 0
    assert m["stages"]["distill"]["function_evals"] == 40
    # far above the empty field (9.4 dB) and the mean colour (10.4 dB); 24.2 dB measured
    assert m["test_psnr"] >= 20.0, m["test_psnr"]


def _test_psnr(path):
    return json.loads((path / "metrics.json").read_text())["test_psnr"]


def _run_one_thread(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train_nerf.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_scene, tmp_path):
    # a step budget (as well as the time budget) makes both runs do the same work; one
    # thread, because multi-threaded reductions alone move this short run by ~0.5 dB
    args = ["--datadir", tiny_scene, *TINY_ARGS, "--max_seconds", "600", "--max_steps", "150",
            "--ckpt_every", "2"]
    full = tmp_path / "full"
    r = _run_one_thread(*args, "--out_dir", full)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "train_nerf.py"),
                             *args, "--out_dir", str(killed)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.is_file():
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file() and not (killed / "metrics.json").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert 0 < state["loop"]["steps"] < 150
    r = _run_one_thread(*args, "--out_dir", killed, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming stage direct" in r.stdout
    assert abs(_test_psnr(killed) - _test_psnr(full)) <= 0.3


@pytest.mark.parametrize("case", ["missing", "not_json", "no_frames", "no_angle", "size"])
def test_bad_scene_gives_one_line(case, tiny_scene, script, tmp_path):
    import shutil
    d = tmp_path / "scene"
    if case != "missing":
        shutil.copytree(tiny_scene, d)
        path = d / "transforms_train.json"
        meta = json.loads(path.read_text())
        if case == "not_json":
            path.write_text("{ this is not json")
        elif case == "no_frames":
            meta.pop("frames")
            path.write_text(json.dumps(meta))
        elif case == "no_angle":
            meta.pop("camera_angle_x")
            path.write_text(json.dumps(meta))
        elif case == "size":
            img = imageio.imread(d / "train" / "r_1.png")
            imageio.imwrite(d / "train" / "r_1.png", img[:-2])
    r = script("train_nerf.py", "--datadir", d, *TINY_ARGS, "--max_seconds", "1",
               "--out_dir", tmp_path / "o")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-1500:]
    assert "Traceback" not in r.stderr


def test_unknown_key_and_missing_checkpoint(script, tmp_path):
    cfg = tmp_path / "bad.txt"
    cfg.write_text("grid_res = 4\nno_such_key = 3\n")
    r = script("train_nerf.py", "--config", cfg)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:")
    assert "no_such_key" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = script("render_video.py", "--ckpt", tmp_path / "none.pt", "--out_dir", tmp_path)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:")
    assert "none.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_uniform_distill_samples_lie_in_their_cells_with_the_teachers_targets():
    from kilonerf_lbfgs.nerf.fields.teacher import DenseGridTeacher
    from kilonerf_lbfgs.nerf.train.distill import concat_samples, uniform_distill_samples
    occ = torch.zeros(27, dtype=torch.bool)
    occ[[2, 13, 25]] = True
    field = small_field(occ)
    teacher = DenseGridTeacher(BOX, resolution=12, color_resolution=6)
    with torch.no_grad():
        teacher.density_grid.normal_(0.0, 3.0)
        teacher.feature_grid.normal_()
    s = uniform_distill_samples(teacher, field, 200, 0.05, torch.Generator().manual_seed(0),
                                chunk=97)                  # chunks that do not divide evenly
    assert s.local.shape == (3, 200, 3) and bool(s.mask.all()) and s.counts.tolist() == [200] * 3
    torch.testing.assert_close(s.dirs.norm(dim=-1), torch.ones(3, 200))
    # the world points sit in their network's cell, and cover it (not a corner of it)
    x = field.cell_grid.to_global(s.local.reshape(-1, 3), field.net_cells.repeat_interleave(200))
    keep, net, local = field.locate(x)
    assert bool(keep.all()) and torch.equal(net, torch.arange(3).repeat_interleave(200))
    assert float(s.local.amin()) < -0.95 and float(s.local.amax()) > 0.95
    rgb, sigma = teacher(x, s.dirs.reshape(-1, 3))
    torch.testing.assert_close(s.rgb.reshape(-1, 3), rgb)
    torch.testing.assert_close(s.alpha.reshape(-1), 1 - torch.exp(-sigma * 0.05))
    both = concat_samples(s, s.select(torch.tensor([2, 1, 0])))
    assert both.local.shape == (3, 400, 3) and both.counts.tolist() == [400] * 3
    with pytest.raises(ValueError, match="n_per_cell"):
        uniform_distill_samples(teacher, field, 0, 0.05, torch.Generator())


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_fresh_uniform_samples_are_drawn_every_step_and_the_fit_improves(optimizer):
    """Distillation on fresh draws: each step sees a new batch (the L-BFGS restarts its line
    searches on it) and the held-out distillation quality still rises."""
    from kilonerf_lbfgs.fitting import FitConfig, fit
    from kilonerf_lbfgs.nerf.fields.teacher import DenseGridTeacher
    from kilonerf_lbfgs.nerf.train.distill import FreshUniformSamples, uniform_distill_samples
    occ = torch.zeros(27, dtype=torch.bool)
    occ[[4, 13, 22]] = True
    field = small_field(occ)
    teacher = DenseGridTeacher(BOX, resolution=12, color_resolution=6)
    with torch.no_grad():
        teacher.density_grid.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
        teacher.feature_grid.normal_(generator=torch.Generator().manual_seed(1))
    draw = lambda seed: uniform_distill_samples(teacher, field, 64, 0.05,  # noqa: E731
                                                torch.Generator().manual_seed(seed))
    held_out = DistillProblem(draw(99), 0.05)
    problem = DistillProblem(draw(0), 0.05)
    seen = []
    fresh = FreshUniformSamples(problem, teacher, field, 64, 0.05,
                                torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = held_out.quality(held_out.cell_losses(field))
    fit(field, problem, FitConfig(optimizer=optimizer, lr=None if optimizer == "lbfgs" else 3e-3,
                                  evals_per_step=5, max_evals=150, max_seconds=600,
                                  progress=False),
        callbacks=[fresh, lambda st: seen.append(problem.samples.local[0, 0].clone())])
    with torch.no_grad():
        after = held_out.quality(held_out.cell_losses(field))
    assert len(seen) >= 20
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))   # a new draw each step
    assert after >= before + 3.0, (before, after)


def test_generic_blender_config_takes_the_scenes_box(tiny_scene, script, tmp_path):
    """configs/blender.txt has no box of its own: it starts from a scene's "aabb" (the demo's
    [-1, 1]^3), which is the box when the coarse pass is off."""
    out = tmp_path / "b"
    r = script("train_nerf.py", "--config", "blender.txt", "--datadir", tiny_scene,
               "--grid_res", "4", "--occ_res", "16", "--max_steps", "3", "--max_seconds", "600",
               "--auto_box", "0", "--no_progress", "--out_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["options"]["aabb"] == BOX


def test_surface_bounds_are_robust_percentiles_with_a_margin_inside_the_box():
    rng = np.random.default_rng(0)
    pts = rng.uniform([0.0, 1.0, 2.0], [1.0, 2.0, 4.0], (20000, 3))
    pts[:50] = [9.0, -9.0, 9.0]                       # stray points: below the percentiles
    box = surface_bounds(pts, [-10, -10, -10, 10, 10, 10], (1, 99), margin=0.1)
    assert np.allclose(box, [-0.1, 0.9, 1.8, 1.1, 2.1, 4.2], atol=0.03), box
    clipped = surface_bounds(pts, [0.5, 0, 0, 10, 1.5, 10], (1, 99), margin=0.1)
    assert clipped[0] == 0.5 and clipped[4] == 1.5             # clipped to the start box
    with pytest.raises(ValueError, match="too few"):
        surface_bounds(pts[:3], [0, 0, 0, 1, 1, 1])


def test_coarse_pass_finds_a_box_that_holds_the_object_tightly(tiny_scene):
    data = load_dataset(tiny_scene)
    train = data["train"]
    opts = NerfOptions(aabb=[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], batch_rays=1024,
                       near=train.near, far=train.far, progress=False)
    box = np.array(find_tight_box(RayBank(train), opts, 1e9, "cpu", max_steps=150,
                                  progress=False))
    pts = demo_surface_points(20000)
    lo, hi = pts.min(0), pts.max(0)
    voxel = 2.0 / 64
    assert (box[:3] <= lo + 2 * voxel).all() and (box[3:] >= hi - 2 * voxel).all(), (box, lo, hi)
    true_volume = np.prod(hi - lo)
    assert np.prod(box[3:] - box[:3]) < 2.0 * true_volume < 8.0, (box, lo, hi)


@pytest.mark.parametrize("kw,flag", [(dict(optimizer="lbfgs_targets"), "--route direct"),
                                     (dict(route="direct", optimizer="adam",
                                           lbfgs_line_search="none"), "--lbfgs_line_search")])
def test_pipeline_refuses_a_route_optimizer_combination_that_does_not_exist(kw, flag, tmp_path):
    """The library says what the CLI says (one check, kilonerf_lbfgs.nerf.train.pipeline)."""
    from kilonerf_lbfgs.nerf.train.pipeline import NerfPipeline
    train = load_dataset(generate_demo_scene(str(tmp_path / "s"), size=8, n_train=2,
                                             n_test=1))["train"]
    with pytest.raises(ValueError, match=flag):
        NerfPipeline(NerfOptions(**kw), RayBank(train), "cpu", str(tmp_path / "x.pt"))
