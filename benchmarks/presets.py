"""The published races, as data: which signal, grid, network, targets, budget.

``MODALITIES`` maps a modality to its race builder
``build(preset, quick, seeds, budget=None, data=None) -> Race`` (``data``: a path that
replaces the preset's signal); ``PRESETS`` lists each modality's presets, the first being the
default. A new modality adds one builder and one preset table.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

from benchmarks.race import Race
from kilonerf_lbfgs.config import UserError
from kilonerf_lbfgs.fitting import Resample
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.signals.image import ImageProblem, center_crop, load_image

# the shared data sit beside the repository: ../shared/data
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

IMAGE_PRESETS = {
    # more parameters than samples: the paper's reconstruction regime
    "fidelity": dict(image="camera", crop=256, grid=(8, 8), targets=(40, 50, 60, 70),
                     budget=60.0, quick=dict(budget=20.0)),
    # fewer parameters than samples
    "compression": dict(image="astronaut", crop=0, grid=(16, 16), targets=(35, 40, 45),
                        budget=120.0, quick=dict(crop=256, grid=(8, 8), budget=60.0)),
}

AUDIO_PRESETS = {
    # 7 s of Bach at 44.1 kHz, 301 cells of 1024 samples, sine 2x32 (1153 parameters per cell:
    # about one per sample), omega_0 from the bandwidth; quick: the first 2 s (87 cells)
    "bach": dict(audio=os.path.join(SHARED_DATA, "audio", "gt_bach.wav"), seconds=None,
                 samples_per_cell=1024, width=32, depth=2, targets=(30, 40, 50),
                 budget=60.0, quick=dict(seconds=2.0, budget=20.0)),
}

VIDEO_PRESETS = {
    # first 32 frames of bikes at half resolution (320x136), cells of 8 frames x 17x20 px
    "bikes": dict(video=os.path.join(SHARED_DATA, "video", "bikes.mp4"), frames=32,
                  resize=(0.5,), grid=(4, 8, 16), width=32, depth=3,
                  targets=(25, 28, 30), budget=120.0,
                  quick=dict(frames=8, resize=(0.25,), grid=(2, 4, 8), budget=30.0)),
}

SHAPE_PRESETS = {
    # armadillo occupancy, 4x4x4 cells, sine 3x32 (omega_0 10); IoU on held-out uniform points.
    # Fresh training points as in configs/shape.txt: 60k per draw, a new draw after every 5
    # evaluations for every contender (the same draws in every run). On one fixed set every
    # optimiser overfits, the better optimiser of the training loss first
    # (scripts/benchmark_shape_generalisation.py)
    "armadillo": dict(mesh=os.path.join(SHARED_DATA, "meshes", "armadillo.obj"),
                      target="occupancy", grid=(4, 4, 4), points=60_000, resample_every=5,
                      eval_points=50_000, width=32, depth=3, omega_0=10.0,
                      targets=(0.95, 0.97, 0.98), budget=90.0, quick=dict(budget=40.0)),
}


def _model_factory(n_cells: int, d_in: int, d_out: int, width: int = 32, depth: int = 3,
                   activation: str = "sine", omega_0: float = 30.0):
    def make(seed: int) -> MultiMLP:
        import torch
        return MultiMLP(n_cells, d_in, d_out, width, depth, activation, omega_0=omega_0,
                        generator=torch.Generator().manual_seed(1000 + seed))
    return make


def _image_model_factory(n_cells: int, channels: int, width: int = 32, depth: int = 3,
                         activation: str = "sine"):
    return _model_factory(n_cells, 2, channels, width, depth, activation)


def preset_spec(presets: Dict, preset: Optional[str], quick: bool) -> Dict:
    """A copy of ``presets[preset]`` (default: the first), its ``quick`` overrides applied
    when ``quick``."""
    spec = dict(presets[preset or next(iter(presets))])
    if quick:
        spec.update(spec["quick"])
    return spec


def require_data(path: str, option: str) -> str:
    """``path`` if it exists, else a :class:`UserError` naming the command-line ``option``."""
    if not os.path.exists(path):
        raise UserError(f"{option} {path}: no such file; get the shared data (see "
                        f"../shared/data/README.md) or pass {option} PATH")
    return path


def image_race(preset: str, quick: bool, seeds: Sequence[int],
               budget: Optional[float] = None, image: Optional[str] = None) -> Race:
    """The preset's race; ``image`` swaps in another picture (same crop, grid, network,
    targets), to check a result on data the preset was not chosen for."""
    spec = preset_spec(IMAGE_PRESETS, preset, quick)
    img = load_image(image or spec["image"])
    if spec["crop"]:
        img = center_crop(img, spec["crop"])
    problem = ImageProblem(img, spec["grid"])
    return Race(problem, _image_model_factory(problem.n_cells, img.shape[2]),
                targets=spec["targets"], budget=budget or spec["budget"], seeds=seeds)


def audio_race(preset: Optional[str], quick: bool, seeds: Sequence[int],
               budget: Optional[float] = None, data: Optional[str] = None) -> Race:
    from kilonerf_lbfgs.signals.audio import AudioProblem, load_audio, omega_for_cells
    spec = preset_spec(AUDIO_PRESETS, preset, quick)
    wave, rate = load_audio(require_data(data or spec["audio"], "--audio"))
    if spec["seconds"]:
        wave = wave[:int(spec["seconds"] * rate)]
    n_cells = max(1, math.ceil(wave.shape[0] / spec["samples_per_cell"]))
    omega = omega_for_cells(wave, wave.shape[0] / n_cells)
    problem = AudioProblem(wave, n_cells)
    return Race(problem, _model_factory(n_cells, 1, wave.shape[1], spec["width"],
                                        spec["depth"], omega_0=omega),
                targets=spec["targets"], budget=budget or spec["budget"], seeds=seeds)


def video_race(preset: Optional[str], quick: bool, seeds: Sequence[int],
               budget: Optional[float] = None, data: Optional[str] = None) -> Race:
    from kilonerf_lbfgs.signals.video import VideoProblem, load_video
    spec = preset_spec(VIDEO_PRESETS, preset, quick)
    clip = load_video(require_data(data or spec["video"], "--video"), spec["frames"],
                      spec["resize"])
    problem = VideoProblem(clip, spec["grid"], chunk_cells=64)
    return Race(problem, _model_factory(problem.n_cells, 3, clip.shape[3], spec["width"],
                                        spec["depth"]),
                targets=spec["targets"], budget=budget or spec["budget"], seeds=seeds)


def shape_race(preset: Optional[str], quick: bool, seeds: Sequence[int],
               budget: Optional[float] = None, data: Optional[str] = None) -> Race:
    from kilonerf_lbfgs.signals.shape import load_mesh, make_shape_problem, normalize_mesh
    spec = preset_spec(SHAPE_PRESETS, preset, quick)
    path = require_data(data or spec["mesh"], "--mesh")
    mesh = normalize_mesh(load_mesh(path))
    problem = make_shape_problem(mesh, spec["grid"], spec["target"], spec["points"],
                                 spec["eval_points"], source=f"--mesh {path}")
    every = spec.get("resample_every", 0)

    def fresh_samples():
        """Every run starts on the same first draw and sees the same later draws."""
        problem.sampler.draws = 0
        problem.resample()
        return [Resample(problem.resample, every)] if every else []

    return Race(problem, _model_factory(problem.n_cells, 3, 1, spec["width"], spec["depth"],
                                        omega_0=spec["omega_0"]),
                targets=spec["targets"], budget=budget or spec["budget"], seeds=seeds,
                fit_callbacks=fresh_samples)


def nerf_distill_race(preset: Optional[str], quick: bool, seeds: Sequence[int],
                      budget: Optional[float] = None, data: Optional[str] = None,
                      device="cpu") -> Race:
    from benchmarks.nerf_distill import NERF_DISTILL_PRESETS, build_distill_race
    spec = preset_spec(NERF_DISTILL_PRESETS, preset, quick)
    datadir = require_data(data or os.path.join(SHARED_DATA, "nerf_synthetic", "lego"),
                         "--datadir")
    return build_distill_race(spec, datadir, seeds, budget, device=device)


MODALITIES: Dict[str, Callable[..., Race]] = {
    "image": lambda preset, quick, seeds, budget=None, data=None:
        image_race(preset or "fidelity", quick, seeds, budget, data),
    "audio": audio_race,
    "video": video_race,
    "shape": shape_race,
    "nerf_distill": nerf_distill_race,
}

PRESETS: Dict[str, Sequence[str]] = {
    "image": tuple(IMAGE_PRESETS), "audio": tuple(AUDIO_PRESETS),
    "video": tuple(VIDEO_PRESETS), "shape": tuple(SHAPE_PRESETS),
    "nerf_distill": ("lego",),
    "nerf": ("lego",),          # the whole pipeline: benchmarks.nerf_pipeline
}


def study_races(study: str, quick: bool, seeds: Sequence[int],
                budget: Optional[float] = None) -> Iterator[Tuple[str, Race]]:
    """The paper's claims on the fidelity crop (camera 256x256, 8x8 cells)."""
    img = center_crop(load_image("camera"), 256)
    problem = ImageProblem(img, (8, 8))
    budget = budget or (15.0 if quick else 30.0)
    targets = (30, 40, 50)
    if study == "activations":
        for act in ("sine", "gaussian", "relu_pe"):
            yield act, Race(problem, _image_model_factory(problem.n_cells, 1, activation=act),
                            targets=targets, budget=budget, seeds=seeds)
    elif study == "width":
        for width in (16, 32, 64, 128):
            yield f"width {width}", Race(problem, _image_model_factory(problem.n_cells, 1, width),
                                         targets=targets, budget=budget, seeds=seeds)
    else:
        raise ValueError(study)
