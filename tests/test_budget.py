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
