"""Calibrating the distillation target: stopping at levels does not change the run, and the
target is the lowest level within the tolerance of the best fine-tuned test PSNR."""
import json

import pytest
import torch

from benchmarks.nerf_calibrate import distill_snapshots, finetune_and_test, pick_target
from benchmarks.nerf_distill import apply_calibration, prepare_distillation
from benchmarks.race import Race
from kilonerf_lbfgs.fitting import FitConfig, fit
from kilonerf_lbfgs.nerf.data.demo_scene import generate_demo_scene


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("calib_scene"))
    generate_demo_scene(d, size=16, n_train=12, n_test=2)
    spec = dict(downsample=1, aabb=[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], grid_res=4, occ_res=32,
                omega_0=10.0, teacher_seconds=1e9, teacher_steps=40, distill_rays=2048, max_per_cell=64,
                history_size=5)
    return prepare_distillation(spec, d, cache_dir=d, progress=False)


def test_stopping_at_levels_equals_one_uninterrupted_run(setup):
    snaps = distill_snapshots(setup, [20.0, 25.0, 30.0], max_seconds=600.0, history_size=5,
                              log=lambda s: None, max_evals=400)
    assert [s["level"] for s in snaps] == [20.0, 25.0, 30.0]
    q = [s["distill_psnr"] for s in snaps]
    assert q == sorted(q) and q[0] >= 20.0
    field = setup.make_field(0)
    res = fit(field, setup.problem, FitConfig(optimizer="lbfgs", history_size=5,
                                              max_seconds=600.0, max_evals=1200,
                                              target=30.0, progress=False))
    assert res.quality == pytest.approx(q[-1], abs=1e-9)
    for k, v in field.state_dict().items():
        assert torch.allclose(v, snaps[-1]["state"][k], atol=1e-6), k


def test_finetune_reports_test_psnr(setup):
    snaps = distill_snapshots(setup, [25.0], max_seconds=600.0, history_size=5,
                              log=lambda s: None, max_evals=400)
    r = finetune_and_test(setup, snaps[0]["state"], steps=3, lr=2e-4)
    # the distilled start is what the fine-tune builds on: better than an untrained field
    # given the same steps (measured: 11.5 vs 10.4 dB; the teacher is only 40 steps old)
    fresh = finetune_and_test(setup, setup.make_field(0).state_dict(), steps=3, lr=2e-4)
    assert r["finetune_steps"] == 3 and r["test_psnr"] >= fresh["test_psnr"] + 0.5


def test_pick_target():
    rows = [{"level": 10, "test_psnr": 24.0}, {"level": 12, "test_psnr": 25.6},
            {"level": 14, "test_psnr": 26.0}, {"level": None, "test_psnr": 25.9}]
    assert pick_target(rows, 0.5) == (26.0, 12)
    assert pick_target(rows, 0.1) == (26.0, 14)
    assert pick_target([{"level": None, "test_psnr": 20.0}], 0.5) == (20.0, None)


def test_race_takes_the_calibrated_target(tmp_path):
    race = Race(None, None, targets=(12.0, 15.0), budget=1.0, seeds=[0])
    meta = {}
    apply_calibration(race, meta, str(tmp_path / "missing.json"))
    assert race.targets == (12.0, 15.0) and "provisional" in meta["target_note"]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"calibrated_target": 17.0, "finetune_steps": 300,
                                "tolerance_db": 0.5, "reference_test_psnr": 27.0,
                                "n_test_views": 25}))
    apply_calibration(race, meta, str(path))
    assert race.targets == (12.0, 15.0, 17.0) and meta["calibrated_target"] == 17.0
    assert "17" in meta["target_note"] and "provisional" not in meta["target_note"]
