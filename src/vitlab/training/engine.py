"""``fit()``: train a ViT as a :class:`~vitlab.config.TrainConfig` says and write its run folder.

:func:`_prepare` makes everything a run needs (device, data, model, the training step, the run folder and, when
resuming, the state it stopped in); :func:`_train` is the epoch loop, which reads top to bottom; the training step
itself is :class:`~vitlab.training.step.TrainStep`, the time limit :class:`~vitlab.training.budget.TimeBudget`.

One process or many (``torchrun`` sets ``WORLD_SIZE``; we then use DistributedDataParallel, gloo on CPU and
nccl on CUDA): every rank trains on its shard of each global batch, rank 0 logs and writes the files, metrics
are summed across ranks. ``TrainConfig.batch_size`` is the global batch, so 1 and N processes train alike.

Exact resume: the batch order is a function of (seed, epoch), the augmentation and dropout generators are
re-seeded from (seed, epoch, rank) at each epoch start, and the checkpoint holds everything else (weights,
AdamW moments, schedule step, grad scaler, EMA, RNG states, metrics so far), so ``1 epoch + resume 1`` gives
the same weights bit for bit as 2 epochs straight.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitlab._device import resolve_device, resolve_precision, sum_dtype
from vitlab._files import atomic_write_text, ensure_folder, write_json
from vitlab.config import TrainConfig, dump_yaml, to_dict
from vitlab.data import DatasetSplits, Preprocess, load_data, with_val_split
from vitlab.data.transforms import NAMED_MEAN_STD
from vitlab.errors import ConfigError, DataError, VitlabError
from vitlab.checkpoints import (BEST, CONFIG_YAML, EVAL, LAST, METRICS, RunState, can_resume, copy_checkpoint,
                                load_training_state, recover_run, require_run_folder, save_checkpoint, write_metrics)
from vitlab.evaluation import evaluate_views, fit_calibration, tta_views
from vitlab.loaded import Normalization, checkpoint_normalization, load_checkpoint
from vitlab.models import VisionTransformer, create_model, get_config
from vitlab.models.finetune import prepare_finetune
from vitlab.models.patch_embed import WHITEN_IMAGES
from vitlab.training.budget import TimeBudget
from vitlab.training.progress import Progress
from vitlab.training.step import Distillation, TrainStep, make_train_step, schedule_steps
from vitlab.training.teacher import teacher_for_run

log = logging.getLogger("vitlab.training")


class DivergedError(VitlabError):
    """The training loss became NaN or infinite; the run folder keeps the last good checkpoint."""


@dataclass
class TrainResult:
    """What :func:`fit` returns: the run folder, the per-epoch metrics, and the final and best accuracy."""

    run_dir: Path
    history: list[dict]
    top1: float | None  # test top-1 of the run's final evaluation (eval.json: with tta_shift's views too)
    best_top1: float | None
    best_epoch: int | None
    wall_time: float  # seconds of training (all sessions of a resumed run)
    stopped: str  # "completed", "time_limit" or "stop_after_epoch"
    final_eval: dict | None = field(default=None, repr=False)  # eval.json: per class, confusion, last epoch
    calibration: dict | None = field(default=None, repr=False)  # the fitted temperature (calibrate=true)


def fit(config: TrainConfig, *, data: DatasetSplits | None = None, model: VisionTransformer | None = None,
        normalization: Normalization | None = None, progress: Progress | None = None) -> TrainResult:
    """Train as ``config`` says and write the run folder; return a :class:`TrainResult`.

    The model is, in this order: the run's own when ``config.resume`` names a run with a checkpoint; ``model``
    (a ready, e.g. pretrained, VisionTransformer, whose inputs were normalised with ``normalization`` when that
    is known: ``normalize="auto"`` then keeps it); else a fresh ``config.model`` preset. ``config.init`` (weights
    to fine-tune) is read by :func:`vitlab.train`, which passes them here as ``model``. A pretrained model's head
    is reset to the dataset's classes and its position embedding resized to ``config.image_size``. ``data``: a
    ready ``DatasetSplits`` (else ``config.data`` is loaded). ``progress``: a
    :class:`~vitlab.training.progress.Progress`, used on rank 0. Figures of the run are :func:`vitlab.train`'s.
    """
    d = _setup_distributed(config.device)
    try:
        return _train(_prepare(config, data, model, normalization, d), progress)
    finally:
        if d.owns_group:
            gc.collect()  # free the DDP reducer's pending work while the process group still exists
            dist.destroy_process_group()


# ---------------------------------------------------------------- the epoch loop
def _train(r: "_Run", progress: Progress | None) -> TrainResult:
    config, state, step = r.config, r.state, r.step
    writer = _tensorboard(r.dir) if r.d.is_main else None
    spent, started, stopped, final_eval = state.wall_time, time.perf_counter(), "completed", None
    budget = _budget(r, spent, started)
    while state.epoch < state.planned_epochs:
        t_epoch = time.perf_counter()
        train_loss, steps, out_of_time = _train_epoch(r, budget, progress)
        train_time = time.perf_counter() - t_epoch
        state.epoch += 1
        row: dict[str, Any] = {"epoch": state.epoch, "train_loss": train_loss, "test_loss": None, "top1": None,
                               "top5": None, "lr": step.scheduler.current_lr(), "steps": steps,
                               "images_per_s": steps * config.batch_size / train_time}
        if budget is not None:  # plan before evaluating, so that the epoch that ends the run is evaluated
            out_of_time |= _plan_epoch_end(r, budget, train_time, steps)
        if state.epoch >= state.planned_epochs or out_of_time:
            step.finish()  # before the last evaluation and checkpoint
        last = state.epoch in (state.planned_epochs, config.stop_after_epoch) or out_of_time
        due = state.epoch % config.eval_every == 0 and not (budget is not None and budget.skip_evaluation)
        if last or due or (budget is not None and budget.eval_time is None):
            t_eval = time.perf_counter()
            final_eval = _evaluate(r, row, final=last)
            if budget is not None:  # the first evaluation measures what one costs, and plans with it
                first = budget.eval_time is None
                seconds = (time.perf_counter() - t_eval) / (budget.final_eval_scale if last else 1.0)
                out_of_time |= _replan(r, budget.evaluation_done(seconds, epoch=state.epoch,
                                                                 done=step.scheduler.step_count,
                                                                 planned=step.scheduler.total_steps))
                if out_of_time and not last:  # this evaluation used the time left: the run ends here after all
                    step.finish()
                    if step.slow is not None:  # the model took Lookahead's slow weights: score those
                        final_eval = _evaluate(r, row, final=True)
                if first and r.d.is_main and (budget.would_fit or 0) > budget.most_steps:
                    log.info("time limit %g min: %.1f epochs would fit, epochs=%d ends the run sooner (raise "
                             "epochs to use the time)", config.time_limit_minutes,
                             budget.would_fit / r.steps_per_epoch, config.epochs)
        state.wall_time = row["wall_time"] = spent + time.perf_counter() - started
        state.history.append(row)
        _save(r, row, best=state.record_best(row), writer=writer)
        if r.d.is_main and progress is not None:
            progress.epoch_done(row)
        if config.stop_after_epoch is not None and state.planned_epochs > state.epoch >= config.stop_after_epoch:
            stopped = "stop_after_epoch"
            break
        if out_of_time:
            stopped = "time_limit"
            break
    if writer is not None:
        writer.close()
    calibration = None
    if r.d.is_main and state.history:
        if final_eval is not None:
            write_json(r.dir / EVAL, final_eval)
        if config.calibrate and stopped != "stop_after_epoch":  # not a pause: the run's model is final
            calibration = _calibrate(r)
    _barrier(r.d)
    tested = [row for row in state.history if row["top1"] is not None]
    top1 = final_eval["top1"] if final_eval is not None else tested[-1]["top1"] if tested else None
    return TrainResult(run_dir=r.dir, history=state.history, top1=top1,
                       best_top1=state.best_top1, best_epoch=state.best_epoch, wall_time=state.wall_time,
                       stopped=stopped, final_eval=final_eval, calibration=calibration)


def _budget(r: "_Run", spent: float, started: float) -> TimeBudget | None:
    """The time limit's plan of a session that began at ``started`` after ``spent`` seconds; None without one."""
    config = r.config
    if config.time_limit_minutes is None:
        return None
    return TimeBudget.for_run(
        config.time_limit_minutes, eval_every=config.eval_every, most_steps=config.epochs * r.steps_per_epoch,
        steps_per_epoch=r.steps_per_epoch, spent=spent, started=started, resuming=r.resuming,
        final_eval_scale=len(tta_views(config.tta_hflip, config.tta_shift)) / len(tta_views(config.tta_hflip, 0)),
        units=None if r.step.resizing is None else r.step.resizing.units)  # smaller steps cost less


