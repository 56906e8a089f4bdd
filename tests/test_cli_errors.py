"""Bad input: one clear line naming the option or file, and a non-zero exit."""
import os

import pytest

from conftest import REPO


def _one_line_error(r, *needles):
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr          # no traceback
    assert err[0].startswith("error:"), err
    for n in needles:
        assert n in err[0], (n, err[0])


def test_missing_image(script, tmp_path):
    _one_line_error(script("fit_image.py", "--image", tmp_path / "nope.png", "--max_seconds", 1),
                    "--image", "nope.png")


def test_unreadable_image(script, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    _one_line_error(script("fit_image.py", "--image", bad, "--max_seconds", 1), "bad.png")


def test_unknown_config_key(script, tmp_path):
    cfg = tmp_path / "c.txt"
    cfg.write_text("grid = [4, 4]\nfrobnicate = 3\n")
    _one_line_error(script("fit_image.py", "--config", cfg, "--max_seconds", 1), "frobnicate",
                    "c.txt")


def test_missing_config_file(script):
    _one_line_error(script("fit_image.py", "--config", "no_such_config.txt"), "no_such_config")


@pytest.mark.parametrize("opt,value,name", [("--grid", "0", "--grid"),
                                            ("--width", "-3", "--width"),
                                            ("--depth", "0", "--depth")])
def test_non_positive_sizes(script, opt, value, name):
    _one_line_error(script("fit_image.py", opt, value, "--max_seconds", 1), name)


def test_unknown_activation(script):
    _one_line_error(script("fit_image.py", "--activation", "swish", "--max_seconds", 1),
                    "--activation", "swish")


@pytest.mark.parametrize("args,needles", [
    (["--width", "abc"], ["--width", "abc"]),
    (["--optimizer", "sgd"], ["--optimizer", "sgd"]),
    (["--history_size", "0"], ["--history_size"]),
    (["--lr", "-1"], ["--lr", "-1"]),
    (["--max_seconds", "0"], ["--max_seconds"]),
    (["--grid", "4", "4", "4"], ["--grid"]),
    (["--image", "camera", "--grid", "600", "600"], ["--grid", "more cells than pixels"]),
])
def test_bad_flag_value_names_the_flag(script, args, needles):
    _one_line_error(script("fit_image.py", "--max_seconds", 1, *args), *needles)


def test_out_of_range_value_in_a_config_file(script, tmp_path):
    cfg = tmp_path / "c.txt"
    cfg.write_text("width = 0\n")
    _one_line_error(script("fit_image.py", "--config", cfg), "--width")


def test_bare_config_name_from_another_folder(script, tmp_path):
    # a bare name is found in the repository's configs/ whatever the working folder ...
    _one_line_error(script("fit_image.py", "--config", "image.txt", "--width", "0",
                           cwd=tmp_path), "--width")
    # ... but a file of that name in the working folder wins
    (tmp_path / "image.txt").write_text("frobnicate = 1\n")
    _one_line_error(script("fit_image.py", "--config", "image.txt", cwd=tmp_path),
                    "frobnicate", "image.txt")


def test_corrupt_checkpoint_names_flag_and_file(script, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _one_line_error(script("fit_image.py", "--resume", "--out_dir", tmp_path, "--image",
                           "camera", "--crop", 32, "--grid", 2, "--max_seconds", 1),
                    "--resume", "checkpoint.pt")


# ---------------------------------------------------------------------------------- NeRF

def test_nerf_missing_datadir_names_flag_and_folder(script, tmp_path):
    _one_line_error(script("train_nerf.py", "--datadir", tmp_path / "no_scene",
                           "--max_seconds", 1), "--datadir", "no_scene")
    _one_line_error(script("train_nerf.py", "--max_seconds", 1), "--datadir")


def test_nerf_bad_values_name_the_flag(script, tmp_path):
    cfg = tmp_path / "n.txt"
    cfg.write_text("demo_scene = true\ngrid_ress = 8\n")
    _one_line_error(script("train_nerf.py", "--config", cfg), "grid_ress", "n.txt")
    cfg.write_text("demo_scene = true\nteacher_fraction = 1.5\n")
    _one_line_error(script("train_nerf.py", "--config", cfg), "--teacher_fraction", "1.5")
    for args, flag in [(["--route", "sideways"], "--route"), (["--downsample", "0"],
                       "--downsample"), (["--teacher", "oak"], "--teacher"),
                       (["--aabb", "1", "1", "1", "0", "2", "2"], "--aabb"),
                       (["--grid_res", "100"], "--grid_res"), (["--grid_res", "0"], "--grid_res"),
                       (["--distill_sampling", "everywhere"], "--distill_sampling"),
                       (["--distill_uniform_per_cell", "0"], "--distill_uniform_per_cell"),
                       (["--optimizer", "sgd"], "--optimizer"),
                       (["--route", "distill", "--optimizer", "lbfgs_targets"], "--optimizer"),
                       (["--gn_step", "1.5"], "--gn_step"),
                       (["--lbfgs_max_step", "0.01"], "--lbfgs_max_step"),
                       (["--optimizer", "lbfgs", "--lbfgs_line_search", "backtrack"],
                        "--lbfgs_line_search"),
                       (["--optimizer", "lbfgs", "--lbfgs_max_step", "-1"], "--lbfgs_max_step"),
                       (["--targets_per_cell", "0"], "--targets_per_cell")]:
        _one_line_error(script("train_nerf.py", "--config", "demo.txt", "--demo_size", 8,
                               "--datadir", tmp_path / "demo", *args, cwd=tmp_path), flag)


def test_render_missing_checkpoint_names_flag_and_file(script, tmp_path):
    _one_line_error(script("render_video.py", "--ckpt", tmp_path / "gone.pt"), "--ckpt",
                    "gone.pt")


def test_export_mesh_bad_checkpoints(script, tmp_path):
    _one_line_error(script("export_mesh.py", "--ckpt", tmp_path / "gone.pt"), "--ckpt",
                    "gone.pt")
    out = tmp_path / "shape"
    r = script("fit_shape.py", "--grid", 1, 1, 1, "--points", 500, "--eval_points", 500,
               "--width", 8, "--depth", 1, "--resolution", 8, "--max_evals", 2,
               "--out_dir", out, "--no_progress")
    assert r.returncode == 0, r.stderr
    _one_line_error(script("export_mesh.py", "--ckpt", out / "checkpoint.pt"), "--ckpt",
                    "not a NeRF checkpoint")
    _one_line_error(script("export_mesh.py", "--ckpt", out / "checkpoint.pt",
                           "--resolution", 1), "--resolution")


def _nerf_configs():
    """The configs of train_nerf.py that read a scene folder (not the generated demo)."""
    folder = os.path.join(REPO, "configs")
    texts = {n: open(os.path.join(folder, n)).read() for n in os.listdir(folder)}
    return sorted(n for n, t in texts.items() if "route =" in t and "demo_scene" not in t)


NERF_CONFIGS = _nerf_configs()


def test_every_nerf_config_parses(script, tmp_path):
    # each NeRF config's keys are the script's options: with a missing scene folder the
    # run stops at the folder, not at a key
    assert {"lego.txt", "fox.txt", "chair.txt", "ship.txt", "blender.txt"} <= set(NERF_CONFIGS)
    for name in NERF_CONFIGS:
        _one_line_error(script("train_nerf.py", "--config", name, "--datadir",
                               tmp_path / "no_scene"), "--datadir", "no_scene")
