"""Fitting a run's schedule to a time limit (``TrainConfig.time_limit_minutes``), step by step.

One rule, applied early in the first epoch, at every quarter of an epoch and after every epoch:

    a step costs MARGIN x its training time; the run plans the most optimizer steps that fit in the time left
    together with the evaluations they pass (one after every ``eval_every``-th epoch, this epoch's included when it
    is about to be evaluated) and the final evaluation (which may score more test-time views); an evaluation that
    the end follows within one epoch is dropped (when it would cost steps) and its time trained, so that the last
    evaluation is the final one, on the last step, not one at an epoch's end and another a step or a few later.

The warmup + decay schedule is laid out over those steps, so the learning rate comes down to ``min_lr`` when the
time runs out, and the last epoch ends where the plan does (its batches are the first part of that epoch's
shuffled order): no time is left unused for want of a whole epoch.

A step's time is the median over the last five epochs and the current one so far (a noisy machine's slow epoch
does not shrink the plan, a lasting slowdown does); in the first epoch, before any epoch has ended, it is the
speed since the first quarter of the probe steps (the first steps select kernels and allocate), so that a long
first epoch does not run on a schedule laid out for a run the limit cannot hold. An evaluation's time is the
last one measured (zero before the first). With progressive resizing (``units``) steps differ in cost, and the
times are per full-size step: a step counts as its share of the full size's pixels, and the plan sums the shares
of the steps it lays out. The plan follows what fits, shorter or longer (up to
``TrainConfig.epochs``), at every replan: the margin is 5% of the time left at that moment, so the run ends
within a few seconds of the limit on a steady machine. (Until this version the plan grew only in the first half of
the run; a 60-minute CIFAR-10 run then left the margin planned at its midpoint, 1.5 minutes, unused.) Growing the
plan by a fraction g of the remaining steps moves the decay back by t(1 - t) g of its length at progress t, so
the learning rate rises by at most pi/8 g (0.39 g) of ``lr`` along the cosine (g/4 along ``lr_decay: linear``):
2% of ``lr`` for the whole 5% margin at once.
When not one more step fits, the run stops at the step it is in, and evaluates and saves as after an epoch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

MARGIN = 1.05  # steps vary by a few percent on a busy machine; 5% spare keeps the last one inside the limit
RECENT_EPOCHS = 5
CHECKS_PER_EPOCH = 4  # replans inside an epoch, besides the probe and the epoch's end


def steps_that_fit(*, done: int, seconds_left: float, step_time: float, eval_time: float, to_next_eval: int,
                   steps_per_eval: int, evaluating_now: bool = False, final_eval_scale: float = 1.0,
                   drop_within: int = 0, units: Callable[[int], float] | None = None, most: int = 0) -> int:
    """The rule: ``done`` plus the most steps of ``step_time`` seconds that fit in ``seconds_left`` together with
    the evaluations of ``eval_time`` they pass (the first after ``to_next_eval`` steps, then one every
    ``steps_per_eval``; this epoch's, now, when ``evaluating_now``) and the final evaluation, ``final_eval_scale``
    times as long (it may score more views). An evaluation that the end follows within ``drop_within`` steps
    costs nothing: it is dropped, the final one follows it so closely. Steps that differ in cost (progressive
    resizing) give ``units(n)``, the cost of a plan of ``n`` more steps in steps of ``step_time`` (default ``n``),
    and ``most``, where the search starts (doubled until it does not fit, at most three times)."""
    per_step = MARGIN * max(step_time, 1e-9)
    final = eval_time * final_eval_scale
    first = to_next_eval + drop_within  # the first evaluation is paid by a plan longer than this
    steps_of = (lambda n: n) if units is None else units

    def cost(n: int) -> float:  # grows with n: each evaluation is paid from the step `drop_within` after it on
        paid = int(evaluating_now and n > drop_within)
        paid += 0 if n <= first else 1 + (n - first - 1) // steps_per_eval
        return per_step * steps_of(n) + eval_time * paid + final

    fits = 0
    if units is None:
        most = max(int((seconds_left - final) // per_step), 0)  # no evaluation paid: the most
    else:  # from `most` on, doubled until it does not fit (up to 8 times `most`: enough to say it is short)
        most = start = max(most, 1)
        while most < 8 * start and cost(most) <= seconds_left:
            most *= 2
    while fits < most:  # the largest n with cost(n) <= seconds_left
        n = (fits + most + 1) // 2
        fits, most = (n, most) if cost(n) <= seconds_left else (fits, n - 1)
    return done + fits


def revise_plan(planned: int, fits: int, *, done: int, most: int) -> tuple[int, bool]:
    """``(planned steps, out of time)`` once ``fits`` steps are known to fit after ``done``: what fits (never more
    than ``most``); out of time when none more fit."""
    fits = min(fits, most)
    if fits <= done:
        return planned, True
    return fits, False


@dataclass
class TimeBudget:
    """The timings of a time-limited run and its plan, in optimizer steps: call :meth:`step_done` after each step
    and :meth:`epoch_done` / :meth:`evaluation_done` after the epoch's parts; each may return a new plan
    ``(planned steps, out of time)``.

    ``seconds`` is the limit, ``spent`` what earlier sessions of a resumed run used, ``most_steps`` the length of
    the schedule ``TrainConfig.epochs`` asks for. ``probe_steps`` is how many steps of the first epoch are timed
    before the first plan (0: the first plan waits for the first quarter of an epoch); the first quarter of them is
    not timed (kernel selection and allocation make the first steps slow). ``final_eval_scale``: how many times
    an ordinary evaluation the final one costs (``TrainConfig.tta_shift`` adds views to it). ``units(first,
    last, total)``: the cost of steps ``first`` to ``last - 1`` of a schedule of ``total`` steps in steps at the
    full size (progressive resizing, :meth:`vitlab.training.resize.Resizing.units`); without it every step costs
    one. The step times kept are then times per unit.
    """

    seconds: float
    eval_every: int
    most_steps: int
    steps_per_epoch: int
    spent: float = 0.0
    probe_steps: int = 0
    final_eval_scale: float = 1.0
    units: Callable[[int, int, int], float] | None = None
    started: float = field(default_factory=time.perf_counter)
    step_times: list[float] = field(default_factory=list)  # seconds per step of each epoch trained so far
    eval_time: float | None = None
    would_fit: int | None = None  # the steps the last plan found room for, before ``most_steps`` capped them
    skip_evaluation: bool = False  # the last epoch_done dropped the epoch's evaluation (the final one is near)
    _probe_start: tuple[int, float] | None = None

    @classmethod
    def for_run(cls, minutes: float, *, eval_every: int, most_steps: int, steps_per_epoch: int, spent: float,
                started: float, resuming: bool, final_eval_scale: float = 1.0,
                units: Callable[[int, int, int], float] | None = None) -> "TimeBudget":
        """The budget of a run whose session began at ``started`` (``time.perf_counter()``) after ``spent``
        seconds of earlier sessions; a fresh run of at least 20 steps an epoch plans after a tenth of its first
        epoch (at least 5 steps)."""
        probe = max(5, steps_per_epoch // 10) if not resuming and steps_per_epoch >= 20 else 0
        return cls(seconds=60.0 * minutes, eval_every=eval_every, most_steps=most_steps,
                   steps_per_epoch=steps_per_epoch, spent=spent, started=started, probe_steps=probe,
                   final_eval_scale=final_eval_scale, units=units)

    def _units(self, first: int, last: int, total: int) -> float:
        """The cost of steps ``first`` to ``last - 1`` of a schedule of ``total`` steps, in full-size steps."""
        return last - first if self.units is None else max(self.units(first, last, total), 1e-9)

    def elapsed(self) -> float:
        """Seconds of training so far, all sessions of the run."""
        return self.spent + time.perf_counter() - self.started

    def checks_at(self, step: int) -> bool:
        """Whether step ``step`` (1-based) of an epoch replans: a quarter of the epoch (not its end, which
        :meth:`epoch_done` plans), or the probe step in a fresh run's first epoch. A function of the step alone,
        so that every rank of a distributed run plans at the same steps."""
        every = max(1, self.steps_per_epoch // CHECKS_PER_EPOCH)
        return (step < self.steps_per_epoch and step % every == 0) or step == self.probe_steps

    def step_done(self, step: int, epoch_start: float, *, epoch: int, done: int,
                  planned: int) -> tuple[int, bool] | None:
        """After step ``step`` (1-based) of the epoch after ``epoch`` whole ones, begun at ``epoch_start``, the run
        having trained ``done`` steps in all: a new plan when :meth:`checks_at` this step and the step's time is
        known, else None."""
        if not self.step_times and step == max(1, self.probe_steps // 4):
            self._probe_start = (step, time.perf_counter())
        if not self.checks_at(step):
            return None
        now = time.perf_counter()
        if self.step_times:  # the current epoch so far counts as one more epoch in the median
            so_far = (now - epoch_start) / self._units(done - step, done, planned)
            step_time = statistics.median([*self.step_times[-RECENT_EPOCHS:], so_far])
        elif self._probe_start is not None and step > self._probe_start[0]:
            timed = step - self._probe_start[0]
            step_time = (now - self._probe_start[1]) / self._units(done - timed, done, planned)
        else:
            return None
        return self._plan(epoch=epoch, into=step, done=done, planned=planned, step_time=step_time)

    def epoch_done(self, train_time: float, steps: int, *, epoch: int, done: int, planned: int) -> tuple[int, bool]:
        """After epoch ``epoch`` (1-based) trained ``steps`` steps in ``train_time`` seconds (``done`` steps in
        all). Before any evaluation was timed the plan waits for it (see :meth:`evaluation_done`).

        An epoch due for evaluation is not evaluated (:attr:`skip_evaluation`) when the plan then ends within the
        next epoch and that evaluation would cost it steps: the final evaluation follows so closely that its time
        is trained instead, and the last evaluation falls on the last step of the budget."""
        self.step_times.append(train_time / self._units(done - steps, done, planned))
        self.skip_evaluation = False
        if self.eval_time is None or done >= planned:
            return planned, False
        due = epoch % self.eval_every == 0
        plan = self._plan(epoch=epoch, done=done, planned=planned, evaluating_now=due)
        if due and not plan[1] and plan[0] - done <= self.steps_per_epoch:  # the end follows within an epoch
            would_fit = self.would_fit
            kept = self._plan(epoch=epoch, done=done, planned=planned, reserve=self.eval_time)
            self.skip_evaluation = kept[1] or kept[0] < plan[0]
            if self.skip_evaluation:
                self.would_fit = would_fit  # the plan returned
            else:
                plan = kept
        return plan

    def evaluation_done(self, seconds: float, *, epoch: int, done: int, planned: int) -> tuple[int, bool]:
        """After epoch ``epoch``'s evaluation of ``seconds``; the first one also plans (it measured what an
        evaluation costs)."""
        first = self.eval_time is None
        self.eval_time = seconds
        if not first or done >= planned:
            return planned, False
        return self._plan(epoch=epoch, done=done, planned=planned)

    def _plan(self, *, epoch: int, done: int, planned: int, into: int = 0, evaluating_now: bool = False,
              step_time: float | None = None, reserve: float = 0.0) -> tuple[int, bool]:
        """The plan ``into`` steps into the epoch after ``epoch`` whole ones (0: at the end of epoch ``epoch``),
        with ``reserve`` seconds of the time left set aside."""
        if step_time is None:
            step_time = statistics.median(self.step_times[-RECENT_EPOCHS:])
        next_eval = (epoch // self.eval_every + 1) * self.eval_every  # the next epoch that ends with one
        fits = steps_that_fit(done=done, seconds_left=self.seconds - self.elapsed() - reserve, step_time=step_time,
                              eval_time=self.eval_time or 0.0,
                              to_next_eval=(next_eval - epoch) * self.steps_per_epoch - into,
                              steps_per_eval=self.eval_every * self.steps_per_epoch, evaluating_now=evaluating_now,
                              final_eval_scale=self.final_eval_scale, drop_within=self.steps_per_epoch,
                              units=None if self.units is None else lambda n: self._units(done, done + n, done + n),
                              most=self.most_steps - done)
        self.would_fit = fits
        return revise_plan(planned, fits, done=done, most=self.most_steps)


__all__ = ["MARGIN", "steps_that_fit", "revise_plan", "TimeBudget"]