def _calibrate(r: "_Run") -> dict:
    """Fit the temperature of the checkpoint that ``vitlab.load(run)`` gives (``best/``) on the validation split
    the run held out, and save it there. Rank 0 alone: the split is small."""
    loaded = load_checkpoint(r.dir, device=r.device)
    return fit_calibration(loaded, r.data, batch_size=r.config.eval_batch_size, device=r.device,
                           precision=r.precision)


def _train_epoch(r: "_Run", budget: TimeBudget | None, progress) -> tuple[float, int, bool]:
    """Train one epoch (``r.state.epoch``, 0-based, not yet done): all its steps, or those up to the end of the
    schedule a time limit laid out; return its mean training loss, its steps, and whether the time ran out."""
    config, epoch, d, scheduler = r.config, r.state.epoch, r.d, r.step.scheduler
    r.loader.set_epoch(epoch)
    r.generator.manual_seed(_epoch_seed(config.seed, epoch, d.rank))
    torch.manual_seed(_epoch_seed(config.seed, epoch, d.rank) + 1)  # dropout, drop path
    r.step.model.train()
    loss_sum = torch.zeros((), dtype=sum_dtype(r.device), device=r.device)
    if progress is not None and d.is_main:
        planned_here = scheduler.total_steps - scheduler.step_count if budget else r.steps_per_epoch
        progress.start(epoch + 1, r.state.planned_epochs, max(1, min(r.steps_per_epoch, planned_here)))
    t_epoch = last_check = time.perf_counter()
    batches = iter(r.loader)
    steps, out_of_time = 0, False
    while steps < r.steps_per_epoch:
        loss = r.step([next(batches) for _ in range(config.accum_steps)], r.generator)
        loss_sum += loss
        steps += 1
        if budget is not None:
            plan = budget.step_done(steps, t_epoch, epoch=epoch, done=scheduler.step_count,
                                    planned=scheduler.total_steps)
            if plan is not None:
                out_of_time = _replan(r, plan, into_epoch=steps)
            if out_of_time or scheduler.step_count >= scheduler.total_steps:  # the plan ends inside this epoch
                break
        now = time.perf_counter()
        if now - last_check > 1.0 and d.is_main:  # the only host syncs inside an epoch: about 1 per second
            last_check = now
            current = float(loss) / (config.batch_size // d.world_size)
            if d.world_size == 1 and not math.isfinite(current):
                _diverged(r, epoch, steps, current)
            if progress is not None:
                progress.update(steps, current, steps * config.batch_size / max(now - t_epoch, 1e-9))
    if progress is not None and d.is_main:
        progress.end()
    if d.world_size > 1:
        dist.all_reduce(loss_sum)
    train_loss = float(loss_sum) / (steps * config.batch_size)
    if not math.isfinite(train_loss):
        _diverged(r, epoch, steps, train_loss)
    return train_loss, steps, out_of_time


def _plan_epoch_end(r: "_Run", budget: TimeBudget, train_time: float, steps: int) -> bool:
    """The time-limit plan after an epoch's training part (rank 0's on every rank, with its decision whether the
    epoch is evaluated: every rank evaluates, or none); return whether the run is out of time."""
    scheduler = r.step.scheduler
    plan = budget.epoch_done(train_time, steps, epoch=r.state.epoch, done=scheduler.step_count,
                             planned=scheduler.total_steps)
    *plan, skip = _agree(r.d, r.device, *plan, budget.skip_evaluation)  # epoch_done decided it
    budget.skip_evaluation = bool(skip)
    return _replan(r, tuple(plan), agreed=True)


def _replan(r: "_Run", plan: tuple[int, bool], into_epoch: int = 0, *, agreed: bool = False) -> bool:
    """Apply a time-limit plan ``(planned steps, out of time)`` made ``into_epoch`` steps into an epoch (0: at its
    end), the same on every rank (rank 0's, unless ``agreed`` already: timings differ between ranks, the schedule
    must not); return whether the run is out of time."""
    planned, out_of_time = plan if agreed else _agree(r.d, r.device, *plan)
    scheduler = r.step.scheduler
    if planned != scheduler.total_steps:
        scheduler.resize(*schedule_steps(r.config, planned, r.steps_per_epoch))
        epoch_start = scheduler.step_count - into_epoch
        epochs = r.state.epoch + math.ceil((planned - epoch_start) / r.steps_per_epoch)
        if r.d.is_main:  # a line when the plan gains or loses an epoch; the small moves on the way in the debug log
            log.log(logging.INFO if epochs != r.state.planned_epochs else logging.DEBUG,
                    "time limit %g min: the schedule now ends after %d steps (%s epochs)",
                    r.config.time_limit_minutes, planned, f"{planned / r.steps_per_epoch:.2f}")
        r.state.planned_epochs = epochs
    return out_of_time


def _evaluate(r: "_Run", row: dict, *, final: bool = False) -> dict:
    """Evaluate the model (and its EMA) on the test split into ``row`` (the curve's views: the image, and its
    mirror image with ``tta_hflip``); return the model's full result, for the run's ``final`` evaluation with the
    moved views of ``tta_shift`` as well (scored in the same pass)."""
    kwargs = dict(mean=r.preprocess.mean, std=r.preprocess.std, image_size=r.preprocess.image_size,
                  batch_size=r.config.eval_batch_size, device=r.device, precision=r.precision,
                  classes=r.data.classes)
    curve = tta_views(r.config.tta_hflip, 0)
    if final and r.config.tta_shift:
        result, full = evaluate_views(r.step.model, r.data.test, [curve, tta_views(r.config.tta_hflip,
                                                                                    r.config.tta_shift)], **kwargs)
    else:
        result = full = evaluate_views(r.step.model, r.data.test, [curve], **kwargs)[0]
    row.update(test_loss=result["test_loss"], top1=result["top1"], top5=result["top5"],
               **{key: result[key] for key in ("ece", "mce", "brier")})
    if r.step.ema is not None:
        ema = evaluate_views(r.step.ema, r.data.test, [curve], **kwargs)[0]
        row.update(ema_test_loss=ema["test_loss"], ema_top1=ema["top1"], ema_top5=ema["top5"])
    return full


def _save(r: "_Run", row: dict, *, best: str | None, writer) -> None:
    """Rank 0: ``last/`` (and ``best/`` when the epoch improved on it), metrics, TensorBoard, the log line."""
    if not r.d.is_main:
        return
    state, step = r.state, r.step
    state.scheduler, state.scaler = step.scheduler.state_dict(), step.scaler.state_dict()
    save_checkpoint(r.dir / LAST, model=step.model, preprocess=r.preprocess, state=state, optimizer=step.optimizer,
                    ema=step.ema, slow=step.slow)
    write_metrics(r.dir, state.history)
    if best == "ema":
        save_checkpoint(r.dir / BEST, model=step.ema, preprocess=r.preprocess, state=state)
    elif best == "model":
        copy_checkpoint(r.dir / LAST, r.dir / BEST)
    if writer is not None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()
    tested = (f"  test loss {row['test_loss']:.4f}  top-1 {100 * row['top1']:.2f}%  top-5 {100 * row['top5']:.2f}%"
              if row["top1"] is not None else "")
    log.info("epoch %d/%d  train loss %.4f%s  lr %.2e  %.0f img/s  %s", row["epoch"], state.planned_epochs,
             row["train_loss"], tested, row["lr"], row["images_per_s"],
             time.strftime("%H:%M:%S", time.gmtime(row["wall_time"])))


def _diverged(r: "_Run", epoch: int, step: int, value: float):
    last = r.dir / LAST
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    raise DivergedError(f"training loss became {value} in epoch {epoch + 1} (step {step}); stopped, {kept}. "
                        f"Lower lr (now {r.config.lr:g}), raise warmup_epochs, set clip_grad, or use precision=fp32")


# ---------------------------------------------------------------- everything a run needs
@dataclass
class _Run:
    config: TrainConfig
    d: "_Dist"
    device: torch.device
    precision: str
    dir: Path
    resuming: bool
    data: DatasetSplits
    preprocess: Preprocess  # what checkpoints record: size, channels, the normalisation the run trains with
    loader: Any  # the training split's loader(): a BatchLoader, or a ShardLoader for WebDataset shards
    steps_per_epoch: int
    step: TrainStep
    state: RunState
    generator: torch.Generator


def _prepare(config: TrainConfig, data: DatasetSplits | None, model: VisionTransformer | None,
             normalization: Normalization | None, d: "_Dist") -> _Run:
    """Everything the loop needs, in dependency order; a resumed run gets its model, normalisation and state back."""
    device = resolve_device(config.device, d.local_rank)
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # process-wide: on a busy CPU one thread can be much faster
    precision = resolve_precision(config.precision, device, field="TrainConfig.precision")
    run, resuming = _resumed_run(config, d)
    if run is None and config.out:  # a bad --out is named before the data is loaded
        run = _new_run(config, "", d)
    if resuming:  # the run's own architecture and normalisation, as its checkpoint records them
        model = VisionTransformer.from_pretrained(run / LAST, **model_overrides(config))
        normalization = checkpoint_normalization(run / LAST, model.config.in_channels)
    elif model is None and config.init:
        raise ConfigError(f"TrainConfig.init={config.init!r} is read by vitlab.train; to call fit() yourself, "
                          "load the weights (vitlab.interop.read_pretrained) and pass them as model=")
    image_size, channels = input_spec(config, model)
    if data is None:
        data = load_data(config.data, image_size=image_size, channels=channels, val_fraction=config.val_fraction,
                         seed=config.seed, cache_dir=config.cache_dir, skip_bad_files=config.skip_bad_files,
                         workers=config.workers)
    if config.calibrate:  # images the model never trains on, to fit the temperature on at the end
        data = with_val_split(data, config.val_fraction, config.seed)
    mean, std = (resuming and normalization) or _normalization(config, data, model, normalization, channels, d)
    if run is None:
        run = _new_run(config, getattr(data, "name", "data"), d)

    loader, steps_per_epoch = _train_loader(config, data, device, d)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = _build_model(config, list(data.classes), model)
    if config.teacher and not model.config.distillation_head:
        raise ConfigError(f"TrainConfig.teacher={config.teacher!r} needs a model with DeiT's distillation token and "
                          "head: set model_overrides.distillation_token=true and "
                          "model_overrides.distillation_head=true")
    preprocess = Preprocess(image_size=tuple(image_size), channels=channels, mean=tuple(mean), std=tuple(std))
    if config.whiten_stem and not resuming:
        _whiten(model, data, preprocess, d)
    model = model.to(device)
    step = make_train_step(model, config, device=device, precision=precision, steps_per_epoch=steps_per_epoch,
                           num_classes=len(data.classes), image_size=image_size, mean=mean, std=std,
                           **_forward(config, model, device, d))
    state = RunState(planned_epochs=config.epochs, config_epochs=config.epochs,
                     scheduler=step.scheduler.state_dict())
    if resuming:
        state = _resume_state(config, run, step, device, steps_per_epoch, d)
    elif step.scheduler.warmup_steps >= step.scheduler.total_steps and d.is_main:
        log.warning("warmup_epochs=%g >= epochs=%d: the learning rate never reaches lr=%g", config.warmup_epochs,
                    config.epochs, config.lr)
    if config.teacher:  # trained before the ViT's first step: its time counts against the time limit
        teacher, seconds = teacher_for_run(config, run, data, preprocess=preprocess, device=device,
                                           precision=precision, resuming=resuming, rank=d.rank,
                                           world_size=d.world_size)
        step.distillation = Distillation(teacher)
        state.wall_time += seconds
    if d.is_main:
        saved = to_dict(config)
        saved.update(out=None, resume=None)  # so `--recipe RUN/config.yaml` starts a new run
        atomic_write_text(run / CONFIG_YAML, dump_yaml(saved))
        log.info("training %s (%s parameters) on %s: %d train / %d test images, %d classes, %d steps/epoch, "
                 "device %s x %d, %s, run folder %s", config.init or config.model, f"{model.num_parameters():,}",
                 getattr(data, "name", config.data), len(data.train), len(data.test), len(data.classes),
                 steps_per_epoch, device, d.world_size, precision, run)
    return _Run(config=config, d=d, device=device, precision=precision, dir=run, resuming=resuming, data=data,
                preprocess=preprocess,
                loader=loader, steps_per_epoch=steps_per_epoch, step=step, state=state,
                generator=torch.Generator(device=device))


def _train_loader(config: TrainConfig, data: DatasetSplits, device: torch.device, d: "_Dist"):
    """(this rank's loader of training batches, optimizer steps per epoch)."""
    per_step = d.world_size * config.accum_steps
    if config.batch_size % per_step:
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} must be divisible by world_size x "
                          f"accum_steps = {d.world_size} x {config.accum_steps}")
    _check_same_data(data, d, device)
    loader = data.train.loader(batch_size=config.batch_size // per_step, shuffle=True, seed=config.seed,
                               drop_last=True, device=device, rank=d.rank, world_size=d.world_size)
    steps_per_epoch = len(loader) // config.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} is larger than the training set "
                          f"({len(data.train)} images): lower batch_size")
    return loader, steps_per_epoch


