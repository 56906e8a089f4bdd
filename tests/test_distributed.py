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


@pytest.mark.parametrize("script,args,needle", [
    ("fit_image.py", ["--image", "camera", "--crop", "16", "--grid", "1", "1",
                      "--max_evals", "2"], "2 processes for 1 cells"),
    ("fit_shape.py", ["--grid", "2", "1", "1", "--points", "500", "--eval_points", "500",
                      "--max_evals", "2"], "cannot be sharded"),
    ("train_nerf.py", ["--config", "demo.txt", "--demo_size", "8", "--route", "distill"],
     "--route direct --optimizer adam only"),
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
