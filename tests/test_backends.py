"""Tests of the process-wide backend settings (kilonerf_lbfgs.backends)."""
import ctypes
import os
import resource
import subprocess
import sys

import pytest

from kilonerf_lbfgs import backends

# a fresh process allocates, fills and frees a 16 MB and a 4 MB tensor 50 times and prints
# its minor page faults: with the allocator tuned only the first round faults its pages in
PROBE = r"""
import resource, torch
from kilonerf_lbfgs.backends import tune_cpu_allocator
tune_cpu_allocator()
warm = [torch.ones(1 << 20) for _ in range(3)]
del warm
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    a, b = torch.ones(4 << 20), torch.ones(1 << 20)
    del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _page_faults(malloc: str) -> int:
    env = {**os.environ, "KILONERF_MALLOC": malloc}
    return int(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                              check=True, env=env).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_cpu_allocator_reuses_freed_tensor_memory():
    first_touch = (20 << 20) // resource.getpagesize()       # 16 + 4 MB, once
    tuned, untuned = _page_faults("1"), _page_faults("0")
    assert tuned < 1.2 * first_touch, (tuned, first_touch)
    assert untuned > 2 * tuned, (untuned, tuned)             # what the tuning saves


def test_tune_cpu_allocator_settings_opt_out_and_refusal(monkeypatch):
    """It passes its three settings to mallopt; a refused one (mallopt returns 0, as C
    libraries other than glibc may) gives False; ``KILONERF_MALLOC=0`` calls nothing."""
    monkeypatch.setattr(sys, "platform", "linux")
    calls, answer = [], [1]

    def mallopt(param, value):
        calls.append((param, value))
        return answer[0]
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: type("Libc", (), {"mallopt": mallopt}))
    assert backends.tune_cpu_allocator() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30), (-2, 256 << 20)]
    answer[0] = 0
    assert backends.tune_cpu_allocator() is False
    calls.clear()
    monkeypatch.setenv("KILONERF_MALLOC", "0")
    assert backends.tune_cpu_allocator() is False and calls == []