def _whiten(model: VisionTransformer, data: DatasetSplits, preprocess: Preprocess, d: "_Dist") -> None:
    """``whiten_stem``: the first convolution whitened on the patches of the first training images (the same
    images on every rank: the same filters)."""
    sample = data.train.head(WHITEN_IMAGES)
    done, filters = model.patch_embed.whiten_(sample, transform=preprocess)
    if d.is_main:
        log.info("whiten_stem: %d of the first convolution's %d filters whitened on the patches of %d training "
                 "images", done, filters, len(sample))


def _resumed_run(config: TrainConfig, d: "_Dist") -> tuple[Path | None, bool]:
    """(the run folder of ``config.resume``, whether it holds a checkpoint), or (None, False) for a new run."""
    if not config.resume:
        return None, False
    run = require_run_folder(config.resume, "--resume")
    if d.is_main:
        recover_run(run)
    _barrier(d)
    return run, can_resume(run)


def _resume_state(config: TrainConfig, run: Path, step: TrainStep, device: torch.device, steps_per_epoch: int,
                  d: "_Dist") -> RunState:
    """Load the checkpoint in ``run/last`` into the step; a changed ``epochs`` re-lays the cosine over it."""
    state = load_training_state(run / LAST, model=step.model, optimizer=step.optimizer, ema=step.ema,
                                slow=step.slow, map_location=device)
    step.scheduler.load_state_dict(state.scheduler)
    if state.scaler:
        step.scaler.load_state_dict(state.scaler)
    if config.epochs != state.config_epochs:  # the user extended or shortened the run: whole epochs from here
        state.planned_epochs = state.config_epochs = config.epochs
        step.scheduler.resize(step.scheduler.step_count + (config.epochs - state.epoch) * steps_per_epoch,
                              step.scheduler.warmup_steps)
    if d.is_main:
        write_metrics(run, state.history)  # drop lines of an epoch the checkpoint does not hold
        log.info("resuming %s at epoch %d/%d", run, state.epoch + 1, state.planned_epochs)
    return state


