"""A non-editable install works: the package needs nothing from the repository layout.

``pip install`` (not editable, ``--no-deps --no-build-isolation``) of the project into a fresh
virtual environment that borrows the system's packages (torch, ...), then
``scripts/fit_image.py`` run from another folder with a bare ``--config image.txt`` and a
small budget. The project is copied first so that the build writes nothing into the shared
working tree. About 30 s.
"""
import json
import os
import shutil
import subprocess
import sys

from conftest import REPO


def _run(cmd, cwd, env, timeout=240):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_pip_install_then_fit_image_from_another_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "kilonerf_lbfgs"), src / "kilonerf_lbfgs",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    venv = tmp_path / "venv"
    # without its own pip (ensurepip's old setuptools would shadow the system's): the system's
    # pip and setuptools, seen through --system-site-packages, install into the venv
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
         tmp_path, env)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
          "--quiet", src], tmp_path, env)
    shutil.rmtree(src)                  # the installed copy must stand on its own

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import kilonerf_lbfgs; print(kilonerf_lbfgs.__file__)"], work, env)
    assert str(venv) in where.stdout, where.stdout          # the installed copy, not the repo
    # the native kernel's C source ships with the package (package_data)
    check = "from kilonerf_lbfgs.optim import native; print(native.SOURCE.is_file())"
    c_src = _run([py, "-c", check], work, env)
    assert c_src.stdout.strip() == "True", c_src.stdout

    _run([py, os.path.join(REPO, "scripts", "fit_image.py"), "--config", "image.txt",
          "--image", "camera", "--crop", "64", "--grid", "4", "4", "--max_seconds", "2",
          "--target_psnr", "60", "--device", "cpu", "--no_progress", "--out_dir", "out"],
         work, env)
    with open(work / "out" / "metrics.json") as f:
        m = json.load(f)
    assert m["image_shape"] == [64, 64, 1] and m["psnr"] > 15
    assert os.path.isfile(work / "out" / "reconstruction.png")
