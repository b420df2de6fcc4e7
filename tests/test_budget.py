"""The arithmetic of --time-budget (widenet.train.budget), against naive oracles."""

from __future__ import annotations

import pytest

from widenet.train.budget import Cadence, Deadline, evaluations_in, steps_within, time_per_call


def _evaluations_by_simulation(total: int, per_epoch: int, eval_every: int) -> int:
    """The training loop's rule, step by step: an epoch ends after per_epoch batches; evaluate when
    the run is over or the finished epoch count is a multiple of eval_every (once per epoch loop)."""
    step = epoch = evaluations = 0
    while step < total:
        batch = 0
        while batch < per_epoch and step < total:
            step += 1
            batch += 1
        if batch >= per_epoch:
            epoch += 1
        if step >= total or epoch % eval_every == 0:
            evaluations += 1
    return evaluations


@pytest.mark.parametrize("per_epoch", [1, 7, 10])
@pytest.mark.parametrize("eval_every", [1, 2, 3])
def test_evaluations_in_matches_the_loop(per_epoch, eval_every):
    for total in range(1, 70):
        assert evaluations_in(total, per_epoch, eval_every) == _evaluations_by_simulation(
            total, per_epoch, eval_every), (total, per_epoch, eval_every)


def test_evaluations_in_by_hand():
    assert evaluations_in(30, 10, 3) == 1  # epoch 3 is both an eval epoch and the end
    assert evaluations_in(35, 10, 3) == 2  # epoch 3, then the end (half-way through epoch 4)
    assert evaluations_in(60, 10, 3) == 2  # epochs 3 and 6
    assert evaluations_in(40, 10, 1) == 4


def _steps_by_scan(seconds, step_s, eval_s, per_epoch, eval_every, most):
    best = 0
    for steps in range(1, most + 1):
        if steps * step_s + evaluations_in(steps, per_epoch, eval_every) * eval_s <= seconds:
            best = steps
    return best


@pytest.mark.parametrize("seconds,step_s,eval_s,per_epoch,eval_every", [
    (10.0, 0.1, 0.0, 10, 1),
    (10.0, 0.1, 1.0, 10, 1),
    (10.0, 0.1, 1.0, 10, 4),
    (3.3, 0.05, 0.7, 7, 2),
    (0.5, 0.1, 1.0, 10, 1),  # not even one step and the final evaluation
    (1.1, 0.1, 1.0, 10, 1),  # exactly one step
])
def test_steps_within_matches_a_scan(seconds, step_s, eval_s, per_epoch, eval_every):
    expected = _steps_by_scan(seconds, step_s, eval_s, per_epoch, eval_every, most=400)
    assert steps_within(seconds, step_s, eval_s, Cadence(per_epoch, eval_every), most=400) == expected


def test_steps_within_by_hand():
    # 100 steps cost 10 s, plus 10 evaluations of 1 s: 20 s; 101 steps would add a step and an evaluation.
    assert steps_within(20.0, 0.1, 1.0, Cadence(10, 1)) == 100
    assert steps_within(20.0, 0.1, 0.0, Cadence(10, 1)) == 200
    assert steps_within(-5.0, 0.1, 1.0, Cadence(10, 1)) == 0


def test_steps_within_rejects_non_positive_step_time():
    with pytest.raises(ValueError, match="step time"):
        steps_within(10.0, 0.0, 1.0, Cadence(10, 1))


def test_time_per_call_counts_warmup_and_minimum_calls(monkeypatch):
    """On a fake clock: the two warm-up calls (10 s each) are run but not timed; the mean is over the
    timed calls (1 s each), at least min_calls of them and until min_seconds have passed."""
    now, calls = [0.0], []

    def call() -> None:
        now[0] += 10.0 if len(calls) < 2 else 1.0
        calls.append(1)

    monkeypatch.setattr("widenet.train.budget.time.perf_counter", lambda: now[0])
    assert time_per_call(call, warmup=2, min_calls=5, min_seconds=0.0) == 1.0
    assert len(calls) == 7
    calls.clear()
    assert time_per_call(call, warmup=2, min_calls=5, min_seconds=8.0) == 1.0
    assert len(calls) == 2 + 8  # 5 calls were not yet 8 seconds