def _new_run(config: TrainConfig, data_name: str, d: "_Dist") -> Path:
    """The folder of a new run (``config.out``, else ``runs/<recipe-or-model>-<data>-<time>``), created."""
    if config.out:
        run = Path(config.out)
        if (run / METRICS).exists() or (run / LAST).exists():
            raise ConfigError(f"TrainConfig.out={str(run)!r} already holds a run: continue it with "
                              f"--resume {run}, or pick another --out")
    else:
        names = [str(_unused_run_name(config, data_name)) if d.is_main else None]
        if d.world_size > 1:
            dist.broadcast_object_list(names, src=0)
        run = Path(names[0])
    if d.is_main:
        ensure_folder(run, "TrainConfig.out" if config.out else "run folder")
    return run


def _unused_run_name(config: TrainConfig, data_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.recipe or config.model}-{data_name}-{stamp}".replace("/", "_")
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


# ---------------------------------------------------------------- the model and its input
def model_overrides(config: TrainConfig) -> dict[str, Any]:
    """The ViTConfig fields the run sets: ``model_overrides`` and the dropouts."""
    overrides = dict(config.model_overrides)
    overrides.update({k: getattr(config, k) for k in ("drop_path", "dropout") if getattr(config, k) is not None})
    return overrides


def _build_model(config: TrainConfig, classes: list[str], model: VisionTransformer | None) -> VisionTransformer:
    if model is None:
        overrides = model_overrides(config)
        if config.image_size is not None:
            overrides["image_size"] = tuple(config.image_size)
        model = create_model(get_config(config.model, **overrides, num_classes=len(classes), labels=list(classes)))
    else:  # a pretrained model: a new head for these classes (the whole old one, as the paper fine-tunes)
        model = prepare_finetune(model, labels=classes, image_size=config.image_size)
    if config.grad_checkpointing:
        model.set_gradient_checkpointing(True)
    if config.linear_probe:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return model


