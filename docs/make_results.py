#!/usr/bin/env python
"""Write docs/results.md from the experiment records in docs/results/*.json.

    python docs/make_results.py            # rewrite docs/results.md
    python docs/make_results.py --check    # exit 1 if docs/results.md is out of date

Each record holds one experiment: ``title``, ``command`` (a string, a list of strings, or
null when it was not recorded; ``command_note`` then says so), ``date`` (when the numbers
were measured), ``machine`` (and ``threads`` where it matters), ``conditions``, ``notes``,
``provenance`` and its table as ``columns`` + ``rows``; further tables go in ``tables``
(each ``caption``, ``columns``, ``rows``). Standard library only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTPUT = HERE / "results.md"

REQUIRED = ("title", "command", "date", "machine", "conditions", "notes", "provenance",
            "columns", "rows")

# reading order; records not listed here follow in alphabetical order
ORDER = (
    "nerf_lego", "nerf_routes", "nerf_pipeline_race", "nerf_pipeline_race_engine", "nerf_pipeline_race_quick",
    "nerf_pipeline_fresh", "nerf_pipeline_fresh_auto", "nerf_pipeline_coupled_quick", "nerf_demo_routes", "nerf_demo_routes_auto",
    "nerf_demo_output_targets", "nerf_demo_output_targets_auto", "nerf_demo_coupled_schedule", "nerf_demo_coupled_schedule_auto", "nerf_demo_handover", "nerf_demo_handover_auto", "nerf_pipeline_3seeds", "nerf_pipeline_3seeds_engine", "nerf_direct_lr_sweep_quick",
    "nerf_own_scene_routes",
    "nerf_distill_calibration", "nerf_distill_race", "nerf_distill_race_auto",
    "nerf_distill_calibration_quick",
    "nerf_distill_race_quick", "nerf_distill_race_quick_auto", "nerf_distill_race_cuda", "nerf_distill_sampling", "nerf_distill_sampling_engine", "nerf_distill_sampling_grid8", "nerf_distill_sampling_grid8_180",
    "nerf_distill_sampling_cuda", "hash_teacher",
    "image_fidelity", "image_fidelity_native", "image_fidelity_chunked", "image_fidelity_quick", "image_fidelity_quick_chunked", "image_compression", "image_compression_quick", "image_compression_quick_chunked", "image_compression_auto",
    "image_compression_kodak", "image_compression_kodak_auto", "image_compression_kodak_alloc", "image_compression_quick_bf16", "image_activations", "image_activations_auto", "image_width", "image_width_auto",
    "audio_race", "audio_race_bf16", "audio_race_auto", "audio_race_alloc", "audio_race_native", "video_race", "video_race_chunked", "video_race_bf16", "video_race_auto", "shape_race", "shape_race_bf16", "shape_race_auto", "shape_generalisation", "quick_races",
    "quick_races_chunked",
    "audio_quick_rerun", "lbfgs_eval_cost", "history_size", "engine", "native_kernel", "allocator", "history_dtype", "history_dtype_auto",
    "image_fidelity_bf16", "image_fidelity_auto", "image_fidelity_alloc", "quick_races_bf16", "engine_demo",
    "engine_lego",
    "scaling", "large_image", "long_audio", "gpu_h200", "fox", "own_scene_colmap", "nerf_auto_box",
    "mesh_demo", "viewer_overhead",
)


def load_records(folder: Path = RESULTS):
    """``[(stem, record), ...]`` in reading order."""
    records = {p.stem: json.loads(p.read_text(encoding="utf-8"))
               for p in sorted(folder.glob("*.json"))}
    stems = [s for s in ORDER if s in records] + sorted(s for s in records if s not in ORDER)
    return [(s, records[s]) for s in stems]


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    return str(value).replace("|", "\\|")


def table(columns, rows) -> list:
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns: {row}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines


def as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def render_record(stem: str, rec: dict) -> list:
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"docs/results/{stem}.json lacks {', '.join(missing)}")
    out = [f'<a id="{stem}"></a>', f"## {rec['title']}", ""]
    commands = as_list(rec["command"])
    if commands:
        out += ["```bash"] + commands + ["```"]
    else:
        out.append("Command: not recorded.")
    if rec.get("command_note"):
        out += ["", f"Command note: {rec['command_note']}."]
    out += ["", f"- Measured: {rec['date']}", f"- Machine: {rec['machine']}"]
    if rec.get("threads") is not None:
        out.append(f"- Threads: {rec['threads']}")
    out += [f"- Conditions: {rec['conditions']}", f"- Source: {rec['provenance']}",
            f"- Data: [`docs/results/{stem}.json`](results/{stem}.json)", ""]
    out += table(rec["columns"], rec["rows"])
    for extra in rec.get("tables", []):
        out += ["", f"{extra['caption']}:", ""] + table(extra["columns"], extra["rows"])
    notes = as_list(rec["notes"])
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return out + [""]


def render(folder: Path = RESULTS) -> str:
    records = load_records(folder)
    out = ["# Results", "",
           "Generated by `python docs/make_results.py` from `docs/results/*.json`; edit the "
           "JSON, not this file. Times are optimiser (training) seconds; 'miss' means the "
           "target was not reached in the budget, '>' marks a lower bound, an empty cell a "
           "value not recorded or not applicable. The date of each record is the day its "
           "numbers were first published in the README.", ""]
    out += [f"- [{rec['title']}](#{stem})" for stem, rec in records] + [""]
    for stem, rec in records:
        out += render_record(stem, rec)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print("docs/results.md is out of date: run python docs/make_results.py")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
