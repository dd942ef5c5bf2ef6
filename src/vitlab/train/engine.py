"""The training loop: ``fit()`` trains a ViT and writes the run folder; ``evaluate()`` measures a model.

One process or many (``torchrun`` sets ``WORLD_SIZE``; we then use DistributedDataParallel, gloo on CPU and
nccl on CUDA): every rank trains on its shard of each global batch, rank 0 logs and writes the files, metrics
are summed across ranks. ``TrainConfig.batch_size`` is the global batch, so 1 and N processes train alike.

Exact resume: the batch order is a function of (seed, epoch), the augmentation and dropout generators are
re-seeded from (seed, epoch, rank) at each epoch start, and the checkpoint holds everything else (weights,
AdamW moments, schedule step, grad scaler, EMA, RNG states, metrics so far), so ``1 epoch + resume 1`` gives
the same weights bit for bit as 2 epochs straight.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitlab._device import default_precision, resolve_device
from vitlab.config import TrainConfig, dump_yaml, to_dict
from vitlab.errors import CheckpointError, ConfigError, DataError, VitlabError
from vitlab.train import checkpoint as ckpt
from vitlab.train.metrics import ClassificationTally, soft_cross_entropy, sum_dtype, write_metrics
from vitlab.train.optim import WarmupCosine, build_optimizer

log = logging.getLogger("vitlab.train")


class DivergedError(VitlabError):
    """The training loss became NaN or infinite; the run folder keeps the last good checkpoint."""


@dataclass
class TrainResult:
    """What :func:`fit` returns: the run folder, the per-epoch metrics, and the final and best accuracy."""

    run_dir: Path
    history: list[dict]
    top1: float | None  # test top-1 of the last evaluated epoch
    best_top1: float | None
    best_epoch: int | None
    wall_time: float  # seconds of training (all sessions of a resumed run)
    stopped: str  # "completed", "time_limit" or "stop_after_epoch"
    final_eval: dict | None = field(default=None, repr=False)  # per-class accuracy and confusion, last epoch


# ---------------------------------------------------------------- processes and devices
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


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2 ** 63)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, *, mean, std, image_size=None, batch_size: int = 512,
             device: str | torch.device = "cpu", precision: str = "fp32", classes: list[str] | None = None,
             hflip: bool = False) -> dict:
    """Test loss, top-1, top-5, per-class accuracy and confusion matrix of ``model`` on ``dataset``.

    With ``hflip`` (test-time augmentation) each image is scored with its mirror image as well and the two
    class probabilities are averaged; the loss is the cross-entropy of that average.

    Under torch.distributed each rank takes every world_size-th image (no padding, so no image counts
    twice) and the sums are reduced, so every rank returns the same result.
    """
    from vitlab.data import BatchLoader, EvalTransform

    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    if world > 1:
        dataset = dataset.subset(torch.arange(rank, len(dataset), world))
    size = tuple(image_size) if image_size is not None else tuple(dataset.images.shape[-2:])
    transform = EvalTransform(mean=tuple(mean), std=tuple(std), image_size=size)
    num_classes = len(classes) if classes else int(getattr(model, "config").num_classes)
    tally = ClassificationTally(num_classes, device)
    was_training = model.training
    model.eval()
    if len(dataset):
        loader = BatchLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, device=device)
        for images, labels in loader:
            inputs = transform(images)
            with _autocast(device, precision):
                logits = model(inputs)
                if hflip:
                    mirrored = model(inputs.flip(-1))
            if hflip:  # log of the mean probability: its log-softmax is itself
                logits = torch.logsumexp(torch.stack([logits.float().log_softmax(-1),
                                                      mirrored.float().log_softmax(-1)]), 0) - math.log(2)
            tally.update(logits, labels)
    model.train(was_training)
    tally.reduce()
    return tally.result(classes)


def check_classes(model_config, classes: list[str], data: str, source) -> None:
    """A :class:`DataError` unless dataset ``data`` has the classes (names and number) the model was trained on."""
    if model_config.labels is not None and list(model_config.labels) != list(classes):
        raise DataError(f"{data}: its classes {list(classes)[:10]} differ from the model's "
                        f"{list(model_config.labels)[:10]} ({source}/config.json); evaluate on a dataset with the "
                        "classes the model was trained on")
    if model_config.num_classes != len(classes):
        raise DataError(f"{data}: {len(classes)} classes, but the model in {source} has "
                        f"{model_config.num_classes} outputs")


# ---------------------------------------------------------------- the run folder
def _new_run_dir(config: TrainConfig, data_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.recipe or config.model}-{data_name}-{stamp}".replace("/", "_")
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _prepare_run_dir(config: TrainConfig, data_name: str, d: _Dist) -> tuple[Path, bool]:
    """The run folder (created) and whether it holds a checkpoint to resume from."""
    if config.resume:
        run = Path(config.resume)
        if not (run / "config.yaml").is_file():
            raise CheckpointError(f"{run}: not a run folder (no config.yaml); --resume takes a folder written by "
                                  "`vitlab train`")
        if d.is_main:
            ckpt.recover_run(run)
        _barrier(d)
        return run, (run / "last" / ckpt.STATE_NAME).is_file()
    if config.out:
        run = Path(config.out)
        if (run / "metrics.jsonl").exists() or (run / "last").exists():
            raise ConfigError(f"TrainConfig.out={str(run)!r} already holds a run: continue it with "
                              f"--resume {run}, or pick another --out")
    else:
        names = [str(_new_run_dir(config, data_name)) if d.is_main else None]
        if d.world_size > 1:
            dist.broadcast_object_list(names, src=0)
        run = Path(names[0])
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
    return run, False


def _barrier(d: _Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------- model
def _preset_config(config: TrainConfig):
    """The ViTConfig that ``config.model`` names, with the run's overrides (fields, dropouts, image size)."""
    from vitlab.models import get_config

    overrides = dict(config.model_overrides)
    for name in ("drop_path", "dropout"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    if config.image_size is not None:
        overrides["image_size"] = tuple(config.image_size)
    return get_config(config.model, **overrides)


def _build_model(config: TrainConfig, classes: list[str], model: torch.nn.Module | None):
    from vitlab.models import create_model

    if model is None:
        return create_model(_preset_config(config).replace(num_classes=len(classes), labels=list(classes)))
    # A ready (pretrained) model: fit its head and input size to this dataset. A new head replaces the whole
    # old one, an ImageNet-21k pre-logits layer included, as the paper fine-tunes.
    from vitlab.interop.finetune import prepare_finetune

    return prepare_finetune(model, labels=list(classes), image_size=config.image_size)


def _normalization(config: TrainConfig, data, model: torch.nn.Module | None, channels: int,
                   d: _Dist) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the run normalises its inputs with (``TrainConfig.normalize``)."""
    from vitlab.data.transforms import IMAGENET_MEAN_STD, INCEPTION_MEAN_STD

    choice = config.normalize
    if choice == "auto":
        pretrained = getattr(model, "pretrained_normalization", None) if model is not None else None
        if pretrained is not None:
            if d.is_main:
                log.info("normalising with the pretrained weights' mean %s / std %s (normalize=data: this "
                         "dataset's)", [round(x, 4) for x in pretrained[0]], [round(x, 4) for x in pretrained[1]])
            return tuple(pretrained[0]), tuple(pretrained[1])
        if model is not None and d.is_main:
            log.info("the pretrained checkpoint does not say how its inputs were normalised: using this dataset's "
                     "mean/std (set normalize=imagenet or inception if you know)")
        choice = "data"
    if choice == "data":
        return tuple(data.mean), tuple(data.std)
    if channels != 3:
        raise ConfigError(f"TrainConfig.normalize={choice!r} is for RGB images, but the model takes {channels} "
                          "channel(s): use normalize=data")
    return IMAGENET_MEAN_STD if choice == "imagenet" else INCEPTION_MEAN_STD


def _input_spec(config: TrainConfig, model: torch.nn.Module | None) -> tuple[tuple[int, int], int]:
    """(image size, channels) the data must be loaded at."""
    if model is not None:
        size = tuple(config.image_size) if config.image_size else tuple(model.config.image_size)
        return size, model.config.in_channels
    cfg = _preset_config(config)
    return tuple(cfg.image_size), cfg.in_channels


# ---------------------------------------------------------------- fit
def fit(config: TrainConfig, *, data=None, model: torch.nn.Module | None = None, progress=None) -> TrainResult:
    """Train as ``config`` says and write the run folder; return a :class:`TrainResult`.

    ``data``: a ready ``DatasetSplits`` (else ``config.data`` is loaded). ``model``: a ready (e.g.
    pretrained) VisionTransformer, whose head is reset to the dataset's classes and whose position embedding
    is resized to ``config.image_size``. ``progress``: an object with ``start/update/end`` (see
    :class:`~vitlab.train.progress.ProgressBar`); rank 0 only.
    """
    d = _setup_distributed(config.device)
    try:
        return _fit(config, data, model, progress, d)
    finally:
        if d.owns_group:
            gc.collect()  # free the DDP reducer's pending work while the process group still exists
            dist.destroy_process_group()


def _fit(config: TrainConfig, data, model, progress, d: _Dist) -> TrainResult:
    from vitlab.data import BatchLoader, TrainTransform, load_data

    device = resolve_device(config.device, d.local_rank)
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # process-wide: on a busy CPU one thread can be much faster
    # "auto": bf16 autocast where the device has fast bf16 matmul (recent x86 CPUs, GPUs), else fp32
    precision = default_precision(device) if config.precision == "auto" else config.precision
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"TrainConfig.precision='fp16' needs a CUDA GPU (device is {device.type}): use bf16 "
                          "or fp32")
    image_size, channels = _input_spec(config, model)
    if data is None:
        data = load_data(config.data, image_size=image_size, channels=channels, val_fraction=config.val_fraction,
                         seed=config.seed, cache_dir=config.cache_dir, skip_bad_files=config.skip_bad_files,
                         workers=config.workers)
    classes = list(data.classes)
    mean, std = _normalization(config, data, model, channels, d)
    run, resuming = _prepare_run_dir(config, getattr(data, "name", "data"), d)

    per_step = d.world_size * config.accum_steps
    if config.batch_size % per_step:
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} must be divisible by world_size x "
                          f"accum_steps = {d.world_size} x {config.accum_steps}")
    micro_batch = config.batch_size // per_step
    loader = BatchLoader(data.train, batch_size=micro_batch, shuffle=True, seed=config.seed, drop_last=True,
                         device=device, rank=d.rank, world_size=d.world_size)
    steps_per_epoch = len(loader) // config.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"TrainConfig.batch_size={config.batch_size} is larger than the training set "
                          f"({len(data.train)} images): lower batch_size")

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = _build_model(config, classes, model).to(device)
    if config.grad_checkpointing:
        model.set_gradient_checkpointing(True)
    if config.linear_probe:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    ema = None
    if config.ema_decay is not None:
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)

    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
                                layer_decay=config.layer_decay)
    planned_epochs = config.epochs
    scheduler = WarmupCosine(optimizer, lr=config.lr, min_lr=config.min_lr,
                             total_steps=planned_epochs * steps_per_epoch,
                             warmup_steps=round(config.warmup_epochs * steps_per_epoch))
    if scheduler.warmup_steps >= scheduler.total_steps and d.is_main:
        log.warning("warmup_epochs=%g >= epochs=%d: the learning rate never reaches lr=%g", config.warmup_epochs,
                    config.epochs, config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    preprocess = {"mean": list(mean), "std": list(std), "image_size": list(image_size),
                  "channels": channels}

    start_epoch, history, best_top1, best_epoch, best_loss, wall_before = 0, [], None, None, math.inf, 0.0
    if resuming:
        state = ckpt.load_training_state(run / "last", model=model, optimizer=optimizer, ema=ema,
                                         map_location=device)
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        planned_epochs = int(state.get("planned_epochs", config.epochs))
        if config.epochs != state.get("config_epochs", config.epochs):
            # The user extended or shortened the run: lay the cosine out over the new length.
            planned_epochs = config.epochs
            scheduler.total_steps = planned_epochs * steps_per_epoch
            scheduler.load_state_dict(scheduler.state_dict())
        best_top1, best_epoch = state.get("best_top1"), state.get("best_epoch")
        best_loss = state.get("best_loss") if state.get("best_loss") is not None else math.inf
        wall_before = float(state.get("wall_time", 0.0))
        if d.is_main:
            write_metrics(run / "metrics.jsonl", history)  # drop lines of an epoch the checkpoint does not hold
            log.info("resuming %s at epoch %d/%d", run, start_epoch + 1, planned_epochs)
    if d.is_main:
        saved = to_dict(config)
        saved.update(out=None, resume=None)  # so `--recipe RUN/config.yaml` starts a new run
        from vitlab._files import atomic_write_text

        atomic_write_text(run / "config.yaml", dump_yaml(saved))

    train_model: torch.nn.Module = model
    ddp = None
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_model = ddp
    if config.compile:
        train_model = torch.compile(train_model)

    transform = TrainTransform(
        mean=tuple(mean), std=tuple(std), image_size=image_size, num_classes=len(classes),
        crop_padding=config.crop_padding, hflip=config.hflip,
        random_resized_crop=tuple(config.random_resized_crop) if config.random_resized_crop else None,
        auto_augment=config.auto_augment, random_erasing=config.random_erasing, mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha, mix_prob=config.mix_prob, label_smoothing=config.label_smoothing)
    generator = torch.Generator(device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    writer = _tensorboard(run) if d.is_main else None
    if d.is_main:
        log.info("training %s (%s parameters) on %s: %d train / %d test images, %d classes, %d steps/epoch, "
                 "device %s x %d, %s, run folder %s", config.model if config.init is None else config.init,
                 f"{model.num_parameters():,}", getattr(data, "name", config.data), len(data.train),
                 len(data.test), len(classes), steps_per_epoch, device, d.world_size, precision, run)

    t_loop = time.perf_counter()
    stopped, final_eval, epoch = "completed", None, start_epoch
    train_times: list[float] = []  # the training part of each epoch (seconds)
    eval_times: list[float] = []  # each evaluation on the test split (seconds)
    probe_step = max(5, steps_per_epoch // 10) if config.time_limit_minutes is not None and not resuming \
        and steps_per_epoch >= 20 else -1
    probe_from, t_probe = max(1, probe_step // 4), 0.0

    def replan(evaluating_now: bool) -> tuple[int, bool]:  # after epoch `epoch`, with the time left now
        return _plan_to_time_limit(
            scheduler, config, d, device, epoch=epoch, planned=planned_epochs, steps_per_epoch=steps_per_epoch,
            seconds_left=config.time_limit_minutes * 60 - (wall_before + time.perf_counter() - t_loop),
            train_times=train_times, eval_time=eval_times[-1], evaluating_now=evaluating_now)
    while epoch < planned_epochs:
        t_epoch = time.perf_counter()
        loader.set_epoch(epoch)
        generator.manual_seed(_epoch_seed(config.seed, epoch, d.rank))
        torch.manual_seed(_epoch_seed(config.seed, epoch, d.rank) + 1)  # dropout, drop path
        model.train()
        loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
        seen = torch.zeros((), dtype=torch.int64, device=device)
        if progress is not None and d.is_main:
            progress.start(epoch + 1, planned_epochs, steps_per_epoch)
        last_check = time.perf_counter()
        step_in_epoch = 0
        for i, (images, labels) in enumerate(loader):
            if i >= steps_per_epoch * config.accum_steps:
                break  # an incomplete accumulation group at the end of the epoch is dropped
            boundary = (i + 1) % config.accum_steps == 0
            inputs, targets = transform(images, labels, generator)
            sync = contextlib.nullcontext() if (ddp is None or boundary) else ddp.no_sync()
            with sync:
                with _autocast(device, precision):
                    logits = train_model(inputs)
                loss = soft_cross_entropy(logits, targets)
                scaler.scale(loss / config.accum_steps).backward()
            loss_sum += loss.detach().to(loss_sum.dtype) * labels.shape[0]
            seen += labels.shape[0]
            if not boundary:
                continue
            if config.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                _ema_update(ema, model, config.ema_decay)
            step_in_epoch += 1
            now = time.perf_counter()
            if step_in_epoch == probe_from and epoch == start_epoch:
                t_probe = now  # the first steps are slow (kernel selection, allocator): not timed
            if step_in_epoch == probe_step and epoch == start_epoch:
                # Time-limited run: estimate the epoch time early in the first epoch and lay the schedule out
                # for the epochs that fit, rather than finding out after a long first epoch. Steps after the
                # first few only: those are slow, and a pessimistic plan wastes the budget.
                step_time = (now - t_probe) / (probe_step - probe_from)
                est = (step_time * steps_per_epoch + (t_probe - t_epoch) - probe_from * step_time) * 1.08  # + eval
                left = config.time_limit_minutes * 60 - (wall_before + t_epoch - t_loop)
                fits = _agree(max(epoch + int(left // est), epoch + 1), d, device)
                planned_epochs = _replan(scheduler, config, planned_epochs, fits, steps_per_epoch, d)
            if now - last_check > 1.0 and d.is_main:  # the only host syncs inside an epoch: ~1 per second
                last_check = now
                current = loss.item()
                if d.world_size == 1 and not math.isfinite(current):
                    _diverged(run, epoch, step_in_epoch, current, config)
                if progress is not None:
                    progress.update(step_in_epoch, current,
                                    step_in_epoch * config.batch_size / max(now - t_epoch, 1e-9))
        if progress is not None and d.is_main:
            progress.end()
        if d.world_size > 1:
            dist.all_reduce(loss_sum)
            dist.all_reduce(seen)
        train_time = time.perf_counter() - t_epoch
        train_loss = float(loss_sum) / max(int(seen), 1)
        if not math.isfinite(train_loss):
            _diverged(run, epoch, step_in_epoch, train_loss, config)
        epoch += 1

        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "test_loss": None, "top1": None,
                               "top5": None, "lr": scheduler.current_lr(),
                               "images_per_s": steps_per_epoch * config.batch_size / train_time}
        train_times.append(train_time)
        time_limited = config.time_limit_minutes is not None
        # A time-limited run plans before evaluating (once it knows what an evaluation costs), so that the epoch
        # the time limit makes the last one is evaluated; its first evaluation measures that cost.
        plan_first = time_limited and not eval_times and epoch < planned_epochs
        out_of_time = False
        if time_limited and eval_times and epoch < planned_epochs:
            planned_epochs, out_of_time = replan(evaluating_now=epoch % config.eval_every == 0)
        due = (epoch % config.eval_every == 0 or epoch == planned_epochs or epoch == config.stop_after_epoch
               or out_of_time or (time_limited and not eval_times))
        if due:
            kwargs = dict(mean=mean, std=std, image_size=image_size, batch_size=config.eval_batch_size,
                          device=device, precision=precision, classes=classes, hflip=config.tta_hflip)
            t_eval = time.perf_counter()
            result = evaluate(model, data.test, **kwargs)
            row.update(test_loss=result["test_loss"], top1=result["top1"], top5=result["top5"])
            final_eval = result
            if ema is not None:
                ema_result = evaluate(ema, data.test, **kwargs)
                row.update(ema_test_loss=ema_result["test_loss"], ema_top1=ema_result["top1"],
                           ema_top5=ema_result["top5"])
            eval_times.append(time.perf_counter() - t_eval)
        if plan_first:  # the first whole epoch and its evaluation measure what the probe estimated
            planned_epochs, out_of_time = replan(evaluating_now=False)
        wall = wall_before + time.perf_counter() - t_loop
        row["wall_time"] = wall
        history.append(row)
        candidate = max(row["top1"], row.get("ema_top1") or 0.0) if due else None
        cand_loss = min(row["test_loss"], row.get("ema_test_loss") or math.inf) if due else None
        # best = highest top-1; among equal top-1, the lower test loss (a saturated 100% keeps improving)
        improved = candidate is not None and (best_top1 is None or candidate > best_top1 or
                                              (candidate == best_top1 and cand_loss < best_loss))
        if improved:
            best_top1, best_epoch, best_loss = candidate, epoch, cand_loss
        if d.is_main:
            state = {"epoch": epoch, "planned_epochs": planned_epochs, "config_epochs": config.epochs,
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "best_top1": best_top1,
                     "best_epoch": best_epoch, "best_loss": None if math.isinf(best_loss) else best_loss,
                     "wall_time": wall, "history": history,
                     "best_source": "ema" if (ema is not None and improved and row.get("ema_top1", 0) > row["top1"])
                     else "model"}
            ckpt.save_checkpoint(run / "last", model=model, preprocess=preprocess, state=state,
                                 optimizer=optimizer, ema=ema)
            write_metrics(run / "metrics.jsonl", history)
            if improved:
                if state["best_source"] == "ema":
                    ckpt.save_checkpoint(run / "best", model=ema, preprocess=preprocess, state=state)
                else:
                    ckpt.copy_checkpoint(run / "last", run / "best")
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        writer.add_scalar(key, value, epoch)
                writer.flush()
            log.info("epoch %d/%d  train loss %.4f%s  lr %.2e  %.0f img/s  %s", epoch, planned_epochs, train_loss,
                     f"  test loss {row['test_loss']:.4f}  top-1 {100 * row['top1']:.2f}%  top-5 "
                     f"{100 * row['top5']:.2f}%" if due else "", row["lr"], row["images_per_s"],
                     time.strftime("%H:%M:%S", time.gmtime(wall)))

        if config.stop_after_epoch is not None and epoch >= config.stop_after_epoch and epoch < planned_epochs:
            stopped = "stop_after_epoch"
            break
        if out_of_time:
            stopped = "time_limit"
            break
    if writer is not None:
        writer.close()
    if d.is_main and history:
        _write_reports(run, history, final_eval, plots=config.plots)
    _barrier(d)
    tested = [r for r in history if r["top1"] is not None]
    return TrainResult(run_dir=run, history=history, top1=tested[-1]["top1"] if tested else None,
                       best_top1=best_top1, best_epoch=best_epoch, wall_time=history[-1]["wall_time"] if history
                       else 0.0, stopped=stopped, final_eval=final_eval)


def _agree(value: int, d: _Dist, device: torch.device) -> int:
    """Rank 0's value on every rank (timings differ between ranks; the schedule must not)."""
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _plan_to_time_limit(scheduler: WarmupCosine, config: TrainConfig, d: _Dist, device: torch.device, *,
                        epoch: int, planned: int, steps_per_epoch: int, seconds_left: float,
                        train_times: list[float], eval_time: float, evaluating_now: bool) -> tuple[int, bool]:
    """Fit the schedule of a time-limited run to the time left after ``epoch``: (planned epochs, out of time).

    Epochs are costed at the median training time of the last five (+5%: a noisy machine's slow epochs do not
    shrink the plan, a lasting slowdown does) plus an evaluation every ``eval_every`` epochs, and the time of
    the final evaluation (and of this epoch's, when ``evaluating_now``) is kept aside. The plan shrinks when
    fewer epochs fit; it grows (up to ``epochs``) only while the run is in its first half, where a longer
    cosine barely moves the learning rate, so the probe's early estimate does not waste the budget.
    """
    per_epoch = statistics.median(train_times[-5:]) * 1.05 + eval_time / config.eval_every
    usable = seconds_left - eval_time * (1 + evaluating_now)
    fits = _agree(min(epoch + max(int(usable // per_epoch), 0), config.epochs), d, device)
    if fits <= epoch:
        return planned, True
    return _replan(scheduler, config, planned, fits, steps_per_epoch, d, grow=2 * epoch <= planned), False


def _replan(scheduler: WarmupCosine, config: TrainConfig, planned: int, fits: int, steps_per_epoch: int,
            d: _Dist, grow: bool = False) -> int:
    """Make the schedule end after epoch ``fits`` if that is sooner (or, with ``grow``, later): the cosine is
    recomputed for the new total and the warmup keeps its share of the run."""
    if fits == planned or (fits > planned and not grow):
        return planned
    scheduler.total_steps = fits * steps_per_epoch
    scheduler.warmup_steps = min(round(config.warmup_epochs * steps_per_epoch),
                                 round(config.warmup_epochs / config.epochs * fits * steps_per_epoch))
    scheduler.load_state_dict(scheduler.state_dict())
    if d.is_main:
        log.info("time limit %g min: the schedule now ends after epoch %d", config.time_limit_minutes, fits)
    return fits


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):  # BatchNorm statistics of a conv stem
        ema_buffer.copy_(buffer)


def _diverged(run: Path, epoch: int, step: int, value: float, config: TrainConfig):
    last = run / "last"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    raise DivergedError(f"training loss became {value} in epoch {epoch + 1} (step {step}); stopped, {kept}. "
                        f"Lower lr (now {config.lr:g}), raise warmup_epochs, set clip_grad, or use precision=fp32")


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run / "tensorboard"))


def _write_reports(run: Path, history: list[dict], final_eval: dict | None, plots: bool = True) -> None:
    """eval.json of the last evaluated epoch; with ``plots``, curves.png and confusion_matrix.png."""
    from vitlab._files import write_json
    from vitlab.train.plots import plot_run_files

    if final_eval is not None:
        write_json(run / "eval.json", final_eval)
    if plots:
        plot_run_files(run, history, final_eval)
