"""The optimiser race: summaries, ratios and lower bounds, and a tiny end-to-end race."""
import json
import math

import numpy as np
import torch

from benchmarks.race import (Race, compare, first_time_reaching, format_tables, median_seconds,
                             run_race, summarise)
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.signals.image import ImageProblem


def _run(times_to_quality, final):
    """A fake run whose history reaches quality q at the given seconds."""
    hist = [[s, q] for q, s in sorted(times_to_quality.items(), key=lambda kv: kv[1])]
    return {"history": hist, "quality": final, "evals": 10, "seconds": 1.0}


def test_first_time_reaching():
    hist = [[0.5, 10.0], [1.0, 19.0], [2.0, 21.0], [3.0, 20.5]]
    assert first_time_reaching(hist, 20.0) == 2.0
    assert first_time_reaching(hist, 10.0) == 0.5
    assert first_time_reaching(hist, 22.0) is None


def test_median_counts_misses_as_infinite():
    assert median_seconds([1.0, 2.0, 3.0]) == 2.0
    assert median_seconds([1.0, None, 3.0]) == 3.0
    assert median_seconds([1.0, None, None]) is None


def test_ratios_best_adam_sweep_and_lower_bounds():
    targets = (10, 20)
    budget = 100.0
    res = {
        "batched_lbfgs": summarise("batched_lbfgs", [_run({10: 2.0, 20: 5.0}, 25.0)], targets),
        "adam_lr=0.0001": summarise("adam_lr=0.0001", [_run({10: 50.0}, 15.0)], targets),
        "adam_lr=0.001": summarise("adam_lr=0.001", [_run({10: 4.0, 20: 20.0}, 22.0)], targets),
        "torch_lbfgs_joint": summarise("torch_lbfgs_joint", [_run({10: 8.0}, 12.0)], targets),
    }
    race = Race(problem=None, make_model=None, targets=targets, budget=budget, seeds=[0])
    rep = compare(res, ["adam_lr=0.0001", "adam_lr=0.001"], race)
    r10, r20 = rep["ratios"]["10"], rep["ratios"]["20"]
    assert r10["best_adam"] == 4.0 / 2.0
    assert r10["adam_sweep"] == (50.0 + 4.0) / 2.0
    assert r20["adam_sweep"] == (budget + 20.0) / 5.0            # one variant missed
    assert rep["ratio_is_lower_bound"]["20"]["adam_sweep"] is True
    assert r20["torch_lbfgs_joint"] == budget / 5.0               # missed: counts at budget
    assert rep["ratio_is_lower_bound"]["20"]["torch_lbfgs_joint"] is True
    assert rep["ratio_is_lower_bound"]["10"]["torch_lbfgs_joint"] is False
    assert rep["psnr_gain_at_budget"]["best_adam"] == 25.0 - 22.0
    table = format_tables(rep)
    assert ">20.00x" in table and "2.00x" in table


def test_tiny_race_runs_every_contender():
    img = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
    problem = ImageProblem(img, (2, 2))

    def make(seed):
        return MultiMLP(4, 2, 1, 8, 1, generator=torch.Generator().manual_seed(seed))

    race = Race(problem, make, targets=(15, 20), budget=0.5, seeds=[0], log=lambda s: None)
    rep = run_race(race)
    names = [r["contender"] for r in rep["results"]]
    assert names[0] == "batched_lbfgs"
    assert sum(n.startswith("adam_lr=") for n in names) == 5
    assert sum(n.startswith("adam_cos_lr=") for n in names) == 2
    assert {"torch_lbfgs_joint", "torch_lbfgs_per_cell"} <= set(names)
    # the JSON schema the published results rely on
    assert set(rep) == {"targets", "seeds", "adam_sweep_seeds", "adam_lrs", "quality_name",
                        "budget_seconds", "results", "rival_median_seconds_to_target",
                        "ratios", "ratio_is_lower_bound", "psnr_gain_at_budget"}
    for r in rep["results"]:
        assert set(r) == {"contender", "n_seeds", "seconds_to_target",
                          "median_seconds_to_target", "psnr_at_budget",
                          "median_psnr_at_budget", "function_evals", "histories"}
        assert math.isfinite(r["median_psnr_at_budget"])
        for h in r["histories"]:
            secs = [s for s, _ in h]
            assert secs == sorted(secs)           # the clock only moves forward


def test_sweep_on_one_seed_then_best_settings_on_every_seed():
    img = np.random.default_rng(1).random((16, 16, 1)).astype(np.float32)
    problem = ImageProblem(img, (2, 2))

    def make(seed):
        return MultiMLP(4, 2, 1, 8, 1, generator=torch.Generator().manual_seed(seed))

    race = Race(problem, make, targets=(15, 20), budget=0.3, seeds=[0, 1, 2], sweep_seeds=1,
                log=lambda s: None)
    rep = run_race(race, contenders=["batched_lbfgs", "adam"])
    by_name = {r["contender"]: r for r in rep["results"]}
    assert by_name["batched_lbfgs"]["n_seeds"] == 3
    full = [n for n, r in by_name.items() if n.startswith("adam") and r["n_seeds"] == 3]
    # exactly one constant and one cosine setting were carried to every seed
    assert sum(n.startswith("adam_lr=") for n in full) == 1
    assert sum(n.startswith("adam_cos_lr=") for n in full) == 1
    assert all(len(r["histories"]) == r["n_seeds"] for r in by_name.values())
    # best_adam compares only settings run on every seed
    for t in ("15", "20"):
        full_times = [by_name[n]["median_seconds_to_target"][t] for n in full]
        hit = [x for x in full_times if x is not None]
        assert rep["rival_median_seconds_to_target"][t]["best_adam"] == (min(hit) if hit else None)
    assert "(1 of 3 seeds)" in format_tables(rep)


