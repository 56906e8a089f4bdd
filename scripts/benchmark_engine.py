#!/usr/bin/env python
"""Engine throughput: how fast the tiny networks and BatchedLBFGS run on this machine.

    python scripts/benchmark_engine.py --threads 2 --out bench/engine.json
    python scripts/benchmark_engine.py --record docs/results/engine.json --from bench/engine.json
    (``--from BEFORE AFTER``: two runs side by side, e.g. before and after an engine change)

Measures, each as the median of ``--repeats`` timed runs after a warm-up:
- the machine's dense fp32 GEMM rate (2048^3 matmul), the reference;
- forward+backward points/s and GFLOP/s of each modality's cell networks (image, audio,
  video, shape: the configs' networks on their cells) and of the KiloNeRF field, dense per
  cell (distillation) and ragged (the NeRF training path: points in random cells);
- ``BatchedLBFGS``'s cost per evaluation split into the closure and the optimiser's own
  passes over its history, on the image fidelity preset's problem (history 100) and on the
  NeRF distillation's shape (2947 cells x 3475 parameters, random samples, history 20), at
  several history sizes;
- with ``--overhead_grids``, ``BatchedLBFGS``'s own work per evaluation on G x G cells of the
  image fidelity network, for each G: how it grows with the number of cells;
- the two passes over the history each evaluation makes (project the new gradient, combine
  the direction) on the image fidelity shape at the largest image history, in the history's
  fp32 storage and in bf16 / fp16 (candidates for reduced-precision storage), beside one
  plain read of the buffer (the memory-bandwidth floor of a pass).

FLOPs count the linear layers only: 2 x fan_in x fan_out per point and layer forward, twice
that backward (gradients of inputs and of weights), so 6 x per point for forward+backward.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import configargparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import PROVENANCE, add_record_args, write_record  # noqa: E402
from kilonerf_lbfgs.config import parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402

# name: (cells, points per cell, d_in, width, depth, d_out) as the configs/presets use them
CELL_NETS = {
    "image": (256, 1024, 2, 32, 3, 3),        # configs/image.txt on astronaut 512x512
    "audio": (301, 1024, 1, 32, 2, 1),        # the bach preset: 7 s at 44.1 kHz
    "video": (512, 680, 3, 32, 3, 3),         # the bikes preset: 8 frames x 17 x 20 px
    "shape": (64, 940, 3, 32, 3, 1),          # configs/shape.txt: 60k points, 4^3 cells
}


def timed(fn, repeats: int, sync) -> float:
    fn()                                            # warm-up
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def mlp_flops(d_in, width, depth, d_out) -> int:
    dims = [d_in] + [width] * depth + [d_out]
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def gemm_rate(device, repeats, sync) -> float:
    import torch
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    s = timed(lambda: a @ b, repeats, sync)
    return 2 * n ** 3 / s / 1e9


def bench_cells(name, spec, device, repeats, sync) -> dict:
    import torch

    from kilonerf_lbfgs.multinet import MultiMLP
    n, p, d_in, width, depth, d_out = spec
    model = MultiMLP(n, d_in, d_out, width, depth, "sine", omega_0=30.0, device=device)
    x = torch.rand(n, p, d_in, device=device) * 2 - 1
    y = torch.rand(n, p, d_out, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        ((model.forward_dense(x) - y) ** 2).mean().backward()
    s = timed(step, repeats, sync)
    pts = n * p
    return {"what": f"{name} cells", "shape": f"{n} cells x {p} points, sine "
            f"{d_in}-{'-'.join([str(width)] * depth)}-{d_out}", "seconds": s,
            "mpoints_per_s": pts / s / 1e6,
            "gflop_per_s": 3 * mlp_flops(d_in, width, depth, d_out) * pts / s / 1e9}


def kilonerf_field(n_cells, device):
    import torch

    from kilonerf_lbfgs.nerf.fields.kilonerf import KiloNeRFField
    res = round(n_cells ** (1 / 3))
    return KiloNeRFField([-1] * 3 + [1] * 3, res, torch.ones(res ** 3, dtype=torch.bool),
                         omega_0=10.0, device=device)


def field_flops(field) -> int:
    h = field.hparams
    return (mlp_flops(3, h["width"], h["depth"], 1 + h["feature_dim"])
            + mlp_flops(h["feature_dim"] + 3, h["head_width"], 1, 3))


def bench_field_dense(device, repeats, sync) -> dict:
    import torch
    field = kilonerf_field(2197, device)            # 13^3 cells, about the lego distillation
    n, p = field.n_nets, 512
    local = torch.rand(n, p, 3, device=device) * 2 - 1
    d = torch.nn.functional.normalize(torch.randn(n, p, 3, device=device), dim=-1)

    def step():
        field.zero_grad(set_to_none=True)
        rgb, sigma = field.forward_cells(local, d)
        (rgb.square().mean() + sigma.mean()).backward()
    s = timed(step, repeats, sync)
    pts = n * p
    return {"what": "KiloNeRF field, dense per cell", "shape": f"{n} cells x {p} points",
            "seconds": s, "mpoints_per_s": pts / s / 1e6,
            "gflop_per_s": 3 * field_flops(field) * pts / s / 1e9}


def bench_field_ragged(device, repeats, sync) -> dict:
    import torch
    field = kilonerf_field(4096, device)            # 16^3 cells
    m = 400_000
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(m, 3, generator=g) * 2 - 1).to(device)
    d = torch.nn.functional.normalize(torch.randn(m, 3, generator=g), dim=-1).to(device)

    def step():
        field.zero_grad(set_to_none=True)
        rgb, sigma = field(x, d)
        (rgb.square().mean() + sigma.mean()).backward()
    s = timed(step, repeats, sync)
    return {"what": "KiloNeRF field, ragged", "shape": f"{m} points over {field.n_nets} cells",
            "seconds": s, "mpoints_per_s": m / s / 1e6,
            "gflop_per_s": 3 * field_flops(field) * m / s / 1e9}


def lbfgs_overhead(name, model, problem, history, evals, device, sync,
                   history_dtype="float32") -> dict:
    """Seconds per evaluation of BatchedLBFGS on ``problem``: the closure's and the rest."""
    from kilonerf_lbfgs.optim import BatchedLBFGS
    opt = BatchedLBFGS(model.parameters(), history_size=history, max_eval=5,
                       line_search="strong_wolfe", history_dtype=history_dtype)
    inside = [0.0, 0]

    def closure():
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        losses = problem.loss_and_backward(model)
        sync()
        inside[0] += time.perf_counter() - t0
        inside[1] += 1
        return losses
    # fill the history first (the overhead grows with the pairs held), then time
    for _ in range(4 * history):
        if opt.state[next(model.parameters())].get("slots_used", 0) >= history:
            break
        opt.step(closure)
    inside[:] = [0.0, 0]
    sync()
    t0 = time.perf_counter()
    while inside[1] < evals:
        opt.step(closure)
    sync()
    total = time.perf_counter() - t0
    closure_s = inside[0] / inside[1]
    per_eval = total / inside[1]
    return {"what": f"BatchedLBFGS on {name}", "history": history,
            "history_dtype": history_dtype, "seconds_per_eval": per_eval, "closure_s": closure_s,
            "overhead_s": per_eval - closure_s,
            "overhead_vs_closure": (per_eval - closure_s) / closure_s}