def input_spec(config: TrainConfig, model: VisionTransformer | None = None) -> tuple[tuple[int, int], int]:
    """(image size, channels) a run of ``config`` (training ``model``, else the one it builds) loads its data at:
    what :func:`fit` passes :func:`~vitlab.data.load_data` when it is given no data."""
    model_config = model.config if model is not None else get_config(config.model, **model_overrides(config))
    size = config.image_size if config.image_size is not None else model_config.image_size
    return tuple(size), model_config.in_channels


def _normalization(config: TrainConfig, data, model: VisionTransformer | None, pretrained: Normalization | None,
                   channels: int, d: "_Dist") -> Normalization:
    """The (mean, std) the run normalises its inputs with (``TrainConfig.normalize``); ``pretrained``: what the
    given model's own inputs were normalised with, when that is known."""
    choice = config.normalize
    if choice == "auto":
        if pretrained is not None:
            if d.is_main:
                log.info("normalising with the pretrained weights' mean %s / std %s (normalize=data: this "
                         "dataset's)", [round(x, 4) for x in pretrained[0]], [round(x, 4) for x in pretrained[1]])
            return tuple(pretrained[0]), tuple(pretrained[1])
        if model is not None and d.is_main:
            log.info("the pretrained checkpoint does not say how its inputs were normalised: using this dataset's "
                     "mean/std (set normalize=imagenet, inception or clip if you know)")
        choice = "data"
    if choice == "data":
        return tuple(data.mean), tuple(data.std)
    if channels != 3:
        raise ConfigError(f"TrainConfig.normalize={choice!r} is for RGB images, but the model takes {channels} "
                          "channel(s): use normalize=data")
    return NAMED_MEAN_STD[choice]


