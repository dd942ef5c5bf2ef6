"""Progressive resizing (TrainConfig.progressive_resize): the sizes of the schedule, the steps trained at them,
and the time-limit plan that prices a smaller step as its share of the pixels."""

from __future__ import annotations

import time

import pytest
import torch
from _train_fixtures import TINY_MODEL, tiny_config, tiny_splits

import vitlab
from vitlab.config import TrainConfig
from vitlab.errors import ConfigError
from vitlab.training.budget import TimeBudget, steps_that_fit
from vitlab.training.resize import Resizing
from vitlab.training.step import make_train_step

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR = Resizing(image_size=(32, 32), multiple=(4, 4), scale=0.75, start=0.4, end=0.8)


def test_the_size_holds_then_grows_in_patch_multiples_to_the_full_one():
    sizes = [CIFAR.size_at(s, 100)[0] for s in range(100)]
    # 24 px to 40 % (and while the ramp rounds to it: 24 + 8 x 0.125 = 25 -> 24), 28 px from 25.5 ... 29.5 px,
    # then 32 px; 32 x 0.75 = 24 is a multiple of 4
    assert sizes == [24] * 50 + [28] * 20 + [32] * 30
    assert CIFAR.size_at(40, 100) == (24, 24) and CIFAR.size_at(99, 100) == (32, 32)
    # the plan's sums are the sums of the steps' own sizes (one formula)
    for first, last, total in [(0, 100, 100), (37, 81, 100), (0, 1000, 1337)]:
        expected = sum(CIFAR.size_at(s, total)[0] * CIFAR.size_at(s, total)[1] for s in range(first, last)) / 1024
        assert CIFAR.units(first, last, total) == pytest.approx(expected, rel=1e-12)
    assert CIFAR.units(0, 100, 100) == (50 * 576 + 20 * 784 + 30 * 1024) / 1024
    # a non-square model: each side its own multiple, never under one patch
    wide = Resizing(image_size=(16, 48), multiple=(8, 8), scale=0.25, start=0.5, end=0.5)
    assert wide.size_at(0, 10) == (8, 16) and wide.size_at(5, 10) == (16, 48)


def test_the_config_names_the_field_of_a_schedule_that_cannot_work():
    for bad in ([1.0, 0.4, 0.8], [0.75, 0.8, 0.4], [0.75, 0.4], "0.75", [0.0, 0, 1]):
        with pytest.raises(ConfigError, match=r"TrainConfig\.progressive_resize="):
            TrainConfig(progressive_resize=bad)
    assert TrainConfig(progressive_resize=[0.5, 0, 1]).progressive_resize == [0.5, 0.0, 1.0]


def test_each_step_trains_at_its_size_with_the_positions_resized():
    model = vitlab.create_model("vit-digits-p2", **TINY_MODEL)  # 8 px, patch 2
    config = TrainConfig(epochs=2, warmup_epochs=0, progressive_resize=[0.5, 0.5, 0.5])
    step = make_train_step(model, config, device=torch.device("cpu"), precision="fp32", steps_per_epoch=3,
                           num_classes=10, image_size=(8, 8), mean=(0.5,), std=(0.5,))
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    images, labels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (4,))
    for _ in range(6):
        step([(images, labels)])
    assert seen == [(4, 4)] * 3 + [(8, 8)] * 3  # half the side for the first half of the 6 steps
    model.eval()
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)  # the model itself is still the 8 px one


def test_the_rule_prices_steps_by_their_units():
    # 1 s a full-size step + 5%, no evaluations: 100 s hold 95 full steps, 190 of half the cost
    kw = dict(done=0, seconds_left=100.0, step_time=1.0, eval_time=0.0, to_next_eval=10 ** 6, steps_per_eval=10 ** 6)
    assert steps_that_fit(**kw) == 95
    assert steps_that_fit(**kw, units=lambda n: 0.5 * n, most=100) == 190  # the search doubles 100 once
    assert steps_that_fit(**kw, units=lambda n: 0.5 * n, most=10_000) == 190  # from above too
    assert steps_that_fit(**kw, units=lambda n: 0.5 * n, most=10) == 80  # never past 8 x `most` (the schedule)


def test_the_plan_measures_time_per_unit_and_fits_the_schedule_of_sizes():
    # 16 px steps (a quarter of the pixels) for the first half of the plan, then 32 px
    half = Resizing(image_size=(32, 32), multiple=(4, 4), scale=0.5, start=0.5, end=0.5)
    budget = TimeBudget(seconds=1000.0, eval_every=4, most_steps=4000, steps_per_epoch=100,
                        started=time.perf_counter(), eval_time=0.0, units=half.units)
    # epoch 1: 100 steps at 16 px in 25 s is 1 s per full-size step; what fits in 1000 s after it
    planned, out = budget.epoch_done(25.0, 100, epoch=1, done=100, planned=1000)
    assert budget.step_times == [pytest.approx(1.0)]

    def cost(n):  # the oracle: the steps 100 .. n-1 of a plan of n, at a quarter before n / 2
        return 1.05 * sum(0.25 if s < n / 2 else 1.0 for s in range(100, n))
    assert not out and cost(planned) <= 1000.0 - (time.perf_counter() - budget.started) < cost(planned + 2)
    assert 1500 < planned < 1600  # where every step at 32 px would give 1052
    # without the units the same epoch reads 0.25 s a step, and a plan 4 times too long for the time
    flat = TimeBudget(seconds=1000.0, eval_every=4, most_steps=4000, steps_per_epoch=100,
                      started=time.perf_counter(), eval_time=0.0)
    assert flat.epoch_done(25.0, 100, epoch=1, done=100, planned=1000)[0] > 3000


def test_a_time_limited_run_with_resizing_plans_with_the_units_and_completes(tmp_path):
    config = tiny_config(tmp_path, epochs=3, progressive_resize=[0.5, 0.0, 0.5], time_limit_minutes=5)
    result = vitlab.train(config, data=tiny_splits())
    assert result.stopped == "completed" and len(result.history) == 3  # 5 minutes hold the 3 epochs
    assert result.history[-1]["top1"] is not None
