"""The NeRF pipeline: stages, budgets, checkpoints and resume.

Routes (``route`` option):

* ``distill`` (KiloNeRF's): ``teacher`` (dense-grid field trained on the photos; its
  density drives the occupancy grid) -> ``distill`` (each occupied cell's network learns the
  teacher on the ray samples in its cell: a separable per-cell problem for
  :class:`~kilonerf_lbfgs.optim.BatchedLBFGS`, or Adam) -> ``finetune`` (all cells on the
  photos, Adam).
* ``direct``: the cell networks trained from the photos from the start (coupled
  BatchedLBFGS or Adam), the occupancy grid updated from their own density.

The training budget ``max_seconds`` is split between the stages by fractions; only
training is timed (no evaluation, no checkpoint I/O). A checkpoint holds everything needed
to continue: the stage, every model, the occupancy grid, the optimiser, the clock, the
history and the random generator; it is written atomically every ``ckpt_every`` seconds
and at each stage's end.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field as dc_field, fields, replace
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ...distributed import current, fit_sharded
from ...fitting import FitConfig, fit
from ...grid import CellGrid
from ...io import load_checkpoint, save_checkpoint
from .distill import (DistillProblem, FreshUniformSamples, collect_distill_samples,
                      concat_samples, uniform_distill_samples)
from ..fields.background import BackgroundMap
from ..fields.kilonerf import KiloNeRFField
from ..render.marcher import Marcher
from .photometric import LoopState, PhotometricConfig, make_photometric_optimizer, train_photometric
from ..data.rays import RayBank
from ..render.rendering import RenderSettings
from ..fields.teacher import DenseGridTeacher, HashGridTeacher, make_teacher

STAGES = {"distill": ("teacher", "distill", "finetune"), "direct": ("direct",)}
DISTILL_SAMPLING = ("rays", "uniform", "mixed", "fresh")


@dataclass
class NerfOptions:
    """Every pipeline option. ``scripts/train_nerf.py`` has one flag per field (``--name``;
    help, choices and bounds from each field's metadata); ``aabb``, ``near``, ``far``,
    ``background`` and ``progress`` (``cli: False``) come from the scene and its flags."""
    route: str = dc_field(default="distill", metadata={
        "help": "distill: teacher, per-cell distillation, fine-tuning; direct: the cells "
                "from the photos", "choices": ("distill", "direct")})
    aabb: List[float] = dc_field(default_factory=lambda: [-1.5, -1.5, -1.5, 1.5, 1.5, 1.5],
                                 metadata={"help": "scene box xmin ymin zmin xmax ymax zmax",
                                           "cli": False})
    near: float = dc_field(default=2.0, metadata={"help": "ray start", "cli": False})
    far: float = dc_field(default=6.0, metadata={"help": "ray end", "cli": False})
    background: List[float] = dc_field(default_factory=lambda: [1.0, 1.0, 1.0], metadata={
        "help": "RGB the renders are composited on", "cli": False})
    background_model: str = dc_field(default="constant", metadata={
        "help": "what a ray sees after the scene box: constant (the background colour; "
                "masked scenes) or learned (a colour per direction trained with the cells; "
                "unmasked captures; stages trained with Adam)",
        "choices": ("constant", "learned")})
    background_res: int = dc_field(default=32, metadata={
        "help": "learned background: rows of its direction map (twice as many columns)",
        "positive": True})
    background_lr: float = dc_field(default=1e-2, metadata={
        "help": "learned background: Adam rate", "positive": True})
    step_size: float = dc_field(default=0.0, metadata={
        "help": "marching step (0: box diagonal / 256)", "min": 0})
    grid_res: int = dc_field(default=16, metadata={
        "help": "KiloNeRF cells per axis (1 to 64: 64^3 = 262k tiny networks)",
        "positive": True, "max": 64})
    width: int = dc_field(default=32, metadata={
        "help": "hidden width per cell network", "positive": True})
    depth: int = dc_field(default=3, metadata={
        "help": "hidden layers per cell network", "positive": True})
    feature_dim: int = dc_field(default=15, metadata={
        "help": "features from the cell network to its colour head", "positive": True})
    head_width: int = dc_field(default=32, metadata={
        "help": "hidden width of the colour head", "positive": True})
    activation: str = dc_field(default="sine", metadata={"help": "cell networks' activation"})
    # omega_0 10: lego 100x100 30.7 dB against 25.1 dB at 30 (see the README)
    omega_0: float = dc_field(default=10.0, metadata={
        "help": "sine frequency of the cell networks", "positive": True})
    head_omega: float = dc_field(default=5.0, metadata={
        "help": "sine frequency of the colour head", "positive": True})
    occ_res: int = dc_field(default=64, metadata={
        "help": "occupancy grid voxels per axis (1 to 512)", "positive": True, "max": 512})
    occ_threshold: float = dc_field(default=0.01, metadata={
        "help": "a voxel is occupied when one marching step there has alpha above this",
        "min": 0, "max": 1})
    max_seconds: float = dc_field(default=600.0, metadata={
        "help": "training budget in seconds, split between the stages", "positive": True})
    teacher_fraction: float = dc_field(default=0.4, metadata={
        "help": "distill route: share of max_seconds for the teacher", "min": 0, "max": 1})
    distill_fraction: float = dc_field(default=0.3, metadata={
        "help": "distill route: share of max_seconds for distillation", "min": 0, "max": 1})
    teacher: str = dc_field(default="dense", metadata={
        "help": "distill route's teacher: dense grids, or a hash encoding (tinycudann on "
                "CUDA where installed, else pure PyTorch)", "choices": ("dense", "hash")})
    teacher_res: int = dc_field(default=128, metadata={
        "help": "dense teacher: density grid per axis", "positive": True})
    teacher_color_res: int = dc_field(default=64, metadata={
        "help": "dense teacher: feature grid per axis", "positive": True})
    teacher_lr: Optional[float] = dc_field(default=None, metadata={
        "help": "Adam rate of the teacher (default: dense 0.3, hash 1e-2)", "positive": True})
    hash_levels: int = dc_field(default=8, metadata={
        "help": "hash teacher: levels", "positive": True})
    hash_log2_table: int = dc_field(default=15, metadata={
        "help": "hash teacher: 2^k feature rows per level (Instant-NGP: 19)", "positive": True})
    hash_max_res: int = dc_field(default=256, metadata={
        "help": "hash teacher: finest lattice resolution (Instant-NGP: 2048)",
        "positive": True})
    tv_weight: float = dc_field(default=0.0, metadata={
        "help": "total-variation weight on the dense teacher's density grid", "min": 0})
    batch_rays: int = dc_field(default=4096, metadata={
        "help": "rays per photometric step", "positive": True})
    distill_rays: int = dc_field(default=65536, metadata={
        "help": "rays whose samples make the distillation set", "positive": True})
    distill_max_per_cell: int = dc_field(default=1024, metadata={
        "help": "distillation: ray samples kept per cell", "positive": True})
    distill_sampling: str = dc_field(default="rays", metadata={
        "help": "distillation samples: the teacher's ray samples (rays), points uniform in "
                "each cell (uniform, KiloNeRF's), both (mixed), or uniform points drawn "
                "afresh before every step (fresh; an L-BFGS step is then a round of "
                "evals_per_step evaluations on one draw)",
        "choices": ("rays", "uniform", "mixed", "fresh")})
    distill_uniform_per_cell: int = dc_field(default=2048, metadata={
        "help": "distillation: uniform samples per cell (uniform, mixed; fresh: per draw)",
        "positive": True})
    distill_evals: int = dc_field(default=0, metadata={
        "help": "the distillation stage also stops after this many function evaluations "
                "(0: time budget only)", "min": 0})
    optimizer: str = dc_field(default="lbfgs", metadata={
        "help": "the cells' optimiser (distill stage / direct route); lbfgs_targets (direct "
                "route): per-cell L-BFGS on Gauss-Newton output targets of each ray batch",
        "choices": ("lbfgs", "adam", "lbfgs_targets")})
    lr: Optional[float] = dc_field(default=None, metadata={
        "help": "Adam rate for the cells", "positive": True})
    history_size: int = dc_field(default=30, metadata={
        "help": "L-BFGS pairs per cell", "positive": True})
    history_dtype: str = dc_field(default="auto", metadata={
        "help": "L-BFGS: storage of the curvature pairs; bfloat16 halves the memory each step "
                "reads (fused kernels widen the pairs and accumulate in float32), float32 is "
                "the exact reference, auto is bfloat16 from 32 MB of fp32 history on",
        "choices": ("auto", "bfloat16", "float16", "float32")})
    evals_per_step: int = dc_field(default=5, metadata={
        "help": "L-BFGS: function evaluations per step (direct route: per ray batch; "
                "distillation: between quality checks, or per draw with fresh sampling)",
        "positive": True})
    lbfgs_line_search: str = dc_field(default="strong_wolfe", metadata={
        "help": "direct route, optimizer lbfgs (coupled): the line search along each ray "
                "batch's direction, or none: a step of lbfgs_lr every evaluation, decayed "
                "like Adam's rate (a step schedule)",
        "choices": ("strong_wolfe", "armijo", "none")})
    lbfgs_lr: float = dc_field(default=1.0, metadata={
        "help": "direct route, optimizer lbfgs: the first trial step (line search) or the "
                "step (none)", "positive": True})
    lbfgs_max_step: float = dc_field(default=0.0, metadata={
        "help": "direct route, optimizer lbfgs: a per-cell trust region; no parameter of a "
                "cell moves more than this at a unit step (0: off)", "min": 0})
    gn_damping: float = dc_field(default=0.1, metadata={
        "help": "lbfgs_targets: Levenberg-Marquardt damping of each ray's output-space step "
                "(relative)", "positive": True})
    gn_step: float = dc_field(default=1.0, metadata={
        "help": "lbfgs_targets: fraction of the output-space step taken as the targets",
        "positive": True, "max": 1})
    targets_per_cell: int = dc_field(default=1024, metadata={
        "help": "lbfgs_targets: at most this many of a ray batch's samples per cell",
        "positive": True})
    finetune_lr: float = dc_field(default=2e-4, metadata={
        "help": "Adam rate of the fine-tuning stage", "positive": True})
    direct_lr: float = dc_field(default=5e-4, metadata={
        "help": "Adam rate of the direct route", "positive": True})
    max_steps: int = dc_field(default=0, metadata={
        "help": "photometric stages also stop after this many steps (0: time budget only); "
                "makes runs reproducible across machines and restarts", "min": 0})
    seed: int = dc_field(default=0, metadata={"help": "random seed"})
    ckpt_every: float = dc_field(default=60.0, metadata={
        "help": "seconds of training between checkpoints", "positive": True})
    progress: bool = dc_field(default=True, metadata={"help": "progress bars", "cli": False})

    def settings(self, device) -> RenderSettings:
        diag = math.dist(self.aabb[:3], self.aabb[3:])
        return RenderSettings(near=self.near, far=self.far,
                              step_size=self.step_size or diag / 256.0,
                              background=torch.tensor(self.background, device=device))

    def budgets(self) -> Dict[str, float]:
        if self.route == "direct":
            return {"direct": self.max_seconds}
        t = self.max_seconds * self.teacher_fraction
        d = self.max_seconds * self.distill_fraction
        return {"teacher": t, "distill": d, "finetune": max(self.max_seconds - t - d, 0.0)}


def route_conflict(opts) -> Optional[str]:
    """The first route/optimizer combination that does not exist in ``opts``
    (:class:`NerfOptions` or the parsed flags), as one message naming the flags; None if
    there is none. The CLI and :class:`NerfPipeline` both check with it."""
    if opts.optimizer == "lbfgs_targets" and opts.route != "direct":
        return (f"--optimizer lbfgs_targets trains from the photos: it needs --route direct "
                f"(not {opts.route})")
    defaults = {f.name: f.default for f in fields(NerfOptions)}
    coupled = [f"--{k}" for k in ("lbfgs_line_search", "lbfgs_lr", "lbfgs_max_step")
               if getattr(opts, k, defaults[k]) != defaults[k]]
    if coupled and not (opts.route == "direct" and opts.optimizer == "lbfgs"):
        return (f"{', '.join(coupled)} set(s) the coupled L-BFGS of the direct route: add "
                f"--route direct --optimizer lbfgs, or drop it (got --route {opts.route} "
                f"--optimizer {opts.optimizer})")
    return None


def new_teacher(opts: NerfOptions, device) -> nn.Module:
    """An untrained teacher of kind ``opts.teacher``."""
    if opts.teacher == "dense":
        return DenseGridTeacher(opts.aabb, opts.teacher_res, opts.teacher_color_res,
                                device=device)
    if opts.teacher == "hash":
        return HashGridTeacher(opts.aabb, n_levels=opts.hash_levels,
                               log2_table=opts.hash_log2_table, max_res=opts.hash_max_res,
                               device=device, generator=torch.Generator().manual_seed(opts.seed))
    raise ValueError(f"teacher {opts.teacher!r}: choose dense or hash")


def teacher_lr(opts: NerfOptions, teacher: nn.Module) -> float:
    """``--teacher_lr``, or the teacher's own default rate."""
    return opts.teacher_lr if opts.teacher_lr is not None else type(teacher).default_lr


class NerfPipeline:
    """Runs the stages of one route with checkpoints; ``run()`` returns the trained field."""

    def __init__(self, opts: NerfOptions, train_bank: RayBank, device, ckpt_path: str,
                 extra: Optional[Dict] = None):
        if opts.route not in STAGES:
            raise ValueError(f"route {opts.route!r}: choose distill or direct")
        if (opts.background_model == "learned" and opts.route == "direct"
                and opts.optimizer != "adam"):
            raise ValueError(f"background_model learned trains with Adam; the direct route "
                             f"with optimizer {opts.optimizer} cannot train it (use "
                             f"background_model constant, or optimizer adam)")
        conflict = route_conflict(opts)
        if conflict:
            raise ValueError(conflict)
        if opts.distill_sampling not in DISTILL_SAMPLING:
            raise ValueError(f"distill_sampling {opts.distill_sampling!r}: choose one of "
                             f"{', '.join(DISTILL_SAMPLING)}")
        self.opts, self.bank, self.device = opts, train_bank, device
        self.ckpt_path, self.extra = ckpt_path, dict(extra or {})
        self.rs = opts.settings(device)
        self.background: Optional[BackgroundMap] = None      # the learned one, if any
        if opts.background_model == "learned":
            # starts grey: a sigmoid saturated at black or white would barely learn
            self.background = BackgroundMap(opts.background_res, device=device)
            self.rs = replace(self.rs, background=self.background)
        self.gen = torch.Generator().manual_seed(opts.seed)
        torch.manual_seed(opts.seed)
        self.marcher = Marcher(opts.aabb, opts.occ_res, threshold=opts.occ_threshold,
                               device=device)
        self.teacher: Optional[nn.Module] = None     # DenseGridTeacher or HashGridTeacher
        self.field: Optional[KiloNeRFField] = None
        self.stage = STAGES[opts.route][0]
        self.done: Dict[str, Dict] = {}      # finished stages: seconds, evals, history
        self.loop = LoopState()
        self.resume_payload: Optional[Dict] = None
        # probe(field, seconds of training since the run began): called untimed every
        # probe_every seconds while the cell networks train, and when a stage ends with them
        self.probe: Optional[Callable[[KiloNeRFField, float], None]] = None
        self.probe_every: float = math.inf
        # a live viewer (kilonerf_lbfgs.nerf.viewer.NerfViewer) shown the model in training
        self.viewer = None

    # ------------------------------------------------------------------ checkpoints
    def _payload(self, opt=None, fit_payload: Optional[Dict] = None) -> Dict:
        p = {"kind": "nerf", "options": self.opts.__dict__, "stage": self.stage,
             "done": self.done, "marcher": self.marcher.state_dict(),
             "rng": self.gen.get_state(),
             "loop": {"seconds": self.loop.seconds, "steps": self.loop.steps,
                      "evals": self.loop.evals, "history": self.loop.history}}
        if self.teacher is not None:
            p["teacher"] = {"config": {"aabb": self.teacher.aabb, **self.teacher.hparams},
                            "state": self.teacher.state_dict()}
        if self.field is not None:
            p["field"] = {"config": self.field.config(), "state": self.field.state_dict()}
        if self.background is not None:
            p["background"] = self.background.state_dict()
        if opt is not None:
            p["optimizer"] = opt.state_dict()
        p.update(self.extra)
        return p

    def save(self, opt=None) -> None:
        shards = current()
        if shards is None or shards.is_main:         # data parallel: rank 0 writes
            save_checkpoint(self.ckpt_path, self._payload(opt))

    def load(self, ckpt: Dict) -> None:
        """Restore a checkpoint written by this pipeline (same route)."""
        if ckpt.get("kind") != "nerf" or ckpt["options"].get("route") != self.opts.route:
            raise ValueError(f"{self.ckpt_path} was written by a run of another route; "
                             f"train into another output folder")
        self.stage, self.done = ckpt["stage"], ckpt["done"]
        self.marcher.load_state_dict(ckpt["marcher"])
        self.gen.set_state(ckpt["rng"])
        lp = ckpt["loop"]
        self.loop = LoopState(lp["seconds"], lp["steps"], lp["evals"], lp["history"])
        if "teacher" in ckpt:
            config = dict(ckpt["teacher"]["config"])
            self.teacher = make_teacher(config, config.pop("aabb"), device=self.device)
            self.teacher.load_state_dict(ckpt["teacher"]["state"])
        if "field" in ckpt:
            self.field = KiloNeRFField.from_config(ckpt["field"]["config"], device=self.device)
            self.field.load_state_dict(ckpt["field"]["state"])
        if self.background is not None and "background" in ckpt:
            self.background.load_state_dict(ckpt["background"])
        self.resume_payload = ckpt

    def _with_background(self, opt):
        """Adam ``opt`` with the learned background's parameter group added (if any)."""
        if self.background is not None:
            opt.add_param_group({"params": list(self.background.parameters()),
                                 "lr": self.opts.background_lr})
        return opt

    def _resume_opt(self, opt) -> None:
        if self.resume_payload is not None and "optimizer" in self.resume_payload:
            opt.load_state_dict(self.resume_payload["optimizer"])
        self.resume_payload = None

    def _finish(self, stage: str, **info) -> None:
        self.done[stage] = {"seconds": self.loop.seconds, "steps": self.loop.steps,
                            "function_evals": self.loop.evals, "history": self.loop.history,
                            **info}
        stages = STAGES[self.opts.route]
        i = stages.index(stage)
        self.stage = stages[i + 1] if i + 1 < len(stages) else "done"
        self.loop = LoopState()
        self.save()

    # ------------------------------------------------------------------ stages
    def new_field(self, occupied: Optional[torch.Tensor]) -> KiloNeRFField:
        o = self.opts
        return KiloNeRFField(o.aabb, o.grid_res, occupied, o.width, o.depth, o.feature_dim,
                             o.head_width, o.activation, o.omega_0, o.head_omega,
                             generator=torch.Generator().manual_seed(o.seed), device=self.device)

    def run_teacher(self) -> None:
        o = self.opts
        if self.teacher is None:
            self.teacher = new_teacher(o, self.device)
        opt = self._with_background(self.teacher.optimizer(lr_grid=teacher_lr(o, self.teacher)))
        self._resume_opt(opt)
        cfg = PhotometricConfig(optimizer="adam", batch_rays=o.batch_rays,
                                seconds=self.opts.budgets()["teacher"], tv_weight=o.tv_weight,
                                max_steps=o.max_steps, desc="teacher")
        shards = current()           # torchrun: data parallel (Adam)
        train_photometric(self.teacher, self.marcher, self.bank, self.rs, cfg, self.loop, opt,
                          self.gen, checkpoint=lambda: self.save(opt), ckpt_every=o.ckpt_every,
                          progress=o.progress, shards=shards,
                          **self._viewer_hooks("teacher", self.teacher))
        self.marcher.update(self.teacher.density, self.rs.step_size)
        self._finish("teacher")

    def distill_problem(self) -> DistillProblem:
        """The distillation problem (the teacher's samples in the field's cells)."""
        o = self.opts
        if self.field is None:
            occ = self.marcher.grid.cells_occupied(CellGrid(o.aabb[:3], o.aabb[3:], o.grid_res))
            self.field = self.new_field(occ.cpu())
        gen = torch.Generator().manual_seed(o.seed + 1)
        samples = None
        if o.distill_sampling in ("rays", "mixed"):
            samples = collect_distill_samples(self.teacher, self.marcher, self.bank, self.field,
                                              self.rs, o.distill_rays, o.distill_max_per_cell,
                                              gen)
        if o.distill_sampling in ("uniform", "mixed", "fresh"):
            uni = uniform_distill_samples(self.teacher, self.field, o.distill_uniform_per_cell,
                                          self.rs.step_size, gen)
            samples = uni if samples is None else concat_samples(samples, uni)
        return DistillProblem(samples, self.rs.step_size)

    def run_distill(self) -> None:
        o = self.opts
        problem = self.distill_problem()
        cfg = FitConfig(optimizer=o.optimizer, lr=o.lr, history_size=o.history_size,
                        history_dtype=o.history_dtype, evals_per_step=o.evals_per_step,
                        max_seconds=self.opts.budgets()["distill"], max_evals=o.distill_evals,
                        ckpt_path=self.ckpt_path, ckpt_every=o.ckpt_every,
                        progress=o.progress, desc=f"distill {o.optimizer}",
                        # the quality is measured on the training draws: end on the last
                        # point, which the fine-tune continues from
                        keep_best=False)
        resume = None
        if self.resume_payload is not None and "fit" in self.resume_payload:
            resume = self.resume_payload["fit"]
            resume = {**resume, "model": self.resume_payload["field"]["state"]}
        self.resume_payload = None
        # fit() writes its own checkpoints; they carry the pipeline state as extra keys
        pipeline_state = self._payload()
        callbacks = []
        if o.distill_sampling == "fresh":
            callbacks.append(FreshUniformSamples(
                problem, self.teacher, self.field, o.distill_uniform_per_cell,
                self.rs.step_size, torch.Generator().manual_seed(o.seed + 2)))
        extra = {**pipeline_state, "fit_stage": True}
        shards = current()
        if shards is None:
            res = fit(self.field, problem, cfg, resume=resume, extra_ckpt=extra,
                      callbacks=callbacks)
        else:       # torchrun: the networks sharded over ranks (every rank draws all samples)
            res = fit_sharded(shards, self.field, problem, cfg, resume=resume,
                              extra_ckpt=extra, callbacks=callbacks)
        # _finish() writes the next checkpoint in the pipeline's layout (field under "field")
        self.loop = LoopState(res.train_seconds, res.steps, res.function_evals, res.history)
        if self.probe is not None:
            self.probe(self.field, self._seconds_before(self.stage) + res.train_seconds)
        self._finish("distill", distill_psnr=res.quality,
                     n_cells=self.field.n_nets, params_per_cell=self.field.params_per_cell)

    def run_photometric(self, stage: str, optimizer: str, lr: float) -> None:
        o = self.opts
        if self.field is None:
            self.field = self.new_field(None)
        cfg = PhotometricConfig(optimizer=optimizer, lr=lr, batch_rays=o.batch_rays,
                                seconds=self.opts.budgets()[stage], history_size=o.history_size,
                                history_dtype=o.history_dtype, lbfgs_evals=o.evals_per_step, max_steps=o.max_steps,
                                gn_damping=o.gn_damping, gn_step=o.gn_step,
                                targets_per_cell=o.targets_per_cell,
                                lbfgs_line_search=o.lbfgs_line_search, lbfgs_lr=o.lbfgs_lr,
                                lbfgs_max_step=o.lbfgs_max_step or None,
                                desc=f"{stage} {optimizer}")
        opt = make_photometric_optimizer(self.field, cfg)
        if optimizer == "adam":
            opt = self._with_background(opt)
        self._resume_opt(opt)
        probe = None
        if self.probe is not None:
            offset = self._seconds_before(stage)
            probe = lambda s: self.probe(self.field, offset + s)  # noqa: E731
        shards = current()
        train_photometric(self.field, self.marcher, self.bank, self.rs, cfg, self.loop, opt,
                          self.gen, checkpoint=lambda: self.save(opt), ckpt_every=o.ckpt_every,
                          progress=o.progress, probe=probe, probe_every=self.probe_every,
                          shards=shards, **self._viewer_hooks(f"{stage} ({optimizer})",
                                                              self.field))
        self._finish(stage)

    def _viewer_hooks(self, label: str, model: nn.Module) -> Dict:
        """train_photometric's ``step_lock`` and ``on_step`` for the live viewer, if any."""
        if self.viewer is None:
            return {}
        from ..viewer import progress_text
        self.viewer.set_field(model, self.marcher)
        return {"step_lock": self.viewer.lock,
                "on_step": lambda st, psnr: self.viewer.update(
                    progress_text(label, st.steps, self._seconds_before(self.stage) + st.seconds,
                                  psnr))}

    def _seconds_before(self, stage: str) -> float:
        """Training seconds of the stages that precede ``stage`` in this route."""
        stages = STAGES[self.opts.route]
        return sum(self.done[s]["seconds"] for s in stages[:stages.index(stage)]
                   if s in self.done)

    def run(self) -> KiloNeRFField:
        o = self.opts
        while self.stage != "done":
            if self.stage == "teacher":
                self.run_teacher()
            elif self.stage == "distill":
                self.run_distill()
            elif self.stage == "finetune":
                self.run_photometric("finetune", "adam", o.finetune_lr)
            elif self.stage == "direct":
                self.run_photometric("direct", o.optimizer, o.lr or o.direct_lr)
        return self.field

    def train_seconds(self) -> float:
        return sum(d["seconds"] for d in self.done.values()) + self.loop.seconds

    def function_evals(self) -> int:
        return sum(d["function_evals"] for d in self.done.values()) + self.loop.evals

    def history(self) -> List[List[float]]:
        """``[[seconds since the run began, quality], ...]`` over stages (each stage's own
        quality: the teacher's / fine-tune's train-batch PSNR, the distillation PSNR)."""
        out, offset = [], 0.0
        for stage in STAGES[self.opts.route]:
            if stage in self.done:
                out += [[offset + s, q] for s, q in self.done[stage]["history"]]
                offset += self.done[stage]["seconds"]
        return out


def resume_or_new(pipe: NerfPipeline, resume: bool) -> None:
    """Load ``pipe.ckpt_path`` when asked and present (fit()'s distill checkpoints included)."""
    if not (resume and os.path.isfile(pipe.ckpt_path)):
        return
    ckpt = load_checkpoint(pipe.ckpt_path, map_location=pipe.device)
    if ckpt.get("fit_stage"):
        # written by fit() during distillation: the field is under "model"
        ckpt["field"]["state"] = ckpt["model"]
        ckpt["fit"] = {k: ckpt[k] for k in ("model", "optimizer", "train_seconds", "steps",
                                              "function_evals", "history")}
    pipe.load(ckpt)
    print(f"resuming stage {pipe.stage} from {pipe.ckpt_path} "
          f"({pipe.train_seconds():.1f} s trained)")
