"""Bad input: one clear line naming the option or file, and a non-zero exit."""
import pytest


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
