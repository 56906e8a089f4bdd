#!/usr/bin/env python
"""Fit audio with a 1-D grid of time cells, one tiny sine network per cell, per-cell L-BFGS.

    python scripts/fit_audio.py --config configs/audio.txt [--audio PATH.wav|.flac]
"""
import math
import os

from kilonerf_lbfgs.config import (build_parser, for_option, parse_args, require_positive,
                                   run_main)
from kilonerf_lbfgs.metrics import psnr, snr_db
from kilonerf_lbfgs.runner import add_model_args, make_model, run_fit, setup_run
from kilonerf_lbfgs.signals.audio import (AudioProblem, load_audio, omega_for_cells,
                                          save_waveform_plot, save_wav)

# a bare --config NAME is also looked up in the repository's configs/ beside this script
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")


def main():
    p = build_parser(__doc__, config_dirs=[CONFIGS])
    add_model_args(p, width=32, depth=2, omega_0="auto")
    p.add_argument("--audio", default=None,
                   help="WAV/FLAC file, mono or stereo, any rate (default: a synthesised chord)")
    p.add_argument("--samples_per_cell", type=int, default=256, help="samples per time cell")
    args = parse_args(p)
    auto = args.omega_0 == "auto"
    require_positive(args, "samples_per_cell")
    device = setup_run(args)
    with for_option("--audio", args.audio):
        wave, rate = load_audio(args.audio)
    n_cells = max(1, math.ceil(wave.shape[0] / args.samples_per_cell))
    if auto:
        args.omega_0 = omega_for_cells(wave, wave.shape[0] / n_cells)
    problem = AudioProblem(wave, n_cells, device=device)
    model = make_model(args, n_cells, 1, wave.shape[1], device)
    print(f"audio {wave.shape[0]} samples x {wave.shape[1]} channels at {rate} Hz, "
          f"{n_cells} cells, omega_0 {args.omega_0:.1f}, {model.params_per_cell} parameters "
          f"per cell, {args.optimizer} on {device}")

    def export(model):
        recon = problem.reconstruct(model)
        save_wav(os.path.join(args.out_dir, "reconstruction.wav"), recon, rate)
        save_waveform_plot(os.path.join(args.out_dir, "waveform.png"), wave, recon, rate)
        return {"psnr": psnr(recon, wave, data_range=2.0), "snr_db": snr_db(recon, wave),
                "sample_rate": rate, "samples": wave.shape[0], "channels": wave.shape[1],
                "omega_0": args.omega_0}

    m = run_fit(args, "audio", problem, model, target=args.target_psnr, export=export)
    print(f"PSNR {m['psnr']:.2f} dB, SNR {m['snr_db']:.2f} dB after {m['train_seconds']:.1f} s "
          f"({m['function_evals']} evaluations); outputs in {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
