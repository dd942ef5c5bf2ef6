"""Exact resume: 2 epochs straight == 1 epoch + resume 1 (bit-identical weights, optimiser and metrics);
a crash while saving keeps the previous checkpoint; a NaN loss stops the run and keeps the last good one."""

from __future__ import annotations

import json

import pytest
import torch
from _train_fixtures import TINY_MODEL, tiny_config, tiny_splits

import vitlab
from vitlab import checkpoints as ckpt
from vitlab import checkpoints as runs
from vitlab._files import load_safetensors
from vitlab.training import engine, step

pytestmark = pytest.mark.usefixtures("one_thread")

VOLATILE = ("wall_time", "images_per_s")


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


def _assert_same_checkpoint(a, b):
    for name in ("model.safetensors", "optimizer.safetensors", "ema.safetensors", "lookahead.safetensors"):
        ta, tb = load_safetensors(a / name), load_safetensors(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}:{key} differs"
    sa, sb = (json.loads((x / "state.json").read_text()) for x in (a, b))
    assert sa["scheduler"] == sb["scheduler"] and sa["epoch"] == sb["epoch"] == 2


# Dropout, drop path, flips, label smoothing, EMA and Lookahead all draw on or carry state that resume must
# restore (Lookahead's update at step 5 of 8 falls in the resumed epoch, from slow weights the checkpoint holds);
# progressive resizing's size follows the restored schedule (4 px for steps 0-2 of 8, 6 px for 3-4, then 8 px).
RANDOM_BITS = dict(dropout=0.1, drop_path=0.1, hflip=True, label_smoothing=0.1, ema_decay=0.9, clip_grad=0.5,
                   lookahead=True, progressive_resize=[0.5, 0.25, 0.75])


# A conv stem adds BatchNorm running statistics (buffers) to the model and to its EMA.
@pytest.mark.device
@pytest.mark.parametrize("model", [{}, dict(model_overrides=dict(TINY_MODEL, patch_embed="conv_stem"))],
                         ids=["patchify", "conv-stem"])
def test_resume_is_exact(tmp_path, model, device):
    data = tiny_splits()
    bits = dict(RANDOM_BITS, **model, device=device.type)
    straight = vitlab.train(tiny_config(tmp_path, "straight", **bits), data=data)
    first = vitlab.train(tiny_config(tmp_path, "split", stop_after_epoch=1, **bits), data=data)
    assert first.stopped == "stop_after_epoch" and len(first.history) == 1
    resumed = vitlab.train(tiny_config(tmp_path, "ignored", resume=str(tmp_path / "split"), **bits), data=data)
    assert resumed.run_dir == tmp_path / "split" and resumed.stopped == "completed"
    _assert_same_checkpoint(straight.run_dir / "last", resumed.run_dir / "last")
    assert _metrics(straight.run_dir) == _metrics(resumed.run_dir)
    assert len(_metrics(resumed.run_dir)) == 2
    if model:  # the EMA model carries the trained model's BatchNorm statistics, not its initial ones
        weights = load_safetensors(straight.run_dir / "last/model.safetensors")
        ema = load_safetensors(straight.run_dir / "last/ema.safetensors")
        assert torch.equal(ema["patch_embed.stem.1.running_mean"], weights["patch_embed.stem.1.running_mean"])
        assert ema["patch_embed.stem.1.num_batches_tracked"] == 8  # 2 epochs of 64 images in batches of 16
    slow = load_safetensors(straight.run_dir / "last/lookahead.safetensors")  # the run ends on the slow weights
    weights = load_safetensors(straight.run_dir / "last/model.safetensors")
    assert all(torch.equal(slow[k], weights[k]) for k in weights if weights[k].is_floating_point())
    # the training actually changed the weights (a resume of nothing would also be "identical")
    before = vitlab.create_model(tiny_config(tmp_path).model, **tiny_config(tmp_path).model_overrides)
    assert not torch.equal(before.head.weight[:4], load_safetensors(straight.run_dir / "last/model.safetensors")
                           ["head.weight"])


