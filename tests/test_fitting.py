"""The fit loop's optimiser and callback interface: explicit optimisers and factories,
callbacks at every step, schedules, exact probes and stops; all bounded by steps, not time."""
import numpy as np
import pytest
import torch

from kilonerf_lbfgs.fitting import (Callback, CosineLR, ExactQuality, FitConfig, FitResult,
                                    FitState, Resample, fit, make_optimizer,
                                    wants_per_cell_losses)
from kilonerf_lbfgs.multinet import MultiMLP
from kilonerf_lbfgs.optim import BatchedLBFGS
from kilonerf_lbfgs.signals.image import ImageProblem

LOOP = dict(max_seconds=600.0, progress=False)


def problem_and_model(seed=0, channels=1):
    rng = np.random.default_rng(seed)
    r, q = np.meshgrid(np.linspace(0, 1, 16), np.linspace(0, 1, 16), indexing="ij")
    img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * r + q))
                    for _ in range(channels)], -1).astype(np.float32)
    problem = ImageProblem(img, (2, 2))
    model = MultiMLP(problem.n_cells, 2, channels, 16, 2,
                     generator=torch.Generator().manual_seed(seed))
    return problem, model


class Recorder(Callback):
    """Records every hook; stops the fit after ``n`` steps."""

    def __init__(self, n):
        self.n, self.calls, self.steps, self.qualities = n, [], [], []

    def on_fit_begin(self, state):
        self.calls.append("begin")

    def on_step_begin(self, state):
        self.calls.append("step_begin")

    def on_step_end(self, state):
        self.calls.append("step_end")
        self.steps.append(state.result.steps)
        self.qualities.append(state.quality)
        assert state.losses.shape == (state.problem.n_cells,)
        if state.result.steps >= self.n:
            state.stop = "enough"

    def on_fit_end(self, state):
        self.calls.append("end")


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam", "torch_lbfgs"])
def test_callback_sees_every_step(optimizer):
    problem, model = problem_and_model()
    rec = Recorder(6)
    res = fit(model, problem, FitConfig(optimizer=optimizer, lr=3e-3 if optimizer == "adam"
                                        else None, **LOOP), callbacks=[rec])
    assert res.stopped == "enough" and res.steps == 6
    assert rec.calls == ["begin"] + ["step_begin", "step_end"] * 6 + ["end"]
    assert rec.steps == list(range(1, 7))
    assert rec.qualities == [q for _, q in res.history]
    assert res.final_quality == rec.qualities[-1]
    assert res.best_quality == max(rec.qualities) and res.quality >= res.final_quality


