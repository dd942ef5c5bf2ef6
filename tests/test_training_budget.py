"""The time-limit planner (vitlab.training.budget): its one rule, and when it lets the plan grow or shrink."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from _train_fixtures import tiny_config

from vitlab.training.budget import MARGIN, TimeBudget, epochs_that_fit, revise_plan
from vitlab.training.optim import WarmupCosine
from vitlab.training.step import schedule_steps


def test_the_rule_costs_an_epoch_with_its_share_of_evaluations_and_keeps_the_final_one_aside():
    # 100 s epochs + 5%, an evaluation of 10 s every 4th epoch: 107.5 s each; (1000 - 10) // 107.5 = 9 more
    assert MARGIN == 1.05
    kw = dict(done=10, epoch_time=100.0, eval_time=10.0, eval_every=4)
    assert epochs_that_fit(seconds_left=1000.0, **kw) == 19
    assert epochs_that_fit(seconds_left=1000.0, evaluating_now=True, **kw) == 19  # (1000 - 20) // 107.5 = 9
    assert epochs_that_fit(seconds_left=10.0 + 18 * 107.5, **kw) == 10 + 18  # just enough for 18 ...
    assert epochs_that_fit(seconds_left=10.0 + 18 * 107.5 - 1e-6, **kw) == 10 + 17  # ... and a microsecond short
    assert epochs_that_fit(seconds_left=5.0, **kw) == 10  # not even the final evaluation fits: none more


def test_the_plan_shrinks_any_time_and_grows_only_in_the_first_half():
    assert revise_plan(20, 19, done=10, most=40) == (19, False)
    assert revise_plan(10, 30, done=3, most=40) == (30, False)  # first half of the run: the plan may grow
    assert revise_plan(10, 33, done=6, most=40) == (10, False)  # second half: it does not
    assert revise_plan(10, 10 ** 9, done=3, most=40) == (40, False)  # never past `epochs`
    assert revise_plan(30, 10, done=10, most=40) == (30, True)  # nothing more fits: stop after this epoch


def _budget(train_times, eval_time=10.0, seconds=1000.0, eval_every=4):
    """A budget whose clock starts now with ``seconds`` left, having timed ``train_times`` and one evaluation."""
    return TimeBudget(seconds=seconds, eval_every=eval_every, most_epochs=40, steps_per_epoch=100,
                      started=time.perf_counter(), train_times=list(train_times), eval_time=eval_time)


def test_epochs_are_costed_at_the_median_of_the_last_five():
    # one slow 300 s epoch does not count; a lasting slowdown shrinks the plan
    assert _budget([100.0, 100.0, 300.0, 100.0]).epoch_done(100.0, done=10, planned=20,
                                                             evaluating_now=False) == (19, False)
    assert _budget([100.0, 100.0, 300.0, 100.0]).epoch_done(100.0, done=10, planned=20,
                                                             evaluating_now=True) == (19, False)
    assert _budget([300.0] * 4).epoch_done(300.0, done=10, planned=20, evaluating_now=False) == (13, False)
    assert _budget([100.0] * 4, seconds=110.0).epoch_done(100.0, done=10, planned=30,
                                                          evaluating_now=False) == (30, True)
    assert _budget([100.0] * 4, seconds=3000.0).epoch_done(100.0, done=3, planned=10,
                                                           evaluating_now=False) == (30, False)
    assert _budget([100.0] * 4, seconds=3000.0).epoch_done(100.0, done=6, planned=10,
                                                           evaluating_now=False) == (10, False)


def test_before_the_first_evaluation_the_plan_waits_for_it_and_then_may_grow():
    budget = _budget([], eval_time=None, seconds=3000.0)
    assert budget.epoch_done(100.0, done=1, planned=10, evaluating_now=False) == (10, False)  # no evaluation timed
    assert budget.evaluation_done(10.0, done=1, planned=10) == (28, False)  # (2990 // 107.5) = 27 more
    assert budget.evaluation_done(10.0, done=2, planned=28) == (28, False)  # only the first one plans


def test_the_first_steps_of_a_fresh_run_lay_the_plan_out():
    budget = TimeBudget.for_run(1e-9, eval_every=1, most_epochs=30, steps_per_epoch=200, spent=0.0,
                                started=time.perf_counter(), resuming=False)
    assert budget.probe_steps == 20  # a tenth of the epoch
    start = time.perf_counter()
    plans = [budget.step_done(i, start, done=0, planned=30) for i in range(1, 21)]
    assert plans[:-1] == [None] * 19 and plans[-1] == 1  # the limit holds this epoch only
    assert budget.step_done(20, start, done=1, planned=1) is None  # the second epoch: no probe
    assert TimeBudget.for_run(1.0, eval_every=1, most_epochs=30, steps_per_epoch=200, spent=0.0,
                              started=0.0, resuming=True).probe_steps == 0
    assert TimeBudget.for_run(1.0, eval_every=1, most_epochs=30, steps_per_epoch=19, spent=0.0,
                              started=0.0, resuming=False).probe_steps == 0


def test_a_new_plan_stretches_the_cosine_and_the_warmup_keeps_its_share():
    config = tiny_config(Path("unused"), epochs=40, warmup_epochs=2, lr=1e-3, min_lr=0.0)
    sched = WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lr=1e-3, min_lr=0.0,
                         total_steps=10 * 100, warmup_steps=round(2 / 40 * 10 * 100))  # the probe's plan: 10 epochs
    assert schedule_steps(config, 12, 100) == (1200, 60)  # warmup keeps its share: 2/40 of the run
    assert schedule_steps(config, 9, 100) == (900, 45)
    assert schedule_steps(config, 40, 100) == (4000, 200)
    sched.resize(*schedule_steps(config, 9, 100))
    for _ in range(900):
        sched.step()
    assert sched.current_lr() == pytest.approx(0.0)  # still ends at min_lr