def history_passes(device, repeats, sync, n_cells, history, n_params) -> list:
    """Milliseconds of one plain read of a ``[n, m, 2, p]`` history and of two passes over it
    (the projection and the combination), per storage dtype: as batched matrix products in
    the storage dtype (:func:`project_history`, :func:`combine_history`), and for bfloat16
    also as BatchedLBFGS runs them, fused kernels that widen to fp32
    (:func:`kilonerf_lbfgs.optim.history.project`, ``combine``)."""
    import torch

    from kilonerf_lbfgs.optim import history as H
    from kilonerf_lbfgs.optim.compact import combine_history, project_history
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n_cells, history, 2, n_params, generator=g).to(device)
    v = torch.randn(n_cells, n_params, generator=g).to(device)
    coef = torch.randn(n_cells, 2 * history, generator=g, dtype=torch.float64).to(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sy, vv = base.to(dtype), v.to(dtype)
        ms = {name: 1e3 * timed(fn, repeats, sync) for name, fn in (
            ("read", lambda: sy.sum()),
            ("project", lambda: project_history(sy, vv, history)),
            ("combine", lambda: combine_history(sy, coef, history)))}
        rows.append({"dtype": str(dtype).replace("torch.", ""), "cells": n_cells,
                     "history": history, "params": n_params,
                     "megabytes": sy.numel() * sy.element_size() / 1e6, **ms})
        if dtype == torch.bfloat16:
            syb = H.to_blocked(sy)
            ms = {name: 1e3 * timed(fn, repeats, sync) for name, fn in (
                ("read", lambda: sy.sum()),
                ("project", lambda: H.project(sy, v, history)),
                ("combine", lambda: H.combine(sy, syb, coef, history, v.dtype)))}
            rows.append({"dtype": "bfloat16, fused fp32 kernels (torch path)",
                         "cells": n_cells, "history": history, "params": n_params,
                         "megabytes": sy.numel() * sy.element_size() / 1e6, **ms})
            del syb
        del sy
    return rows


def image_fidelity_problem(device, grid=8):
    """The fidelity preset's cells: camera cropped to ``32 grid`` px, ``grid x grid`` cells of
    32 x 32 px (the preset: ``grid=8``), each a sine 2-32-32-32-1 network."""
    import torch

    from kilonerf_lbfgs.multinet import MultiMLP
    from kilonerf_lbfgs.signals.image import ImageProblem, center_crop, load_image
    img = center_crop(load_image("camera"), 32 * grid)
    problem = ImageProblem(img, (grid, grid), device=device)
    model = MultiMLP(problem.n_cells, 2, img.shape[2], 32, 3, "sine", omega_0=30.0,
                     generator=torch.Generator().manual_seed(0), device=device)
    return model, problem


def distill_shape_problem(device, n_cells=2947, per_cell=512):
    import torch

    from kilonerf_lbfgs.nerf.fields.kilonerf import KiloNeRFField
    from kilonerf_lbfgs.nerf.train.distill import DistillProblem, DistillSamples
    occupied = torch.zeros(16 ** 3, dtype=torch.bool)
    occupied[:n_cells] = True
    field = KiloNeRFField([-1] * 3 + [1] * 3, 16, occupied, omega_0=10.0, device=device,
                          generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    n, p = field.n_nets, per_cell
    samples = DistillSamples(
        (torch.rand(n, p, 3, generator=g) * 2 - 1).to(device),
        torch.nn.functional.normalize(torch.randn(n, p, 3, generator=g), dim=-1).to(device),
        torch.rand(n, p, generator=g).to(device), torch.rand(n, p, 3, generator=g).to(device),
        torch.ones(n, p, dtype=torch.bool, device=device),
        torch.full((n,), p, dtype=torch.long, device=device))
    return field, DistillProblem(samples, step_size=0.01)


def run_all(args) -> dict:
    import torch

    from kilonerf_lbfgs.backends import resolve_device, synchronize
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sync = lambda: synchronize(device)  # noqa: E731
    rows = []
    gemm = gemm_rate(device, args.repeats, sync)
    rows.append({"what": "dense fp32 GEMM 2048^3", "shape": "reference", "seconds": None,
                 "mpoints_per_s": None, "gflop_per_s": gemm})
    print(json.dumps(rows[-1]), flush=True)
    for name, spec in CELL_NETS.items():
        rows.append(bench_cells(name, spec, device, args.repeats, sync))
        print(json.dumps(rows[-1]), flush=True)
    for fn in (bench_field_dense, bench_field_ragged):
        rows.append(fn(device, args.repeats, sync))
        print(json.dumps(rows[-1]), flush=True)
    for row in rows[1:]:
        row["fraction_of_gemm"] = row["gflop_per_s"] / gemm
    lbfgs = []
    for history in args.image_histories:
        for hd in args.history_dtypes:
            model, problem = image_fidelity_problem(device)
            lbfgs.append(lbfgs_overhead("image fidelity (camera 256, 8x8 cells)", model,
                                        problem, history, args.evals, device, sync, hd))
            print(json.dumps(lbfgs[-1]), flush=True)
    by_cells = []
    for grid in args.overhead_grids:
        # the optimiser's work against the number of cells, everything else the same
        cells_model, cells_problem = image_fidelity_problem(device, grid)
        by_cells.append({"cells": grid * grid, **lbfgs_overhead(
            f"image fidelity cells ({grid}x{grid})", cells_model, cells_problem,
            args.cells_history, args.evals, device, sync, args.history_dtypes[-1])})
        print(json.dumps(by_cells[-1]), flush=True)
    passes = []
    if args.image_histories:                 # the shape of the last image row's model
        n_params = sum(q[0].numel() for q in model.parameters())
        passes = history_passes(device, args.repeats, sync, model.n_cells,
                                max(args.image_histories), n_params)
        for row in passes:
            print(json.dumps(row), flush=True)
    if not args.skip_distill:
        for history in args.distill_histories:
            for hd in args.history_dtypes:
                field, problem = distill_shape_problem(device)
                lbfgs.append(lbfgs_overhead(f"NeRF distillation shape ({field.n_nets} cells "
                                            f"x {field.params_per_cell} parameters)", field,
                                            problem, history, args.evals, device, sync, hd))
                print(json.dumps(lbfgs[-1]), flush=True)
                del field, problem
    from kilonerf_lbfgs.optim import native
    path = native.cpu_path() if device.type == "cpu" else "torch"
    return {"device": str(device), "threads": args.threads, "torch": torch.__version__,
            "lbfgs_path": path, "throughput": rows, "lbfgs": lbfgs, "passes": passes,
            "by_cells": by_cells}


# what each BatchedLBFGS path does with the history on the CPU (float32 parameters)
PATHS = {"native": "the history work of each cell in one C kernel, one read of the history",
         "torch": "two batched passes over the history, compiled kernels for a bfloat16 one, "
                  "the m x m algebra batched between them; KILONERF_NATIVE=0"}


def to_record(report, command, date, machine, threads, notes):
    """One run, or two (``--from BEFORE AFTER``): then each row shows both and the speed-up."""
    runs = report["runs"]
    before, after = runs[0], runs[-1]
    pair = len(runs) > 1
    rows = []
    for i, r in enumerate(after["throughput"]):
        b = before["throughput"][i]
        rate = (lambda row: round(row["mpoints_per_s"], 3) if row["mpoints_per_s"] else None)
        row = [r["what"], r["shape"]]
        if pair:
            row += [rate(b), rate(r), round(r["gflop_per_s"], 1),
                    round(r.get("fraction_of_gemm", 1.0), 3),
                    round(r["gflop_per_s"] / b["gflop_per_s"], 2)]
        else:
            row += [rate(r), round(r["gflop_per_s"], 1), round(r.get("fraction_of_gemm", 1.0), 3)]
        rows.append(row)
    lb = []
    for i, r in enumerate(after["lbfgs"]):
        dt = r.get("history_dtype", "float32")
        row = [r["what"], r["history"], dt]
        if pair:
            same = [x for x in before["lbfgs"] if x["what"] == r["what"]
                    and x["history"] == r["history"]]
            # a dtype the earlier run did not have is compared with its float32 row
            b = next((x for x in same if x.get("history_dtype", "float32") == dt),
                     next((x for x in same if x.get("history_dtype", "float32") == "float32"),
                          None))
            row += [None if b is None else round(b["seconds_per_eval"], 4),
                    None if b is None else round(b["overhead_vs_closure"], 2)]
        row += [round(r["seconds_per_eval"], 4), round(r["closure_s"], 4),
                round(r["overhead_s"], 4), round(r["overhead_vs_closure"], 2)]
        lb.append(row)
    columns = ["what", "shape"] + (["M points/s before", "M points/s after", "GFLOP/s after",
                                    "fraction of GEMM after", "speed-up"] if pair else
                                   ["M points/s", "GFLOP/s", "fraction of GEMM"])
    lb_columns = ["problem", "history", "history dtype"] + (["s/eval before", "overhead/closure before"]
                                           if pair else []) + \
        ["s/eval", "closure s", "overhead s", "overhead / closure"]
    tables = [{"caption": "BatchedLBFGS: seconds per evaluation, closure against the "
                          "optimiser's own work", "columns": lb_columns, "rows": lb}]
    if after.get("passes"):
        ps = after["passes"]
        closure = next((r["closure_s"] for r in after["lbfgs"]
                        if r["history"] == ps[0]["history"] and "image" in r["what"]
                        and r.get("history_dtype", "float32") == "float32"), None)
        tables.append({
            "caption": f"The two passes over the history per evaluation, image fidelity shape "
                       f"({ps[0]['cells']} cells x {ps[0]['params']} parameters, history "
                       f"{ps[0]['history']}), by storage dtype; a plain read of the buffer is "
                       f"the memory-bandwidth floor of one pass",
            "columns": ["storage", "MB", "read ms", "project ms", "combine ms",
                        "both passes / closure"],
            "rows": [[r["dtype"], round(r["megabytes"], 1), round(r["read"], 2),
                      round(r["project"], 2), round(r["combine"], 2),
                      None if closure is None else
                      round((r["project"] + r["combine"]) / 1e3 / closure, 2)]
                     for r in ps]})
    # a run between the first and the last on the other BatchedLBFGS path (KILONERF_NATIVE=0):
    # its rows beside the last run's, same machine and session
    for twin in runs[1:-1]:
        path = twin.get("lbfgs_path")
        if not twin.get("lbfgs") or path is None or path == after.get("lbfgs_path"):
            continue
        tables.append({
            "caption": f"BatchedLBFGS on the {path} path ({PATHS[path]}), a run beside the "
                       f"main one",
            "columns": ["problem", "history", "history dtype", "s/eval", "closure s",
                        "overhead s", "overhead / closure"],
            "rows": [[r["what"], r["history"], r.get("history_dtype", "float32"),
                      round(r["seconds_per_eval"], 4), round(r["closure_s"], 4),
                      round(r["overhead_s"], 4), round(r["overhead_vs_closure"], 2)]
                     for r in twin["lbfgs"]]})
    by_cells = next((r["by_cells"] for r in runs if r.get("by_cells")), None)
    if by_cells:
        tables.append({
            "caption": f"BatchedLBFGS's own work per evaluation against the number of cells: "
                       f"the image fidelity network and 32 x 32 px cells, history "
                       f"{by_cells[0]['history']}, {by_cells[0]['history_dtype']} history",
            "columns": ["cells", "closure ms", "overhead ms", "overhead ms per cell",
                        "overhead / closure"],
            "rows": [[r["cells"], round(1e3 * r["closure_s"], 2), round(1e3 * r["overhead_s"], 2),
                      round(1e3 * r["overhead_s"] / r["cells"], 3),
                      round(r["overhead_vs_closure"], 2)] for r in by_cells]})
    return {
        "title": "Engine throughput: the tiny networks' forward+backward and BatchedLBFGS's "
                 "cost per evaluation",
        "command": command, "date": date, "machine": machine, "threads": threads,
        "conditions": f"device {after['device']}, torch {after['torch']}, eager PyTorch, "
                      f"{after['threads']} threads. Each timing is the median of repeated "
                      "runs after a warm-up. GFLOP/s counts the linear layers (6 x fan_in x "
                      "fan_out per point and layer for forward+backward), not the sines. "
                      "BatchedLBFGS: strong Wolfe line search, 5 evaluations per step, timed "
                      "after the history is full; overhead = seconds per evaluation minus the "
                      "closure's; BatchedLBFGS ran on the "
                      f"{after.get('lbfgs_path', 'torch')} path "
                      f"({PATHS[after.get('lbfgs_path', 'torch')]})." +
                      (" before: the engine before this work (all cells in one batched "
                       "call, fp32 history only; bfloat16 rows are compared with its fp32 "
                       "row); after: cells in cache-sized chunks, fewer optimiser passes, "
                       "reduced-precision history, the native per-cell kernel."
                       if pair else ""),
        "notes": notes,
        "provenance": PROVENANCE,
        "columns": columns, "rows": rows, "tables": tables}


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--evals", type=int, default=20, help="evaluations timed per L-BFGS row")
    p.add_argument("--image_histories", type=int, nargs="+", default=[20, 100])
    p.add_argument("--distill_histories", type=int, nargs="+", default=[5, 20])
    p.add_argument("--history_dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=("float32", "bfloat16", "float16"),
                   help="BatchedLBFGS history storage for the L-BFGS rows")
    p.add_argument("--overhead_grids", type=int, nargs="*", default=[],
                   help="also time BatchedLBFGS on G x G image fidelity cells for each G "
                        "given (e.g. 1 2 4 8): how its own work grows with the cells")
    p.add_argument("--cells_history", type=int, default=100,
                   help="history size of the --overhead_grids rows")
    p.add_argument("--skip_distill", action="store_true",
                   help="skip the distillation-shape rows (about 1.6 GB of history at 20)")
    p.add_argument("--out", default=os.path.join("bench", "engine.json"))
    add_record_args(p)
    args = parse_args(p)
    if args.record:
        write_record(args, lambda reports: {"runs": list(reports)}, to_record,
                     "python scripts/benchmark_engine.py")
        return
    report = run_all(args)
    save_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