def _steps_after_by_scan(seconds, step_s, eval_s, per_epoch, eval_every, done, most):
    evaluated = (done // per_epoch) // eval_every
    best = done
    for steps in range(done + 1, most + 1):
        cost = (steps - done) * step_s + (evaluations_in(steps, per_epoch, eval_every) - evaluated) * eval_s
        if cost <= seconds:
            best = steps
    return best


@pytest.mark.parametrize("done", [0, 10, 20, 25, 40])
@pytest.mark.parametrize("seconds", [-1.0, 0.0, 3.0, 17.5, 60.0])
def test_steps_within_after_done_matches_a_scan(done, seconds):
    assert steps_within(seconds, 0.5, 2.0, Cadence(10, 2), done=done, most=300) == _steps_after_by_scan(
        seconds, 0.5, 2.0, 10, 2, done=done, most=300)


def test_deadline_replans_for_the_time_left():
    now = [40.0]
    deadline = Deadline(budget_s=100.0, cadence=Cadence(10, 1), step_s=1.0, eval_s=5.0, started=0.0,
                        clock=lambda: now[0])
    # 60 s left after 20 steps (2 epochs, 2 evaluations behind): 40 more steps cost 40 s and their
    # 4 evaluations (epochs 3-6) 20 s; a 41st step would add a step and a final evaluation.
    assert deadline.steps(20) == 60
    # The machine slowed down: 22 more steps (44 s) and 3 evaluations (epochs 3 and 4, and the final
    # one at step 42: 15 s) take 59 s; a 23rd step would make it 61.
    deadline.step_s = 2.0
    assert deadline.steps(20) == 42
    now[0] = 120.0  # over the budget: stop where we are
    assert deadline.steps(20) == 20
    resumed = Deadline(100.0, Cadence(10, 1), 1.0, 5.0, started=0.0, spent_before=30.0, clock=lambda: 10.0)
    assert resumed.spent() == 40.0 and resumed.steps(20) == 60


def test_deadline_step_time_is_the_mean_of_observed_steps():
    deadline = Deadline(100.0, Cadence(10, 1), step_s=9.0, eval_s=0.0, started=0.0, clock=lambda: 0.0)
    deadline.observe_steps(0, 5.0)  # nothing timed: the planning's estimate stays
    assert deadline.step_s == 9.0
    deadline.observe_steps(10, 10.0)
    deadline.observe_steps(10, 30.0)
    assert deadline.step_s == 2.0  # 40 s over 20 steps, not the last epoch's 3 s


def _evaluations_by_step_simulation(total: int, every_steps: int | None) -> int:
    """The trainer's rule for step cadences: after every `every_steps`-th step before the last, and at the end."""
    return sum(1 for step in range(1, total) if every_steps and step % every_steps == 0) + 1


@pytest.mark.parametrize("every_steps", [None, 1, 3, 10])
def test_step_cadence_counts_evaluations_like_the_trainer(every_steps):
    cadence = Cadence(per_epoch=7, every_steps=every_steps)
    for total in range(1, 40):
        assert cadence.evaluations(total) == _evaluations_by_step_simulation(total, every_steps), total
        done = total // 2
        assert cadence.evaluated(done) == (sum(1 for s in range(1, done + 1) if every_steps and s % every_steps == 0))


# --- planning: the seconds already spent and the weight average's second evaluation ----------------
def test_plan_budget_fits_the_steps_into_what_is_left_on_a_fake_clock(monkeypatch):
    """1 min budget, 30 s already spent (data loading, measuring): a step takes 1 s on the fake clock and
    the one final evaluation 5 s, so S * 1 + 5 <= 60 - 30 gives S = 25 (not the 55 of the whole minute)."""
    from widenet.train.budget import plan_budget

    now = [0.0]
    monkeypatch.setattr("widenet.train.budget.time.perf_counter", lambda: now[0])

    def step() -> None:
        now[0] += 1.0

    plan = plan_budget(1.0, lambda: 30.0, step, lambda: 5.0, Cadence(per_epoch=10))
    assert (plan.budget_s, plan.spent_s, plan.step_s, plan.eval_s) == (60.0, 30.0, 1.0, 5.0)
    assert plan.steps == 25
    nothing_spent = plan_budget(1.0, lambda: 0.0, step, lambda: 5.0, Cadence(per_epoch=10))
    assert nothing_spent.steps == 55
    # an evaluation after every epoch of 10 steps, 10 s spent (50 s left): 30 steps and their 3 evaluations
    # (after steps 10, 20 and 30, the last one also the final) cost 45 s; 31 steps add a step and a final
    # evaluation: 51 s.
    assert plan_budget(1.0, lambda: 10.0, step, lambda: 5.0, Cadence(per_epoch=10, every_epochs=1)).steps == 30


class _CountingTask:
    """A Task for a one-layer model whose every training step takes 1 s on the fake clock `now` and
    whose one evaluation is measured at `eval_s` seconds."""

    unit, split, steps_per_epoch = "examples", "test", 4

    def __init__(self, now: list, eval_s: float) -> None:
        self.now, self.eval_s, self.cadence = now, eval_s, Cadence(per_epoch=4)

    def batches(self, epoch, start_batch):
        import torch

        gen = torch.Generator().manual_seed(epoch)
        for _ in range(start_batch, self.steps_per_epoch):
            yield torch.randn(2, 3, generator=gen)

    def loss(self, net, batch, step):
        from widenet.train.progress import StepResult

        self.now[0] += 1.0
        loss = net(batch).square().mean()
        return loss, lambda: StepResult(float(loss.detach()), {}, len(batch))

    def time_evaluation(self, model) -> float:
        return self.eval_s

    def calibration_inputs(self):
        return None


@pytest.mark.parametrize("ema_decay,eval_counted", [(None, 3.0), (0.9, 6.0)])
def test_trainer_plan_counts_the_spent_seconds_and_both_evaluations_with_a_weight_average(
        tmp_path, monkeypatch, ema_decay, eval_counted):
    """The Trainer plans --time-budget 1 (60 s) with the run started 10 s earlier: steps take 1 s each
    (fake clock), one evaluation 3 s, twice that with --ema-decay (the averaged weights are evaluated
    too). The steps are the largest S with S * 1 + eval <= 60 - spent, spent being those 10 s plus
    the real time the planning took (read from the plan)."""
    import math
    import time

    import torch

    from widenet.distributed.env import DistEnv
    from widenet.distributed.parallel import ParallelContext
    from widenet.train import trainer as trainer_module
    from widenet.train.config import RecipeConfig

    now, plans = [0.0], []
    monkeypatch.setattr("widenet.train.budget.time.perf_counter", lambda: now[0])
    real_plan = trainer_module.plan_budget

    def plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(trainer_module, "plan_budget", plan)
    cfg = RecipeConfig(time_budget=1.0, ema_decay=ema_decay, out=str(tmp_path / "run"))
    torch.manual_seed(0)
    started = time.monotonic() - 10.0
    trainer = trainer_module.Trainer(cfg, _CountingTask(now, 3.0), torch.nn.Linear(3, 2), ParallelContext(DistEnv()),
                                     torch.device("cpu"), None, {}, log=lambda _: None, started=started)
    elapsed = time.monotonic() - started
    (made,) = plans
    assert 10.0 <= made.spent_s <= elapsed
    assert made.step_s == 1.0 and made.eval_s == eval_counted
    assert trainer.progress.total == made.steps == math.floor(60.0 - made.spent_s - eval_counted)
    assert trainer.deadline.eval_s == eval_counted
