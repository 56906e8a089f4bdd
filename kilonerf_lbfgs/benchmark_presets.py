"""The races the README reports, as data: which signal, grid, network, targets, budget."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

from .benchmark import Race
from .multinet import MultiMLP
from .signals.image import ImageProblem, center_crop, load_image

MODALITIES = ("image",)

IMAGE_PRESETS = {
    # more parameters than samples: the paper's reconstruction regime
    "fidelity": dict(image="camera", crop=256, grid=(8, 8), targets=(40, 50, 60, 70),
                     budget=60.0, quick=dict(budget=20.0)),
    # fewer parameters than samples
    "compression": dict(image="astronaut", crop=0, grid=(16, 16), targets=(35, 40, 45),
                        budget=120.0, quick=dict(crop=256, grid=(8, 8), budget=60.0)),
}


def _image_model_factory(n_cells: int, channels: int, width: int = 32, depth: int = 3,
                         activation: str = "sine"):
    def make(seed: int) -> MultiMLP:
        import torch
        return MultiMLP(n_cells, 2, channels, width, depth, activation,
                        generator=torch.Generator().manual_seed(1000 + seed))
    return make


def image_race(preset: str, quick: bool, seeds: Sequence[int],
               budget: Optional[float] = None, image: Optional[str] = None) -> Race:
    """The preset's race; ``image`` swaps in another picture (same crop, grid, network,
    targets), to check a result on data the preset was not chosen for."""
    spec = dict(IMAGE_PRESETS[preset])
    if quick:
        spec.update(spec["quick"])
    img = load_image(image or spec["image"])
    if spec["crop"]:
        img = center_crop(img, spec["crop"])
    problem = ImageProblem(img, spec["grid"])
    return Race(problem, _image_model_factory(problem.n_cells, img.shape[2]),
                targets=spec["targets"], budget=budget or spec["budget"], seeds=seeds)


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
