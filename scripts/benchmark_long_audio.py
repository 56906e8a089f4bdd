#!/usr/bin/env python
"""A recording longer than memory, fitted in bounded memory: build a long WAV from real
recordings (played one after another, repeated to the length asked), fit it with
``fit_audio.py --cells_in_memory`` (the streamed path) in a subprocess, and report peak
resident memory, PSNR and the evaluation budget.

    python scripts/benchmark_long_audio.py --minutes 60 --max_evals 10 --out bench/long_audio.json
    python scripts/benchmark_long_audio.py --record docs/results/long_audio.json \
        --from bench/long_audio.json

The recordings are resampled to ``--rate`` (scipy's polyphase filter) and written block by
block, so building the file is bounded too.
"""
import json
import os
import sys
from pathlib import Path

import configargparse
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import (PROVENANCE, add_record_args, add_run_args,  # noqa: E402
                                concat_rows, run_script, write_record)
from kilonerf_lbfgs.config import UserError, parse_args, run_main  # noqa: E402
from kilonerf_lbfgs.io import save_json  # noqa: E402

AUDIO = ROOT.parent / "shared" / "data" / "audio"


def write_long(sources, path: str, minutes: float, rate: int) -> dict:
    """The sources (mono mixes, resampled to ``rate``) one after another, repeated until
    ``minutes`` of audio, as a float WAV at ``path``."""
    from math import gcd

    import soundfile as sf
    from scipy.signal import resample_poly
    clips = []
    for src in sources:
        data, r = sf.read(src, dtype="float32", always_2d=True)
        mono = data.mean(1)
        g = gcd(int(r), int(rate))
        clips.append(resample_poly(mono, rate // g, int(r) // g).astype(np.float32))
    total = int(minutes * 60 * rate)
    tmp = path + ".part.wav"
    written, k = 0, 0
    with sf.SoundFile(tmp, "w", samplerate=rate, channels=1, subtype="FLOAT",
                      format="WAV") as out:
        while written < total:
            clip = clips[k % len(clips)][:total - written]
            out.write(np.clip(clip, -1, 1)[:, None])
            written += len(clip)
            k += 1
    os.replace(tmp, path)
    return {"sources": [Path(s).name for s in sources], "clips_played": k, "rate": rate,
            "samples": total}


def run_fit(args, audio: str) -> dict:
    out = os.path.join(args.runs_dir, f"fit_{args.minutes:g}min")
    cmd = [sys.executable, str(ROOT / "scripts" / "fit_audio.py"), "--audio", audio,
           "--samples_per_cell", str(args.samples_per_cell), "--width", "32", "--depth", "2",
           "--cells_in_memory", str(args.cells_in_memory), "--max_evals", str(args.max_evals),
           "--max_seconds", "1e9", "--history_size", str(args.history_size),
           "--target_psnr", "1000", "--out_dir", out, "--no_progress"]
    wall = run_script(cmd, args.threads, "fit_audio.py")
    m = json.loads(Path(out, "metrics.json").read_text())
    import soundfile as sf
    info = sf.info(os.path.join(out, "reconstruction.wav"))
    return {"command": " ".join(["python"] + cmd[1:]), "minutes": args.minutes,
            "samples_per_cell": args.samples_per_cell, "cells_in_memory": args.cells_in_memory,
            "max_evals_per_group": args.max_evals, "history_size": args.history_size,
            "psnr": m["psnr"], "peak_rss_mb": m["peak_rss_mb"], "omega_0": m["omega_0"],
            "train_seconds": m["train_seconds"], "wall_seconds": wall,
            "function_evals": m["function_evals"], "groups": m["groups"], "cells": m["cells"],
            "params_per_cell": m["params_per_cell"], "samples": m["samples"],
            "sample_rate": m["sample_rate"], "reconstruction_samples": info.frames}


COLUMNS = ["audio", "cells", "cells_in_memory", "evals_per_group", "history", "psnr_db",
           "peak_rss_mb", "audio_as_float32_mb", "weights_mb", "train_s", "reconstruction"]


def to_record(report, command, date, machine, threads, notes):
    rows = []
    for r in report["rows"]:
        rows.append([f"{r['minutes']:g} min at {r['sample_rate']} Hz ({r['samples']} samples)",
                     r["cells"], r["cells_in_memory"], r["max_evals_per_group"],
                     r["history_size"], round(r["psnr"], 2), round(r["peak_rss_mb"]),
                     round(r["samples"] * 4 / 1e6), round(r["cells"] * r["params_per_cell"] * 4
                                                          / 1e6),
                     round(r["train_seconds"]), f"{r['reconstruction_samples']} samples WAV"])
    src = report["audio"]
    return {
        "title": "A recording longer than memory: an hour of audio fitted a stretch at a time",
        "command": command, "date": date, "machine": machine, "threads": threads,
        "conditions": f"The recording: {', '.join(src['sources'])} (the SIREN audio "
                      f"examples), mixed to mono, resampled to {src['rate']} Hz and played one "
                      f"after another {src['clips_played']} times, stored as a float WAV. "
                      f"scripts/fit_audio.py --cells_in_memory (sine 2x32 per cell, batched "
                      f"L-BFGS, omega_0 auto from a block-wise bandwidth estimate): the file "
                      f"read a stretch at a time, each group's weights written to disk, the "
                      f"reconstruction appended to a WAV. Budget: a fixed number of "
                      f"evaluations per group. Peak memory: the fit process's peak resident "
                      f"set (VmHWM).",
        "notes": notes,
        "provenance": PROVENANCE,
        "columns": COLUMNS, "rows": rows}


def main():
    p = configargparse.ArgumentParser(description=__doc__,
                                      formatter_class=configargparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+",
                   default=[str(AUDIO / "gt_bach.wav"), str(AUDIO / "gt_counting.wav")])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--rate", type=int, default=16000, help="sample rate of the long file")
    p.add_argument("--audio", default=None, help="the long WAV (built if missing)")
    p.add_argument("--samples_per_cell", type=int, default=512)
    p.add_argument("--cells_in_memory", type=int, default=256)
    p.add_argument("--max_evals", type=int, default=10, help="evaluations per group")
    p.add_argument("--history_size", type=int, default=100)
    add_run_args(p, "long_audio")
    add_record_args(p)
    args = parse_args(p)
    if args.record:
        write_record(args, concat_rows, to_record, "python scripts/benchmark_long_audio.py")
        return
    audio = args.audio or os.path.join(args.runs_dir, f"long_{args.minutes:g}min.wav")
    os.makedirs(os.path.dirname(os.path.abspath(audio)), exist_ok=True)
    if not os.path.isfile(audio):
        missing = [s for s in args.sources if not os.path.isfile(s)]
        if missing:
            raise UserError(f"--sources: {missing[0]} does not exist")
        meta = write_long(args.sources, audio, args.minutes, args.rate)
        save_json(audio + ".json", meta)
        print(f"wrote {audio}: {meta}")
    meta = json.loads(Path(audio + ".json").read_text()) if os.path.isfile(audio + ".json") \
        else {}
    row = run_fit(args, audio)
    print(json.dumps(row), flush=True)
    save_json(args.out, {"threads": args.threads, "audio": meta, "rows": [row]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
