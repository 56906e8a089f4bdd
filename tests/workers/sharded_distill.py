"""Worker for tests/test_distributed.py: distil random targets into a small KiloNeRF field
with BatchedLBFGS, as one process or sharded under torchrun; rank 0 saves the field."""
import sys

import torch

from kilonerf_lbfgs import distributed
from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.nerf.fields.kilonerf import KiloNeRFField
from kilonerf_lbfgs.nerf.train.distill import DistillProblem, DistillSamples


def problem_and_field():
    g = torch.Generator().manual_seed(0)
    occupied = torch.rand(27, generator=g) < 0.6
    field = KiloNeRFField([-1] * 3 + [1] * 3, 3, occupied, width=16, depth=2, feature_dim=7,
                          head_width=16, omega_0=10.0, generator=g)
    n, p = field.n_nets, 96
    counts = torch.randint(40, p + 1, (n,), generator=g)
    mask = torch.arange(p)[None] < counts[:, None]
    d = torch.nn.functional.normalize(torch.randn(n, p, 3, generator=g), dim=-1)
    samples = DistillSamples(torch.rand(n, p, 3, generator=g) * 2 - 1, d,
                             torch.rand(n, p, generator=g), torch.rand(n, p, 3, generator=g),
                             mask, counts)
    return DistillProblem(samples, step_size=0.05), field


def main(out: str) -> None:
    shards = distributed.init_from_env(torch.device("cpu"))
    problem, field = problem_and_field()
    cfg = FitConfig(optimizer="lbfgs", history_size=10, max_seconds=600, max_evals=30,
                    progress=False, keep_best=False)
    if shards is None:
        res = fit(field, problem, cfg)
    else:
        res = distributed.fit_sharded(shards, field, problem, cfg)
    if shards is None or shards.is_main:
        torch.save({"state": field.state_dict(), "quality": res.quality,
                    "evals": res.function_evals}, out)
    if shards is not None:
        distributed.shutdown()
        distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1])
