"""Cells sharded over processes with torchrun (gloo, 2 CPU processes): the same result as one
process, checkpoints that resume with another number of ranks, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from kilonerf_lbfgs.distributed import Shards, select_state

IMAGE = ["--image", "camera", "--crop", "64", "--grid", "4", "4", "--width", "16",
         "--depth", "2", "--max_seconds", "600", "--no_progress"]


def run(script, *args, procs=1, cwd=None):
    cmd = [sys.executable, os.path.join(REPO, "scripts", script), *map(str, args)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs)] + cmd[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


def weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def test_shards_cover_every_cell_once():
    for n, world in ((16, 2), (7, 3), (5, 5)):
        got = torch.cat([Shards(r, world, torch.device("cpu")).cells(n) for r in range(world)])
        assert got.tolist() == list(range(n))


def test_select_state_keeps_the_rows_of_per_cell_tensors():
    state = {"x": torch.arange(12).view(6, 2), "scalar": torch.tensor(3.0), "k": 5,
             "nested": [torch.arange(6), torch.zeros(2, 6)]}
    out = select_state(state, torch.tensor([1, 4]), 6)
    assert out["x"].tolist() == [[2, 3], [8, 9]] and out["k"] == 5
    assert out["nested"][0].tolist() == [1, 4] and out["nested"][1].shape == (2, 6)


def test_two_processes_equal_one_and_checkpoints_change_hands(tmp_path):
    """--max_evals 40: the same PSNR within 0.05 dB and the same weights; a checkpoint of 2
    ranks resumed by 1 (and the reverse) ends where an uninterrupted 80-evaluation run ends."""
    one, two = tmp_path / "one", tmp_path / "two"
    for out, procs in ((one, 1), (two, 2)):
        r = run("fit_image.py", *IMAGE, "--max_evals", 40, "--out_dir", out, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
    assert abs(metrics(one)["psnr"] - metrics(two)["psnr"]) < 0.05
    assert metrics(two)["processes"] == 2 and metrics(two)["function_evals"] == 40
    w1, w2 = weights(one), weights(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)
    ref = tmp_path / "ref"
    assert run("fit_image.py", *IMAGE, "--max_evals", 80, "--out_dir", ref).returncode == 0
    for out, procs in ((two, 1), (one, 2)):          # 2 ranks -> 1, and 1 -> 2
        r = run("fit_image.py", *IMAGE, "--max_evals", 80, "--out_dir", out, "--resume",
                procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resuming" in r.stdout
        assert abs(metrics(out)["psnr"] - metrics(ref)["psnr"]) < 0.05, (out, procs)
        assert metrics(out)["function_evals"] == 80


def test_audio_under_torchrun_equals_one_process(tmp_path):
    psnr = {}
    for procs in (1, 2):
        out = tmp_path / f"a{procs}"
        r = run("fit_audio.py", "--max_evals", 20, "--max_seconds", 600, "--no_progress",
                "--out_dir", out, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        psnr[procs] = metrics(out)["psnr"]
    assert abs(psnr[1] - psnr[2]) < 0.05, psnr


def test_shape_under_torchrun_equals_one_process(tmp_path):
    """Fresh draws every 5 evaluations (every rank draws the same set and keeps its cells);
    the held-out IoU from per-cell counts gathered over ranks equals the single-process IoU."""
    args = ["--grid", "2", "2", "2", "--points", "3000", "--eval_points", "3000",
            "--max_evals", "25", "--max_seconds", "600", "--no_progress", "--no_keep_best"]
    outs = {}
    for procs in (1, 2):
        outs[procs] = tmp_path / f"s{procs}"
        r = run("fit_shape.py", *args, "--out_dir", outs[procs], procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = metrics(outs[1]), metrics(outs[2])
    assert m2["processes"] == 2 and m1["iou"] > 0.5
    assert abs(m1["iou"] - m2["iou"]) < 1e-3, (m1["iou"], m2["iou"])
    for (_, q1), (_, q2) in zip(m1["history"], m2["history"]):
        assert abs(q1 - q2) < 1e-3
    w1, w2 = weights(outs[1]), weights(outs[2])
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("script,args,needle", [
    ("fit_image.py", ["--image", "camera", "--crop", "16", "--grid", "1", "1",
                      "--max_evals", "2"], "2 processes for 1 cells"),
    ("train_nerf.py", ["--config", "demo.txt", "--demo_size", "8", "--optimizer", "lbfgs"],
     "data parallel with --optimizer adam only"),
])
def test_what_cannot_run_sharded_says_so_in_one_line(tmp_path, script, args, needle):
    r = run(script, *args, "--out_dir", tmp_path / "o", "--no_progress", procs=2,
            cwd=tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-3000:]


def test_nerf_direct_route_data_parallel_equals_one_process(tmp_path):
    """Two ranks, each on half of the same 1024-ray batch, gradients averaged: the same field
    as one process on the whole batch, within float tolerance, after 30 Adam steps."""
    from kilonerf_lbfgs.nerf.data.demo_scene import generate_demo_scene
    scene = generate_demo_scene(str(tmp_path / "scene"), size=16, n_train=8, n_test=2)
    args = ["--datadir", scene, "--route", "direct", "--optimizer", "adam", "--grid_res", "4",
            "--occ_res", "16", "--batch_rays", "1024", "--direct_lr", "2e-3", "--no_progress",
            "--max_seconds", "600", "--max_steps", "30"]
    fields = {}
    for procs in (1, 2):
        out = tmp_path / f"n{procs}"
        r = run("train_nerf.py", *args, "--out_dir", out, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        fields[procs] = torch.load(out / "checkpoint.pt", weights_only=False)["field"]["state"]
        assert (out / "metrics.json").is_file()
    for k in fields[1]:
        torch.testing.assert_close(fields[1][k], fields[2][k], rtol=1e-4, atol=1e-5)
    assert abs(metrics(tmp_path / "n1")["test_psnr"] - metrics(tmp_path / "n2")["test_psnr"]) < 0.05


def test_nerf_distill_route_under_torchrun_matches_one_process(tmp_path):
    """The distillation route under torchrun: the teacher and the fine-tune data parallel
    (Adam), the distillation's networks sharded over the ranks (BatchedLBFGS). The field
    ends within float drift of one process (the teacher's averaged gradients differ in
    summation order, and its samples follow it) and evaluates to the same test PSNR."""
    from kilonerf_lbfgs.nerf.data.demo_scene import generate_demo_scene
    scene = generate_demo_scene(str(tmp_path / "scene"), size=16, n_train=8, n_test=2)
    args = ["--datadir", scene, "--route", "distill", "--optimizer", "lbfgs", "--grid_res",
            "2", "--occ_res", "16", "--batch_rays", "512", "--teacher", "dense",
            "--no_progress", "--max_seconds", "600", "--max_steps", "20",
            "--distill_evals", "15"]
    fields, psnr = {}, {}
    for procs in (1, 2):
        out = tmp_path / f"n{procs}"
        r = run("train_nerf.py", *args, "--out_dir", out, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        fields[procs] = torch.load(out / "checkpoint.pt", weights_only=False)["field"]["state"]
        psnr[procs] = metrics(out)["test_psnr"]
        assert metrics(out)["function_evals"] == 20 + 15 + 20
    assert fields[1]["net_cells"].tolist() == fields[2]["net_cells"].tolist()
    for k in fields[1]:
        torch.testing.assert_close(fields[1][k], fields[2][k], rtol=0, atol=1e-2)
    assert abs(psnr[1] - psnr[2]) < 0.05, psnr


def test_sharded_distillation_equals_one_process_cell_for_cell(tmp_path):
    """The same samples, BatchedLBFGS on each rank's block of networks: the same per-network
    parameters as one process (the iterates of a cell do not depend on its rank)."""
    worker = os.path.join(REPO, "tests", "workers", "sharded_distill.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = {}
    for procs in (1, 2):
        out[procs] = tmp_path / f"d{procs}.pt"
        cmd = [sys.executable, worker, str(out[procs])]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2"] + cmd[1:]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(out[p], weights_only=False) for p in (1, 2))
    assert one["quality"] > 5 and abs(one["quality"] - two["quality"]) < 1e-3
    for k in one["state"]:
        torch.testing.assert_close(one["state"][k], two["state"][k], rtol=1e-4, atol=1e-5)