def test_explicit_sgd_instance_improves_quality():
    problem, model = problem_and_model(1)
    with torch.no_grad():
        before = problem.quality(problem.cell_losses(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert not wants_per_cell_losses(opt)          # its closure gets the summed loss
    res = fit(model, problem, FitConfig(**LOOP), optimizer=opt, callbacks=[Recorder(200)])
    assert res.steps == 200 and res.function_evals == 200 and res.iterations == 200
    with torch.no_grad():
        after = problem.quality(problem.cell_losses(model))
    # the history lags one step (SGD reports the loss where its step began)
    assert res.final_quality == pytest.approx(res.history[-1][1])
    assert res.quality >= res.final_quality
    assert after > before + 5.0, (before, after)
    assert res.quality > before + 5.0


def test_factory_matches_the_configured_optimizer():
    """fit(cfg) and fit(optimizer=factory) follow the same iterates."""
    cfg = FitConfig(optimizer="lbfgs", history_size=10, **LOOP)
    states, results = [], []
    for explicit in (False, True):
        problem, model = problem_and_model(2)
        kw = dict(optimizer=lambda params: make_optimizer(cfg, params)) if explicit else {}
        results.append(fit(model, problem, cfg, callbacks=[Recorder(4)], **kw))
        states.append(model.state_dict())
    assert [q for _, q in results[0].history] == [q for _, q in results[1].history]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert results[0].iterations > 0        # BatchedLBFGS's own count (StopWhenConverged)


def test_torch_lbfgs_with_exact_quality_reports_the_final_point():
    problem, model = problem_and_model(3)
    res = fit(model, problem, FitConfig(**LOOP),
              optimizer=lambda p: torch.optim.LBFGS(p, max_iter=5, history_size=10,
                                                    line_search_fn="strong_wolfe"),
              callbacks=[ExactQuality(), Recorder(3)])
    with torch.no_grad():
        now = problem.quality(problem.cell_losses(model))
    assert res.quality == pytest.approx(now, abs=1e-9)


def test_lr_scheduler_and_plain_function_as_callbacks():
    problem, model = problem_and_model(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    res = fit(model, problem, FitConfig(**LOOP), optimizer=opt,
              callbacks=[sched, lambda s: seen.append(s.result.steps), Recorder(5)])
    assert res.steps == 5 and seen == [1, 2, 3, 4, 5]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 5)


def test_cosine_lr_follows_the_clock():
    problem, model = problem_and_model(5)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    cos = CosineLR(total_seconds=10.0)
    res = FitResult(0.0, 0, 0, 0)
    state = FitState(model, opt, problem, FitConfig(), res)
    cos.on_fit_begin(state)
    for seconds, factor in ((0.0, 1.0), (5.0, 0.5), (10.0, 0.0), (20.0, 0.0)):
        res.train_seconds = seconds
        cos.on_step_begin(state)
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * factor)
    assert opt.param_groups[0]["initial_lr"] == 2e-3


def test_bad_arguments_raise_value_error():
    problem, model = problem_and_model()
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(model, problem, FitConfig(lr_schedule="cosine", **LOOP),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(model, problem, FitConfig(optimizer="adam", lr_schedule="linear", **LOOP))
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        fit(model, problem, FitConfig(**LOOP), optimizer=lambda params: None)
    with pytest.raises(ValueError, match="callbacks"):
        fit(model, problem, FitConfig(**LOOP), callbacks=[42])
    with pytest.raises(ValueError, match="unknown optimizer"):
        fit(model, problem, FitConfig(optimizer="sgd", **LOOP))


def test_batched_lbfgs_gets_per_cell_losses():
    problem, model = problem_and_model()
    assert wants_per_cell_losses(BatchedLBFGS(model.parameters()))
    opt = torch.optim.Adam(model.parameters())
    opt.per_cell_closure = True                 # any optimiser can ask for them
    assert wants_per_cell_losses(opt)


@pytest.mark.parametrize("optimizer,limit", [("adam", 12), ("lbfgs", 12)])
def test_max_evals_is_a_budget_in_closure_evaluations(optimizer, limit):
    problem, model = problem_and_model()
    res = fit(model, problem, FitConfig(optimizer=optimizer, evals_per_step=5,
                                        max_evals=limit, **LOOP))
    # the loop stops at the first step boundary at or past the budget
    assert limit <= res.function_evals <= limit + 4, res.function_evals
    assert res.stopped == "budget"
    with pytest.raises(ValueError, match="max_evals"):
        fit(model, problem, FitConfig(max_evals=-1, **LOOP))


def test_only_timed_callbacks_count_as_training_time():
    import time as _time

    class Sleep(Callback):
        def __init__(self, timed):
            self.timed = timed

        def on_step_begin(self, state):
            _time.sleep(0.05)

    secs = {}
    for timed in (False, True):
        problem, model = problem_and_model()
        res = fit(model, problem, FitConfig(optimizer="adam", max_evals=6, **LOOP),
                  callbacks=[Sleep(timed)])
        secs[timed] = res.train_seconds
    assert secs[True] >= 6 * 0.05
    assert secs[True] - secs[False] >= 6 * 0.05 * 0.5       # the untimed sleeps are not counted


class Worsen(Callback):
    """From step ``at`` on, adds noise to the parameters after each step (untimed) and
    re-evaluates: the quality falls, as when a fit overfits or diverges."""

    def __init__(self, at, scale=0.3):
        self.at, self.scale = at, scale

    def on_step_end(self, state):
        if state.result.steps >= self.at:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.add_(self.scale * torch.randn_like(p))
                state.set_losses(state.problem.cell_losses(state.model))


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_ends_on_the_best_parameters(keep_best, tmp_path):
    problem, model = problem_and_model(6)
    cfg = FitConfig(optimizer="adam", lr=1e-2, keep_best=keep_best,
                    ckpt_path=str(tmp_path / "ckpt.pt"), **LOOP)
    res = fit(model, problem, cfg, callbacks=[Worsen(8), Recorder(12)])
    qualities = [q for _, q in res.history]
    assert res.final_quality == qualities[-1] < max(qualities) - 1.0
    with torch.no_grad():
        now = problem.quality(problem.cell_losses(model))
    if keep_best:
        best = int(np.argmax(qualities))
        assert res.best_quality == max(qualities)
        assert res.best_seconds == res.history[best][0] and res.best_evals == best + 1
        # the model ends on the best step's parameters and the quality is measured on them
        # (Adam reports each step's quality before its update: it is at least as good)
        assert now == pytest.approx(res.quality, abs=1e-9)
        assert res.quality > res.final_quality + 1.0
        # the checkpoint holds the last point (to resume from) and the best one
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
        assert ckpt["best"]["quality"] == res.best_quality
        assert ckpt["history"][-1][1] == res.final_quality
        # a resumed fit keeps the best seen before it
        res2 = fit(model, problem, FitConfig(optimizer="adam", lr=1e-2, **LOOP),
                   resume=ckpt, callbacks=[Worsen(0), Recorder(14)])
        assert res2.best_quality >= res.best_quality
    else:
        assert res.quality == res.final_quality and np.isnan(res.best_quality)
        assert now == pytest.approx(res.final_quality, abs=1e-6)


def test_keep_best_restores_after_divergence():
    problem, model = problem_and_model(7)
    opt = torch.optim.SGD(model.parameters(), lr=1e6)     # blows up within a few steps
    res = fit(model, problem, FitConfig(**LOOP), optimizer=opt, callbacks=[Recorder(50)])
    assert res.stopped == "diverged"
    assert np.isfinite(res.quality) and np.isfinite(res.best_quality)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class CountingLBFGS(BatchedLBFGS):
    def __init__(self, params):
        super().__init__(params, max_eval=3)
        self.news = []

    def new_objective(self, keep_history=True):
        self.news.append(keep_history)
        super().new_objective(keep_history)


@pytest.mark.parametrize("every,keep,steps_per_draw", [(3, True, 1), (7, False, 3)])
def test_resample_draws_every_n_evaluations_and_tells_lbfgs(every, keep, steps_per_draw):
    """3 evaluations per L-BFGS step: a draw at every step for every=3, every third step
    for every=7 (the first step boundary with at least 7 evaluations on the draw)."""
    problem, model = problem_and_model(8)
    draws = []
    opt = CountingLBFGS(model.parameters())
    res = fit(model, problem, FitConfig(**LOOP), optimizer=opt,
              callbacks=[Resample(lambda: draws.append(1), every, keep),
                         Recorder(10)])
    n = len(range(steps_per_draw, 10, steps_per_draw))    # before those steps (never step 0)
    assert len(draws) == n and opt.news == [keep] * n
    assert res.function_evals == 30
    with pytest.raises(ValueError, match="every"):
        Resample(lambda: None, 0)
