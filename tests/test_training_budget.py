"""The time-limit planner (vitlab.training.budget): its one rule, and when it lets the plan grow or shrink."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from _train_fixtures import tiny_config

from vitlab.training.budget import MARGIN, TimeBudget, revise_plan, steps_that_fit
from vitlab.training.optim import WarmupDecay
from vitlab.training.step import schedule_steps


def test_the_rule_counts_the_evaluations_the_steps_pass_and_keeps_the_final_one_aside():
    # 1 s steps + 5%, an evaluation of 10 s every 400 steps, the next one in 100 steps
    assert MARGIN == 1.05
    kw = dict(done=1000, step_time=1.0, eval_time=10.0, to_next_eval=100, steps_per_eval=400)
    # 1000 s: the final evaluation, and 3 passed (after 100, 500, 900 steps): (1000 - 40) // 1.05 = 914 > 900
    assert steps_that_fit(seconds_left=1000.0, **kw) == 1914
    assert steps_that_fit(seconds_left=1000.0, evaluating_now=True, **kw) == 1904  # (1000 - 50) // 1.05 = 904
    assert steps_that_fit(seconds_left=10.0 + 100 * 1.05 + 0.01, **kw) == 1100  # ending at an evaluation: final
    assert steps_that_fit(seconds_left=10.0 + 101 * 1.05 + 0.01, **kw) == 1100  # one step more passes it: 10 s
    assert steps_that_fit(seconds_left=20.0 + 101 * 1.05 + 0.01, **kw) == 1101  # ... which then fit
    assert steps_that_fit(seconds_left=20.0 + 101 * 1.05 - 0.01, **kw) == 1100  # ... and 10 ms short
    assert steps_that_fit(seconds_left=5.0, **kw) == 1000  # not even the final evaluation fits: none more
    assert steps_that_fit(seconds_left=50.0, **{**kw, "eval_time": 0.0}) == 1047  # 50 // 1.05
    # a final evaluation that scores 3x the views (tta_shift) is kept aside at 30 s: 900 steps (945 s, passing the
    # evaluations after 100 and 500 steps: 995 s in all); a 901st step passes the one after 900: 1006.05 s
    assert steps_that_fit(seconds_left=1000.0, final_eval_scale=3.0, **kw) == 1900
    assert steps_that_fit(seconds_left=1006.06, final_eval_scale=3.0, **kw) == 1901


def test_an_evaluation_the_end_follows_within_an_epoch_is_dropped_and_its_time_trained():
    # as above, epochs of 100 steps: the evaluation 100 steps on is not paid by a plan ending within 100 steps of it
    kw = dict(done=1000, step_time=1.0, eval_time=10.0, to_next_eval=100, steps_per_eval=400)
    assert steps_that_fit(seconds_left=10.0 + 150 * 1.05 + 0.01, **kw) == 1140  # paying it: (167.51 - 20) // 1.05
    assert steps_that_fit(seconds_left=10.0 + 150 * 1.05 + 0.01, drop_within=100, **kw) == 1150  # dropped
    assert steps_that_fit(seconds_left=10.0 + 201 * 1.05 + 0.01, drop_within=100, **kw) == 1200  # 201 pay it
    assert steps_that_fit(seconds_left=20.0 + 201 * 1.05 + 0.01, drop_within=100, **kw) == 1201
    # this epoch's evaluation too: dropped by a plan of at most 100 steps
    assert steps_that_fit(seconds_left=10.0 + 50 * 1.05 + 0.01, evaluating_now=True, **kw) == 1040
    assert steps_that_fit(seconds_left=10.0 + 50 * 1.05 + 0.01, evaluating_now=True, drop_within=100, **kw) == 1050
    # after epoch 10, 62.51 s left: the final evaluation and 50 steps, or this epoch's evaluation too and 40
    budget = _budget([1.0] * 4, seconds=10.0 + 50 * 1.05 + 0.01, eval_every=1)
    assert budget.epoch_done(100.0, 100, epoch=10, done=1000, planned=2000) == (1050, False)
    assert budget.skip_evaluation  # the engine does not evaluate epoch 10: the last evaluation is on step 1050
    # kept when it costs no steps: `epochs` ends the run at 1050 with or without it
    budget = _budget([1.0] * 4, seconds=10.0 + 62 * 1.05, eval_every=1)
    budget.most_steps = 1050
    assert budget.epoch_done(100.0, 100, epoch=10, done=1000, planned=1050) == (1050, False)
    assert not budget.skip_evaluation
    # and when the end is more than an epoch away
    budget = _budget([1.0] * 4, seconds=20.0 + 101 * 1.05 + 0.01, eval_every=1)
    assert budget.epoch_done(100.0, 100, epoch=10, done=1000, planned=2000) == (1101, False)
    assert not budget.skip_evaluation


def test_the_plan_follows_what_fits_up_to_epochs_and_stops_when_nothing_does():
    assert revise_plan(2000, 1900, done=1000, most=4000) == (1900, False)
    assert revise_plan(1000, 3000, done=300, most=4000) == (3000, False)
    assert revise_plan(1000, 1050, done=900, most=4000) == (1050, False)  # late in the run too: the margin freed
    assert revise_plan(1000, 10 ** 9, done=300, most=4000) == (4000, False)  # never past `epochs`
    assert revise_plan(3000, 1000, done=1000, most=4000) == (3000, True)  # nothing more fits: stop now


def test_growing_late_raises_the_learning_rate_by_at_most_pi_over_8_of_the_growth():
    # the bound the module doc gives: the whole remaining plan grown by g moves lr up by <= pi/8 g lr
    g = 0.05
    worst = 0.0
    for done in range(0, 1001, 10):
        sched = WarmupDecay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lr=1.0, min_lr=0.0,
                             total_steps=1000, warmup_steps=0)
        sched.step_count = done
        before = sched.current_lr()
        sched.resize(done + round((1 + g) * (1000 - done)), 0)
        worst = max(worst, sched.current_lr() - before)
    assert 0.018 < worst <= math.pi / 8 * g + 1e-3


def _budget(step_times, eval_time=10.0, seconds=1000.0, eval_every=4):
    """A budget of 100 steps an epoch whose clock starts now with ``seconds`` left, having timed epochs of
    ``step_times`` seconds a step and one evaluation."""
    return TimeBudget(seconds=seconds, eval_every=eval_every, most_steps=4000, steps_per_epoch=100,
                      started=time.perf_counter(), step_times=list(step_times), eval_time=eval_time)


def test_steps_are_costed_at_the_median_of_the_last_five_epochs():
    # after epoch 10 (1000 steps), an evaluation every 4th epoch: the next after epoch 12, 200 steps on
    kw = dict(epoch=10, done=1000, planned=2000)
    # 1 s a step (one slow 3 s epoch does not count): 2 evaluations passed (at 200, 600) + the final: 970 // 1.05
    assert _budget([1.0, 1.0, 3.0, 1.0]).epoch_done(100.0, 100, **kw) == (1923, False)
    # at the end of epoch 12 this epoch's evaluation is kept aside too, and the next is 400 steps on (2 passed)
    assert _budget([1.0, 1.0, 3.0, 1.0]).epoch_done(100.0, 100, epoch=12, done=1200,
                                                    planned=2500) == (1200 + int(960 // 1.05), False)
    assert _budget([3.0] * 4).epoch_done(300.0, 100, **kw) == (1000 + int(980 // 3.15), False)  # 1 passed
    assert _budget([1.0] * 4, seconds=10.5).epoch_done(100.0, 100, epoch=10, done=1000,
                                                       planned=3000) == (3000, True)
    # 3000 s: 2780 steps pass 7 evaluations (after 100, 500, ... 2500 steps): 2780 x 1.05 + 8 x 10 = 2999 s
    assert _budget([1.0] * 4, seconds=3000.0).epoch_done(100.0, 100, epoch=3, done=300,
                                                         planned=1000) == (3080, False)  # grows
    assert _budget([1.0] * 4, seconds=400.0).epoch_done(100.0, 100, epoch=8, done=800,
                                                        planned=1000) == (800 + int(380 // 1.05), False)
    # a short last epoch is costed by its own steps: 20 steps in 20 s is 1 s a step
    assert _budget([1.0] * 4).epoch_done(20.0, 20, **kw) == (1923, False)


def test_before_the_first_evaluation_the_plan_waits_for_it_and_then_may_grow():
    budget = _budget([], eval_time=None, seconds=3000.0, eval_every=1)
    assert budget.epoch_done(100.0, 100, epoch=1, done=100, planned=1000) == (1000, False)  # none timed yet
    # 10 s after each 100 steps of 1.05 s: 115 s an epoch; the final evaluation aside, 26 epochs (2990 s), and the
    # evaluation after the 26th, which the end follows within an epoch, is dropped: its 10 s train 9 steps more
    assert budget.evaluation_done(10.0, epoch=1, done=100, planned=1000) == (100 + 26 * 100 + 9, False)
    assert budget.evaluation_done(10.0, epoch=2, done=200, planned=2709) == (2709, False)  # only the first plans


def test_the_first_steps_of_a_fresh_run_lay_the_plan_out_and_every_quarter_epoch_revises_it():
    budget = TimeBudget.for_run(1e-9, eval_every=1, most_steps=6000, steps_per_epoch=200, spent=0.0,
                                started=time.perf_counter(), resuming=False)
    assert budget.probe_steps == 20  # a tenth of the epoch
    assert [s for s in range(1, 201) if budget.checks_at(s)] == [20, 50, 100, 150]  # not the end: epoch_done
    start = time.perf_counter()
    plans = [budget.step_done(i, start, epoch=0, done=i, planned=6000) for i in range(1, 21)]
    assert plans[:-1] == [None] * 19 and plans[-1] == (6000, True)  # out of time already: stop at this step
    budget = TimeBudget.for_run(1.0, eval_every=1, most_steps=6000, steps_per_epoch=200, spent=0.0,
                                started=time.perf_counter(), resuming=False)
    start = time.perf_counter()
    for i in range(1, 20):
        assert budget.step_done(i, start, epoch=0, done=i, planned=6000) is None
    time.sleep(0.05)  # 15 steps in more than 50 ms: the 60 s hold fewer than 60 / (1.05 * 0.05 / 15) = 17,000
    planned, out = budget.step_done(20, start, epoch=0, done=20, planned=6000)
    assert not out and 20 < planned <= 6000
    assert TimeBudget.for_run(1.0, eval_every=1, most_steps=6000, steps_per_epoch=200, spent=0.0,
                              started=0.0, resuming=True).probe_steps == 0
    assert TimeBudget.for_run(1.0, eval_every=1, most_steps=6000, steps_per_epoch=19, spent=0.0,
                              started=0.0, resuming=False).probe_steps == 0


def test_a_later_epoch_costs_its_steps_with_the_current_one_counted_in_the_median():
    # 25 steps into epoch 3 (eval_every 4: the next evaluation 175 steps on); epochs of 1 s a step and the
    # current one at 3 s a step: the median of [1, 1, 3] is 1, and 2 evaluations are passed (175, 575)
    budget = _budget([1.0, 1.0], seconds=1000.0)
    plan = budget.step_done(25, time.perf_counter() - 75.0, epoch=2, done=225, planned=4000)
    assert plan == (225 + int((1000 - 30) // 1.05), False)
    # ... when it is the third slow one the median moves to 3 s a step: 1 evaluation passed
    budget = _budget([1.0, 3.0, 3.0], seconds=1000.0)
    plan = budget.step_done(25, time.perf_counter() - 75.0, epoch=2, done=325, planned=4000)
    assert plan == (325 + int((1000 - 20) // 3.15), False)
    assert budget.step_done(26, time.perf_counter(), epoch=2, done=326, planned=4000) is None  # not a quarter


def test_a_new_plan_stretches_the_cosine_and_the_warmup_keeps_its_share():
    config = tiny_config(Path("unused"), epochs=40, warmup_epochs=2, lr=1e-3, min_lr=0.0)
    sched = WarmupDecay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), lr=1e-3, min_lr=0.0,
                         total_steps=10 * 100, warmup_steps=round(2 / 40 * 10 * 100))  # the probe's plan: 10 epochs
    assert schedule_steps(config, 1200, 100) == (1200, 60)  # warmup keeps its share: 2/40 of the run
    assert schedule_steps(config, 900, 100) == (900, 45)
    assert schedule_steps(config, 4000, 100) == (4000, 200)
    assert schedule_steps(config, 950, 100) == (950, 48)  # a plan that ends inside an epoch
    sched.resize(*schedule_steps(config, 900, 100))
    for _ in range(900):
        sched.step()
    assert sched.current_lr() == pytest.approx(0.0)  # still ends at min_lr