def test_narrowed_adam_grid_sweeps_only_those_rates():
    img = np.random.default_rng(2).random((8, 8, 1)).astype(np.float32)
    race = Race(ImageProblem(img, (2, 2)),
                lambda seed: MultiMLP(4, 2, 1, 8, 1, generator=torch.Generator().manual_seed(seed)),
                targets=(15,), budget=0.2, seeds=[0], adam_lrs=(1e-3, 1e-2), log=lambda s: None)
    rep = run_race(race, contenders=["adam"])
    names = {r["contender"] for r in rep["results"]}
    assert names == {"adam_lr=0.001", "adam_lr=0.01", "adam_cos_lr=0.001", "adam_cos_lr=0.01"}
    assert rep["adam_lrs"] == [1e-3, 1e-2]


def test_history_dtype_benchmark_runs_and_writes_its_record(script, tmp_path):
    out, rec = tmp_path / "hd.json", tmp_path / "rec.json"
    r = script("benchmark_history_dtype.py", "--images", "camera", "--seeds", 1, "--max_evals", 4,
               "--dtypes", "float32", "bfloat16", "--threads", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["dtype"] for x in rows] == ["float32", "bfloat16"]
    assert all(x["evals"] == 4 and len(x["qualities"]) == 4 for x in rows)
    # the quality rises, and the bfloat16 run starts on the fp32 one's curve
    assert rows[0]["qualities"][-1] > rows[0]["qualities"][0]
    assert abs(rows[1]["qualities"][0] - rows[0]["qualities"][0]) < 0.1
    r = script("benchmark_history_dtype.py", "--record", rec, "--from", out)
    assert r.returncode == 0, r.stderr
    table = json.loads(rec.read_text())
    assert len(table["rows"]) == 2 and table["rows"][0][7] == 0.0     # gap of fp32 to itself


def test_engine_record_tables_the_optimiser_work_per_cell():
    """benchmark_engine's record: the cells table (``--overhead_grids``, from whichever run
    has it) divides each row's optimiser work by its cells, beside the run's L-BFGS rows."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_engine.py"
    spec = importlib.util.spec_from_file_location("benchmark_engine", path)
    engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine)
    tp = [{"what": "gemm", "shape": "ref", "mpoints_per_s": None, "gflop_per_s": 100.0}]
    lb = [{"what": "BatchedLBFGS on image", "history": 100, "history_dtype": "bfloat16",
           "seconds_per_eval": 0.03, "closure_s": 0.02, "overhead_s": 0.01,
           "overhead_vs_closure": 0.5}]
    cells = [{**lb[0], "cells": n, "closure_s": 0.001 * n, "overhead_s": 0.0005 * n + 0.001,
              "overhead_vs_closure": (0.0005 * n + 0.001) / (0.001 * n)} for n in (1, 4)]
    run = {"device": "cpu", "torch": "x", "threads": 2, "throughput": tp, "lbfgs": lb,
           "passes": []}
    rec = engine.to_record({"runs": [run, {**run, "by_cells": cells}, run]}, command="c",
                           date="d", machine="m", threads="2", notes=[])
    table = next(t for t in rec["tables"] if "number of cells" in t["caption"])
    assert [r[0] for r in table["rows"]] == [1, 4]
    assert table["rows"][1][2] == 3.0 and table["rows"][1][3] == 0.75   # ms, ms per cell
    assert table["rows"][0][4] == 1.5
    # without the option no such table
    rec = engine.to_record({"runs": [run]}, command="c", date="d", machine="m",
                           threads="2", notes=[])
    assert not any("number of cells" in t["caption"] for t in rec["tables"])
    # a run on the other BatchedLBFGS path between the first and the last: its own table
    native_run = {**run, "lbfgs_path": "native"}
    torch_run = {**run, "lbfgs_path": "torch",
                 "lbfgs": [{**lb[0], "overhead_s": 0.02, "overhead_vs_closure": 1.0}]}
    rec = engine.to_record({"runs": [run, torch_run, native_run]}, command="c", date="d",
                           machine="m", threads="2", notes=[])
    twin = next(t for t in rec["tables"] if "torch path" in t["caption"])
    assert twin["rows"] == [["BatchedLBFGS on image", 100, "bfloat16", 0.03, 0.02, 0.02, 1.0]]
    assert "native path" in rec["conditions"]
    rec = engine.to_record({"runs": [run, native_run, native_run]}, command="c", date="d",
                           machine="m", threads="2", notes=[])
    assert not any("path (" in t["caption"] for t in rec["tables"])
