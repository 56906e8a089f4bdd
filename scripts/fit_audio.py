#!/usr/bin/env python
"""Fit audio with a 1-D grid of time cells, one tiny sine network per cell, per-cell L-BFGS.

    python scripts/fit_audio.py --config configs/audio.txt [--audio PATH.wav|.flac]
"""
import math
import os

from kilonerf_lbfgs.config import (UserError, build_parser, for_option, parse_args,
                                   require_positive, run_main)
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
    p.add_argument("--cells_in_memory", type=int, default=0,
                   help="fit the cells in groups of at most this many, reading --audio a "
                        "stretch at a time and appending to reconstruction.wav: memory set by "
                        "the group, not the recording (0: all at once)")
    args = parse_args(p)
    auto = args.omega_0 == "auto"
    require_positive(args, "samples_per_cell")
    if args.cells_in_memory < 0:
        raise UserError(f"--cells_in_memory {args.cells_in_memory}: must be >= 0")
    device = setup_run(args)
    if args.cells_in_memory:
        return fit_streamed(args, device)
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


def fit_streamed(args, device):
    """The out-of-core path: the recording read a stretch at a time, its cells fitted in
    groups (omega_0 auto: the bandwidth estimated block by block)."""
    from kilonerf_lbfgs.io import save_json
    from kilonerf_lbfgs.runner import fit_config_from_args
    from kilonerf_lbfgs.signals.audio import omega_from_bandwidth
    from kilonerf_lbfgs.signals.long_audio import (audio_info, fit_long_audio,
                                                   streamed_bandwidth_fraction)
    if args.audio is None:
        raise UserError("--cells_in_memory needs --audio FILE (WAV or FLAC)")
    with for_option("--audio", args.audio):
        info = audio_info(args.audio)
        n_cells = max(1, math.ceil(info.frames / args.samples_per_cell))
        if args.omega_0 == "auto":
            args.omega_0 = omega_from_bandwidth(streamed_bandwidth_fraction(args.audio),
                                                info.frames / n_cells)
    print(f"audio {info.frames} samples x {info.channels} channels at {info.samplerate} Hz "
          f"({info.frames / info.samplerate / 60:.1f} min), {n_cells} cells in groups of at "
          f"most {args.cells_in_memory}, omega_0 {args.omega_0:.1f}, {args.optimizer} on "
          f"{device}")

    os.makedirs(args.out_dir, exist_ok=True)
    cfg = fit_config_from_args(args, args.target_psnr, desc="stretch")
    with for_option("--audio", args.audio):
        m = fit_long_audio(args.audio, args.samples_per_cell, args.cells_in_memory,
                           lambda n, g: make_model(args, n, 1, info.channels, device, g), cfg, os.path.join(args.out_dir, "reconstruction.wav"),
                           os.path.join(args.out_dir, "weights"), resume=args.resume,
                           device=device)
    m.update(modality="audio", optimizer=args.optimizer, seed=args.seed,
             cells_in_memory=args.cells_in_memory, omega_0=args.omega_0)
    save_json(os.path.join(args.out_dir, "metrics.json"), m)
    print(f"PSNR {m['psnr']:.2f} dB after {m['train_seconds']:.1f} s "
          f"({m['function_evals']} evaluations), peak memory {m['peak_rss_mb']:.0f} MB; "
          f"outputs in {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
