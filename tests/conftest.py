import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "realdata" in item.keywords and not os.path.isdir(SHARED_DATA):
            item.add_marker(pytest.mark.skip(reason=f"needs {SHARED_DATA} (real data)"))
        if "cuda" in item.keywords:
            import torch
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def run_script(name, *args, timeout=300, cwd=REPO, env=None):
    """Run scripts/NAME with ARGS in a subprocess (from ``cwd``, with ``env`` added to the
    environment); returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture
def script():
    return run_script


@pytest.fixture(params=["native", "torch"])
def lbfgs_path(request, monkeypatch):
    """Run a BatchedLBFGS test on both CPU paths: the native per-cell kernel (skipped where it
    cannot be built) and the torch path (its reference twin, and the path without a compiler)."""
    import torch
    from kilonerf_lbfgs.optim import native
    if request.param == "torch":
        monkeypatch.setattr(native, "serves", lambda *a: False)
    elif not native.serves(torch.device("cpu"), torch.float32, torch.float32):
        pytest.skip("the native kernel cannot be built here")
    return request.param
