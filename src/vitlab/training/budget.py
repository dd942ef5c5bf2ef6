"""Fitting a run's schedule to a time limit (``TrainConfig.time_limit_minutes``).

One rule, applied early in the first epoch and after every epoch:

    an epoch costs MARGIN x its training time, plus one evaluation every ``eval_every`` epochs; keeping aside
    the time of the final evaluation (and of this epoch's, when it is about to be evaluated), the run plans
    the whole epochs that fit in the time left.

The training time of an epoch is the median of the last five (a noisy machine's slow epoch does not shrink the
plan, a lasting slowdown does); before the first epoch has ended it is extrapolated from the speed of the
first steps, so that a long first epoch does not run on a schedule laid out for a run the limit cannot hold.
An evaluation's time is the last one measured (zero before the first). The plan shrinks whenever fewer epochs
fit; it grows (up to ``TrainConfig.epochs``) only in the first half of the run, where a longer cosine barely
moves the learning rate. When not one more epoch fits, the run stops after the current one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

MARGIN = 1.05  # epochs vary by a few percent on a busy machine; 5% spare keeps the last one inside the limit
RECENT_EPOCHS = 5


def epochs_that_fit(*, done: int, seconds_left: float, epoch_time: float, eval_time: float, eval_every: int,
                    evaluating_now: bool = False) -> int:
    """The rule: ``done`` plus the whole epochs of ``epoch_time`` seconds (and an evaluation of ``eval_time``
    every ``eval_every``) that fit in ``seconds_left``, the final evaluation's time (and this epoch's, when
    ``evaluating_now``) kept aside."""
    per_epoch = MARGIN * epoch_time + eval_time / eval_every
    usable = seconds_left - eval_time * (1 + evaluating_now)
    return done + max(int(usable // per_epoch), 0)


def revise_plan(planned: int, fits: int, *, done: int, most: int) -> tuple[int, bool]:
    """``(planned epochs, out of time)`` once ``fits`` epochs are known to fit after ``done``: shorter whenever
    fewer fit, longer (up to ``most``) only while the run is in its first half; out of time when none more fit."""
    fits = min(fits, most)
    if fits <= done:
        return planned, True
    if fits < planned or (fits > planned and 2 * done <= planned):
        return fits, False
    return planned, False


@dataclass
class TimeBudget:
    """The timings of a time-limited run and its plan: call :meth:`step_done` after each step of the first epoch
    and :meth:`epoch_done` / :meth:`evaluation_done` after the epoch's parts; each may return a new plan.

    ``seconds`` is the limit, ``spent`` what earlier sessions of a resumed run used. ``probe_steps`` is how many
    steps of the first epoch are timed before the first plan (0: do not plan before the epoch ends); the first
    quarter of them is not timed (kernel selection and allocation make the first steps slow).
    """

    seconds: float
    eval_every: int
    most_epochs: int
    steps_per_epoch: int
    spent: float = 0.0
    probe_steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    train_times: list[float] = field(default_factory=list)
    eval_time: float | None = None
    _probe_start: tuple[int, float] | None = None

    @classmethod
    def for_run(cls, minutes: float, *, eval_every: int, most_epochs: int, steps_per_epoch: int, spent: float,
                started: float, resuming: bool) -> "TimeBudget":
        """The budget of a run whose session began at ``started`` (``time.perf_counter()``) after ``spent``
        seconds of earlier sessions; a fresh run of at least 20 steps an epoch plans after a tenth of its first
        epoch (at least 5 steps)."""
        probe = max(5, steps_per_epoch // 10) if not resuming and steps_per_epoch >= 20 else 0
        return cls(seconds=60.0 * minutes, eval_every=eval_every, most_epochs=most_epochs,
                   steps_per_epoch=steps_per_epoch, spent=spent, started=started, probe_steps=probe)

    def elapsed(self) -> float:
        """Seconds of training so far, all sessions of the run."""
        return self.spent + time.perf_counter() - self.started

    def step_done(self, step: int, epoch_start: float, *, done: int, planned: int) -> int | None:
        """After step ``step`` (1-based) of the run's first epoch, begun at ``epoch_start``: at the probe step the
        planned epochs from the extrapolated epoch time (the same or fewer), None at every other step."""
        if not self.probe_steps or done > 0 or step > self.probe_steps:
            return None
        now = time.perf_counter()
        if step == max(1, self.probe_steps // 4):
            self._probe_start = (step, now)
        if step < self.probe_steps or self._probe_start is None:
            return None
        first, t_first = self._probe_start
        step_time = (now - t_first) / (step - first)
        epoch_time = (t_first - epoch_start) + step_time * (self.steps_per_epoch - first)
        seconds_left = self.seconds - (self.elapsed() - (now - epoch_start))  # counted from the epoch's start
        fits = epochs_that_fit(done=done, seconds_left=seconds_left, epoch_time=epoch_time, eval_time=0.0,
                               eval_every=self.eval_every)
        return revise_plan(planned, max(fits, done + 1), done=done, most=self.most_epochs)[0]

    def epoch_done(self, train_time: float, *, done: int, planned: int, evaluating_now: bool) -> tuple[int, bool]:
        """After epoch ``done`` trained for ``train_time`` seconds: ``(planned epochs, out of time)``. Before any
        evaluation was timed the plan waits for it (see :meth:`evaluation_done`)."""
        self.train_times.append(train_time)
        if self.eval_time is None or done >= planned:
            return planned, False
        return self._plan(done=done, planned=planned, evaluating_now=evaluating_now)

    def evaluation_done(self, seconds: float, *, done: int, planned: int) -> tuple[int, bool]:
        """After an evaluation of ``seconds``; the first one also plans (it measured what an evaluation costs)."""
        first = self.eval_time is None
        self.eval_time = seconds
        if not first or done >= planned:
            return planned, False
        return self._plan(done=done, planned=planned, evaluating_now=False)

    def _plan(self, *, done: int, planned: int, evaluating_now: bool) -> tuple[int, bool]:
        fits = epochs_that_fit(done=done, seconds_left=self.seconds - self.elapsed(),
                               epoch_time=statistics.median(self.train_times[-RECENT_EPOCHS:]),
                               eval_time=self.eval_time or 0.0, eval_every=self.eval_every,
                               evaluating_now=evaluating_now)
        return revise_plan(planned, fits, done=done, most=self.most_epochs)


__all__ = ["MARGIN", "epochs_that_fit", "revise_plan", "TimeBudget"]
