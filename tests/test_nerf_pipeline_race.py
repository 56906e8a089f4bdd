"""The whole-pipeline NeRF race (--modality nerf) on a tiny generated scene."""
import time

import pytest
import torch

from benchmarks.nerf_pipeline import (OURS, format_pipeline_tables, ratios_to_ours,
                                      run_pipeline_race)
from kilonerf_lbfgs.config import UserError
from kilonerf_lbfgs.nerf.data.demo_scene import generate_demo_scene
from kilonerf_lbfgs.nerf.data.loaders import load_dataset
from kilonerf_lbfgs.nerf.data.rays import RayBank
from kilonerf_lbfgs.nerf.evaluate import evaluate
from kilonerf_lbfgs.nerf.train.pipeline import NerfOptions, NerfPipeline

BOX = [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
SMALL = dict(aabb=BOX, grid_res=4, occ_res=32, batch_rays=512, width=8, depth=2,
             feature_dim=4, head_width=8, teacher_res=32, teacher_color_res=16,
             distill_rays=2048, distill_max_per_cell=64)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("race_scene"))
    generate_demo_scene(d, size=16, n_train=12, n_test=2)
    return d


def _bank_and_test(scene):
    data = load_dataset(scene)
    return RayBank(data["train"]), data["test"], data["train"]


def test_probes_do_not_change_training(scene, tmp_path):
    bank, test, train = _bank_and_test(scene)
    states = []
    for with_probe in (False, True):
        opts = NerfOptions(route="direct", optimizer="adam", max_seconds=1e9, max_steps=12,
                           near=train.near, far=train.far, progress=False, ckpt_every=1e9,
                           **SMALL)
        pipe = NerfPipeline(opts, bank, "cpu", str(tmp_path / f"c{with_probe}.pt"))
        seen = []
        if with_probe:
            pipe.probe = lambda f, s: seen.append(
                (s, evaluate(f, pipe.marcher, test, pipe.rs, progress=False)["test_psnr"]))
            pipe.probe_every = 0.0            # after every step
        field = pipe.run()
        states.append({k: v.clone() for k, v in field.state_dict().items()})
        if with_probe:
            assert len(seen) == 12            # every step, the end included once
            secs = [s for s, _ in seen]
            assert secs == sorted(secs) and secs[-1] == pytest.approx(pipe.train_seconds())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_distill_route_probes_only_after_the_teacher(scene, tmp_path):
    bank, test, train = _bank_and_test(scene)
    # step and evaluation budgets: the test does not depend on how busy the machine is
    opts = NerfOptions(route="distill", optimizer="lbfgs", max_seconds=1e6, max_steps=4,
                       distill_evals=6, near=train.near, far=train.far, progress=False,
                       ckpt_every=1e9, history_size=5, **SMALL)
    pipe = NerfPipeline(opts, bank, "cpu", str(tmp_path / "ckpt.pt"))
    seen = []

    def probe(field, seconds):
        seen.append((seconds, evaluate(field, pipe.marcher, test, pipe.rs,
                                       progress=False)["test_psnr"]))
        time.sleep(0.2)                   # a slow probe: none of it may count as training

    pipe.probe, pipe.probe_every = probe, 0.0
    t0 = time.perf_counter()
    pipe.run()
    wall = time.perf_counter() - t0
    secs = [s for s, _ in seen]
    assert secs and secs == sorted(secs)
    # no cells exist before the teacher: the first probe comes after its training
    assert secs[0] >= pipe.done["teacher"]["seconds"] > 0
    # the distillation's end and every fine-tune step, the end of the last one included once
    assert len(seen) == 1 + opts.max_steps
    assert secs[-1] == pytest.approx(pipe.train_seconds())
    assert pipe.train_seconds() <= wall - 0.2 * len(seen)      # probes are not timed


def test_ratios_count_misses_at_the_budget():
    def entry(t10, t20):
        return {"median_seconds_to_target": {"10": t10, "20": t20}}
    res = {OURS: entry(2.0, 5.0), "direct_adam": entry(4.0, None), "distill_adam": entry(1.0, 10.0)}
    r = ratios_to_ours(res, (10, 20), budget=50.0)
    assert r["ratios"]["10"]["direct_adam"] == 2.0
    assert r["ratios"]["20"]["direct_adam"] == 10.0
    assert r["ratio_is_lower_bound"]["20"]["direct_adam"] is True
    assert r["ratios"]["10"]["distill_adam"] == 0.5
    assert r["ratio_is_lower_bound"]["10"]["distill_adam"] is False


def test_tiny_pipeline_race_and_unknown_contender(scene):
    spec = dict(downsample=1, test_every=1, options=dict(SMALL, history_size=5),
                probe_every=0.5, budget=2.0, targets=(8.0, 12.0))
    rep = run_pipeline_race(scene, spec, seeds=[0], contenders=[OURS, "direct_adam"],
                            log=lambda s: None)
    assert [r["contender"] for r in rep["results"]] == [OURS, "direct_adam"]
    assert set(rep["ratios"]["8.0"]) == {"direct_adam"}
    table = format_pipeline_tables(rep)
    assert "direct_adam" in table and "s to 12.0 dB" in table
    with pytest.raises(UserError, match="--contenders"):
        run_pipeline_race(scene, spec, seeds=[0], contenders=["sgd"])


def test_pipeline_record_merges_runs_and_states_speedups():
    from benchmarks.nerf_pipeline import merge_pipeline_reports, pipeline_record

    def entry(name, t24, t28, end):
        return {"contender": name, "options": {"route": "direct", "optimizer": "adam"},
                "median_seconds_to_target": {"24.0": t24, "28.0": t28},
                "median_psnr_at_budget": end, "function_evals": [10]}
    common = {"targets": [24.0, 28.0], "seeds": [0], "budget_seconds": 600.0,
              "probe_every": 30.0, "n_test_views": 25, "image_size": [100, 100]}
    a = {**common, "results": [entry("direct_adam", 100.0, None, 27.5)]}
    b = {**common, "results": [entry("distill_x", 50.0, 400.0, 28.4)]}
    rec = pipeline_record(merge_pipeline_reports([a, b]), "t", "cmd", "d", "m", "1")
    assert [r[0] for r in rec["rows"]] == ["direct_adam", "distill_x"]
    assert rec["rows"][0][3:5] == [100.0, "miss"]
    # 2x faster to 24 dB; direct_adam misses 28 dB: a lower bound at the budget (600 / 400)
    assert rec["tables"][0]["rows"] == [["distill_x", "2.00x", ">1.50x"]]
    with pytest.raises(ValueError, match="same race settings"):
        merge_pipeline_reports([a, {**b, "budget_seconds": 60.0}])
