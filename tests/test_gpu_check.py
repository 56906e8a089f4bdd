"""scripts/gpu_check.sh: shell syntax and its --help (fast; nothing is trained or installed)."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(*args):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_gpu_check_syntax():
    r = _bash("-n", SCRIPT)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_gpu_check_help(flag):
    r = _bash(SCRIPT, flag)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: bash scripts/gpu_check.sh")
    for opt in ("--wheels", "--datadir", "--seconds", "--out"):
        assert opt in r.stdout


def test_gpu_check_rejects_bad_options():
    r = _bash(SCRIPT, "--no_such_option")
    assert r.returncode != 0 and "unknown option" in r.stderr
    r = _bash(SCRIPT, "--seconds", "abc")
    assert r.returncode != 0 and "--seconds" in r.stderr