def test_crash_while_saving_keeps_previous_checkpoint_and_resumes(tmp_path, monkeypatch):
    data = tiny_splits()
    straight = vitlab.train(tiny_config(tmp_path, "straight", epochs=3), data=data)

    real_save = ckpt.save_safetensors
    calls = {"n": 0}

    def failing_save(path, tensors, metadata=None):
        if str(path).endswith("optimizer.safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second epoch's checkpoint dies half-written
                raise OSError("disk full (simulated)")
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "save_safetensors", failing_save)
    with pytest.raises(OSError, match="simulated"):
        vitlab.train(tiny_config(tmp_path, "crashed", epochs=3), data=data)
    monkeypatch.setattr(ckpt, "save_safetensors", real_save)
    run = tmp_path / "crashed"
    assert json.loads((run / "last/state.json").read_text())["epoch"] == 1
    assert not list(run.glob(".*tmp-*")), "the half-written folder was left behind"
    resumed = vitlab.train(tiny_config(tmp_path, "x", epochs=3, resume=str(run)), data=data)
    assert _metrics(resumed.run_dir) == _metrics(straight.run_dir)
    a = load_safetensors(straight.run_dir / "last/model.safetensors")
    b = load_safetensors(run / "last/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_swap_is_recovered(tmp_path):
    data = tiny_splits()
    result = vitlab.train(tiny_config(tmp_path, "run", epochs=1), data=data)
    run = result.run_dir
    (run / "last").rename(run / ".last.old")  # killed between the two renames of a swap
    (run / "best").rename(run / ".best.old")
    # Readers find the complete checkpoint without touching the run (it may still be training) ...
    assert runs.resolve_checkpoint(run) == run / ".best.old"
    assert (run / ".last.old").exists()
    # ... and resuming finishes the swap.
    runs.recover_run(run)
    assert (run / "best/model.safetensors").is_file() and not (run / ".best.old").exists()
    assert (run / "last/model.safetensors").is_file() and not (run / ".last.old").exists()


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = tiny_splits()
    real = step.soft_cross_entropy
    steps_per_epoch = 64 // 16
    calls = {"n": 0}

    def exploding(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    monkeypatch.setattr(step, "soft_cross_entropy", exploding)
    with pytest.raises(engine.DivergedError, match=r"became nan in epoch 2.*last good checkpoint is .*last"):
        vitlab.train(tiny_config(tmp_path, "nan", epochs=3), data=data)
    state = json.loads((tmp_path / "nan/last/state.json").read_text())
    assert state["epoch"] == 1
    weights = load_safetensors(tmp_path / "nan/last/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_optimizer_state_roundtrips_through_safetensors_and_json():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    structure, tensors = ckpt.flatten_state(opt.state_dict(), "optimizer")
    back = ckpt.unflatten_state(json.loads(json.dumps(structure)), tensors)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(back)
    assert fresh.param_groups[0]["lr"] == 0.1
    for k in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state_dict()["state"][k][name], opt.state_dict()["state"][k][name])


def _digits_folder(root):
    """The built-in digits written as an image folder (8x8 grayscale PNGs): a dataset read through a memory map."""
    from PIL import Image

    from vitlab.data import load_data

    data = load_data("digits")
    for split, ds in (("train", data.train), ("test", data.test)):
        for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
            folder = root / split / ds.classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    return f"folder:{root}"


@pytest.mark.parametrize("data", ["digits", "folder"], ids=["in-memory", "memory-mapped-folder"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, data):
    """SIGKILL a real `vitlab train` process mid-run (after its first checkpoint, at whatever it is doing then),
    resume it, and get the weights and metrics of a run that was never stopped: on the in-memory digits, and on
    the same images as a folder, whose batches are read from the cache's memory map by the prefetch thread."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = _digits_folder(tmp_path / "digits") if data == "folder" else "digits"
    args = [sys.executable, "-m", "vitlab", "train", "--epochs", "8", "--quiet", "--set", "precision=fp32",
            "--set", "threads=1", "--set", "hflip=true", "--set", "dropout=0.1", "--data", spec]
    for key, value in TINY_MODEL.items():
        args += ["--set", f"model_overrides.{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(args + ["--out", str(straight)], env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "metrics.jsonl").is_file() or len((killed / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    assert 2 <= done < 8, done
    subprocess.run([sys.executable, "-m", "vitlab", "train", "--resume", str(killed), "--quiet"], env=env,
                   check=True, capture_output=True, timeout=300)
    a, b = load_safetensors(straight / "last/model.safetensors"), load_safetensors(killed / "last/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(straight) == _metrics(killed)
    if data == "folder":  # the three runs mapped the one cache file of each split, built by the first
        from vitlab.data.cache import cache_files

        assert sorted(size for _, size in cache_files()) == [128 + 359 * 64, 128 + 1438 * 64]