def _forward(config: TrainConfig, model: VisionTransformer, device: torch.device, d: "_Dist") -> dict[str, Any]:
    """What the step's inputs go through: the model, its DDP wrapper (with its no_sync), compiled if asked."""
    forward: Any = model
    no_sync = None
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = forward.no_sync
    if config.compile:
        forward = torch.compile(forward)
    return {"forward": forward, "no_sync": no_sync}


# ---------------------------------------------------------------- processes, seeds, TensorBoard
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_name: str) -> _Dist:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns)


def _check_same_data(data: DatasetSplits, d: _Dist, device: torch.device) -> None:
    """Every rank must train on the same images: a folder that changed between the ranks' listings (or their
    caches) would otherwise train each rank on another dataset without a word."""
    if d.world_size == 1:
        return
    prints: list = [None] * d.world_size
    dist.all_gather_object(prints, (data.fingerprint(), len(data.train)))
    if len(set(prints)) > 1:
        sizes = ", ".join(f"rank {r}: {n:,} training images" for r, (_, n) in enumerate(prints))
        raise DataError(f"{data.spec}: the ranks read different datasets ({sizes}); did the data change while the "
                        "run started? Keep it unchanged while a run starts, then start again")


def _agree(d: _Dist, device: torch.device, *values: int) -> tuple[int, ...]:
    """Rank 0's integers on every rank."""
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return tuple(int(v) for v in t.tolist())


def _barrier(d: _Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2 ** 63)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run / "tensorboard"))
