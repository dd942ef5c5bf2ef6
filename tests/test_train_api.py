"""TrainConfig and recipes, AdamW groups and the schedule, metrics, and the train/eval/plot/recipes commands."""

from __future__ import annotations

import io
import json
import logging
import math
import time

import pytest
import torch
from _train_fixtures import TINY_MODEL, tiny_config, tiny_folder, tiny_splits

from vitlab._files import load_safetensors

import vitlab
import vitlab.training
from vitlab.cli import main
from vitlab.config import TrainConfig, load_train_config, to_dict
from vitlab.errors import ConfigError
from vitlab.evaluation import evaluate_model
from vitlab.metrics import ClassificationTally
from vitlab.training.optim import lr_at, param_groups
from vitlab.training.progress import ProgressBar

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- config and recipes
@pytest.mark.parametrize("changes, field", [
    (dict(batch_size=100, accum_steps=3), "batch_size"), (dict(precision="fp8"), "precision"),
    (dict(lr=0.0), "lr"), (dict(min_lr=1.0, lr=0.1), "min_lr"), (dict(ema_decay=1.5), "ema_decay"),
    (dict(device="tpu"), "device"), (dict(random_resized_crop=[0.9, 0.1]), "random_resized_crop"),
    (dict(label_smoothing=1.0), "label_smoothing"), (dict(epochs=0), "epochs"), (dict(lookahead=1), "lookahead"),
    (dict(lr_decay="step"), "lr_decay")])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**changes)


def test_unknown_override_suggests_the_field():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_train_config(None, ["batchsize=3"])


def test_recipe_then_keywords_then_overrides():
    c = load_train_config("mnist", ["lr=1e-4", "model_overrides.depth=2"], epochs=3, model=None)
    assert (c.recipe, c.model, c.epochs, c.lr, c.model_overrides) == ("mnist", "vit-mnist-hybrid", 3, 1e-4, {"depth": 2})
    assert c.crop_padding == 2  # from the recipe file


def test_every_recipe_builds_and_its_model_exists():
    rows = vitlab.list_recipes()
    names = {r["name"] for r in rows}
    assert {"digits", "mnist", "cifar10-cpu", "cifar10-gpu", "fruits", "tintn-cifar10"} <= names
    for row in rows:
        config = load_train_config(row["name"])
        vitlab.get_config(config.model, **config.model_overrides)


def test_default_config_is_the_digits_recipe():
    recipe = load_train_config("digits")
    assert {k: v for k, v in to_dict(recipe).items() if k != "recipe"} == \
        {k: v for k, v in to_dict(TrainConfig()).items() if k != "recipe"}


def test_the_tintn_recipe_trains_at_a_constant_learning_rate():
    from vitlab.training.step import make_train_step

    config = load_train_config("tintn-cifar10")
    model = vitlab.create_model(config.model)
    step = make_train_step(model, config, device=torch.device("cpu"), precision="fp32", steps_per_epoch=195,
                           num_classes=10, image_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)  # 50,000 / 256
    lrs = set()
    for _ in range(config.epochs * 195):  # the whole run's schedule, as the step sets it
        lrs.update(group["lr"] for group in step.optimizer.param_groups)
        step.scheduler.step()
    assert lrs == {0.01}


# ---------------------------------------------------------------- optimiser and schedule
def test_no_weight_decay_on_norms_biases_positions_and_class_token():
    model = vitlab.create_model("vit-digits-p2", layer_scale=0.1, **TINY_MODEL)
    groups = param_groups(model, weight_decay=0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias",
            "blocks.0.ls1.gamma", "norm.weight", "patch_embed.proj.bias"} <= no_decay
    assert decay == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                     "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"}


def test_layer_decay_scales():
    model = vitlab.create_model("vit-digits-p2", **{**TINY_MODEL, "depth": 2})
    scales = {n: g["lr_scale"] for g in param_groups(model, weight_decay=0.05, layer_decay=0.5) for n in g["names"]}
    assert scales["head.weight"] == 1.0 and scales["blocks.1.mlp.fc1.weight"] == 0.5
    assert scales["blocks.0.mlp.fc1.weight"] == 0.25 and scales["pos_embed"] == 0.125


def test_warmup_then_cosine():
    kw = dict(total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)


def test_linear_decay_is_airbench94s_triangle_after_the_warmup():
    kw = dict(total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1, decay="linear")
    assert lr_at(9, **kw) == pytest.approx(1.0) and lr_at(35, **kw) == pytest.approx(0.775)  # a quarter down
    assert lr_at(110, **kw) == pytest.approx(0.1)
    # airbench94's triangle(steps, start, end, peak) past its peak: 1 at int(peak * steps), `end` at `steps`
    steps, end, peak = 391 * 10, 0.07, 0.23
    top = int(peak * steps)
    triangle = [1 + (end - 1) * (x - top) / (steps - top) for x in range(top, steps + 1)]
    ours = [lr_at(x, total_steps=steps, warmup_steps=top, lr=1.0, min_lr=end, decay="linear")
            for x in range(top, steps + 1)]
    assert ours == pytest.approx(triangle, abs=1e-12)


def test_the_config_picks_the_decay_of_the_run():
    from vitlab.training.step import make_train_step

    model = vitlab.create_model("vit-digits-p2", **TINY_MODEL)
    lrs = {}
    for decay in ("cosine", "linear"):
        step = make_train_step(model, TrainConfig(lr=1.0, min_lr=0.1, epochs=11, warmup_epochs=1, lr_decay=decay),
                               device=torch.device("cpu"), precision="fp32", steps_per_epoch=10, num_classes=10,
                               image_size=(8, 8), mean=(0.5,), std=(0.5,))
        for _ in range(35):
            step.scheduler.step()
        lrs[decay] = [group["lr"] for group in step.optimizer.param_groups]
    assert lrs["linear"] == pytest.approx([0.775] * 2)  # (the groups with weight decay and without)
    assert lrs["cosine"] == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi / 4))] * 2)


# ---------------------------------------------------------------- metrics
def test_tally_top1_top5_and_confusion():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0.0, 9, 1, 2, 3, 4, 5], [9.0, 0, 1, 2, 3, 4, 5],
                           [1.0, 2, 3, 4, 5, 6, 0]])
    labels = torch.tensor([0, 5, 1, 1])  # right; wrong, 3rd; wrong, last; wrong, 5th
    tally = ClassificationTally(7, torch.device("cpu"))
    tally.update(logits, labels)
    r = tally.result()
    assert (r["top1"], r["top5"], r["count"]) == (0.25, 0.75, 4)
    assert r["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert r["confusion"][0][0] == 1 and r["confusion"][5][1] == 1 and r["confusion"][1][0] == 1
    assert r["confusion"][1][5] == 1 and sum(map(sum, r["confusion"])) == 4
    assert (r["per_class"]["0"], r["per_class"]["1"], r["per_class"]["5"]) == (1.0, 0.0, 0.0)


def test_progress_bar_is_quiet_off_a_terminal():
    quiet, loud = io.StringIO(), io.StringIO()
    for stream, force in ((quiet, False), (loud, True)):
        bar = ProgressBar(stream, force=force)
        bar.start(1, 3, 10)
        bar.update(5, 0.25, 1234.0)
        bar.end()
    assert quiet.getvalue() == ""
    assert "5/10 loss 0.2500 1,234 img/s ETA" in loud.getvalue()


# ---------------------------------------------------------------- training behaviours
def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^TrainConfig.precision='fp16' needs a CUDA GPU \(device is cpu\)"):
        vitlab.train(tiny_config(tmp_path, precision="fp16"), data=tiny_splits())


def test_one_rule_decides_the_precision_for_training_evaluation_and_bench(monkeypatch):
    """auto is bf16 exactly where the CPU has native bf16 matmul; fp16 off a GPU and unknown names are refused
    the same way by every caller (bench warned where training refused)."""
    from vitlab import _device, bench

    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(_device, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert _device.resolve_precision("auto", "cpu") == _device.resolve_precision(None, "cpu") == expected
    assert _device.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="^precision='fp16' needs a CUDA GPU"):
        bench.benchmark("vit-cifar-tiny-p4", batch=2, precision="fp16", repeats=1)
    with pytest.raises(ConfigError, match="^precision='fp8' is not one of auto, fp32, bf16, fp16$"):
        bench.benchmark("vit-cifar-tiny-p4", batch=2, precision="fp8", repeats=1)
    with pytest.raises(ConfigError, match="^precision='fp16' needs a CUDA GPU"):
        vitlab.evaluate("no-such-run", precision="fp16", device="cpu")  # refused before anything is read


def test_bf16_autocast_on_cpu_trains(tmp_path):
    result = vitlab.train(tiny_config(tmp_path, precision="bf16", epochs=1), data=tiny_splits())
    assert math.isfinite(result.history[0]["train_loss"]) and result.top1 is not None


def test_time_limit_stops_cleanly_and_the_run_resumes(tmp_path):
    result = vitlab.train(tiny_config(tmp_path, epochs=3, time_limit_minutes=1e-9), data=tiny_splits())
    assert result.stopped == "time_limit" and len(result.history) == 1
    assert json.loads((result.run_dir / "last/state.json").read_text())["epoch"] == 1


class _VirtualClock:
    """A clock for the engine and the time-limit planner that moves only when a training step (``step`` seconds)
    or an evaluation (``evaluation`` seconds) runs, so that a time-limited run's plan is exact arithmetic."""

    def __init__(self, monkeypatch, *, step: float, evaluation: float, slow_steps: dict[int, float] | None = None):
        import types

        import vitlab.training.budget as budget
        import vitlab.training.engine as engine
        from vitlab.training.step import TrainStep

        self.now, self.steps = 0.0, 0
        fake_time = types.SimpleNamespace(perf_counter=lambda: self.now, strftime=time.strftime, gmtime=time.gmtime)
        monkeypatch.setattr(engine, "time", fake_time)
        monkeypatch.setattr(budget, "time", fake_time)
        train_step, evaluate = TrainStep.__call__, engine.evaluate_views

        def timed_step(step_self, *args, **kwargs):
            self.steps += 1
            self.now += (slow_steps or {}).get(self.steps, step)
            return train_step(step_self, *args, **kwargs)

        def timed_evaluation(*args, **kwargs):
            self.now += evaluation
            return evaluate(*args, **kwargs)

        monkeypatch.setattr(TrainStep, "__call__", timed_step)
        monkeypatch.setattr(engine, "evaluate_views", timed_evaluation)


def test_time_limit_plans_in_steps_ends_the_cosine_with_the_time_and_cuts_the_last_epoch(tmp_path, monkeypatch):
    # 20 steps an epoch of 1 s each, an evaluation of 10 s after every epoch, 90 s: a plan in whole epochs fits 2
    # (3 would cost 3 x (1.05 x 20 + 10) = 93 s) and ends at 60 s. In steps, after epoch 2 (50 s) the plan ends
    # with epoch 3 (20 steps and the final evaluation: 31 s of the 40 left) if epoch 2 is not evaluated, one step
    # sooner if it is: it is not. After epoch 3 (70 s, the plan having grown to 69 steps as the evaluation's time
    # freed) the same holds for epoch 3's: the run trains 9 steps of epoch 4 in its place and ends at 89 s
    clock = _VirtualClock(monkeypatch, step=1.0, evaluation=10.0)
    result = vitlab.train(tiny_config(tmp_path, epochs=10, time_limit_minutes=1.5, min_lr=1e-5),
                          data=tiny_splits(n_train=320))
    state = json.loads((result.run_dir / "last/state.json").read_text())
    steps = [row["steps"] for row in result.history]
    assert result.stopped == "completed" and clock.now <= 90.0
    assert steps == [20, 20, 20, 9]  # the last epoch ends with the plan
    assert sum(steps) == clock.steps == state["scheduler"]["step"] == state["scheduler"]["total_steps"] == 69
    assert state["planned_epochs"] == state["epoch"] == 4
    assert 90.0 - clock.now < 1.05 * 1.0 + 1.0  # less than a step unused
    assert result.history[-1]["lr"] == pytest.approx(1e-5)  # the cosine came down with the time
    assert [row["top1"] is not None for row in result.history] == [True, False, False, True]
    assert result.history[-1]["images_per_s"] == pytest.approx(16.0)  # its own steps: 16 images a virtual second


def test_time_limit_does_not_evaluate_an_epoch_one_step_before_the_final_evaluation(tmp_path, monkeypatch):
    # 72 s: after epoch 2 (50 s) the plan with that epoch's 10 s evaluation has room for 1 step of epoch 3 and the
    # final evaluation (an evaluation, 1 step, another evaluation); without it, 11 steps fit and the run still
    # ends inside epoch 3, so epoch 2 is not evaluated and the last evaluation falls on the last step
    clock = _VirtualClock(monkeypatch, step=1.0, evaluation=10.0)
    result = vitlab.train(tiny_config(tmp_path, epochs=10, time_limit_minutes=1.2), data=tiny_splits(n_train=320))
    assert [row["steps"] for row in result.history] == [20, 20, 11] and clock.steps == 51
    assert [row["top1"] is not None for row in result.history] == [True, False, True]
    assert result.stopped == "completed" and 71.0 <= clock.now <= 72.0
    state = json.loads((result.run_dir / "last/state.json").read_text())
    assert state["scheduler"]["step"] == state["scheduler"]["total_steps"] == 51


def test_time_limit_says_when_epochs_ends_the_run_before_the_time_does(tmp_path, monkeypatch, caplog):
    # 90 s: the first plan (after epoch 1's evaluation) finds room for 60 steps; epochs=2 caps the run at 40: one
    # line says so, once
    _VirtualClock(monkeypatch, step=1.0, evaluation=10.0)
    with caplog.at_level(logging.INFO, logger="vitlab.training"):
        result = vitlab.train(tiny_config(tmp_path, epochs=2, time_limit_minutes=1.5), data=tiny_splits(n_train=320))
    assert result.stopped == "completed" and [row["steps"] for row in result.history] == [20, 20]
    told = [r.getMessage() for r in caplog.records if "would fit" in r.getMessage()]
    assert told == ["time limit 1.5 min: 3.0 epochs would fit, epochs=2 ends the run sooner (raise epochs to use "
                    "the time)"]


def test_time_limit_stops_inside_an_epoch_when_a_stall_leaves_no_time(tmp_path, monkeypatch):
    # the 8th step stalls for 100 s of a 60 s limit: the run stops at the next quarter of the epoch (step 10),
    # evaluates and saves that part of the epoch, and can be resumed
    clock = _VirtualClock(monkeypatch, step=1.0, evaluation=10.0, slow_steps={8: 100.0})
    result = vitlab.train(tiny_config(tmp_path, epochs=10, time_limit_minutes=1.0), data=tiny_splits(n_train=320))
    assert result.stopped == "time_limit" and clock.steps == 10
    assert [row["steps"] for row in result.history] == [10] and result.top1 is not None
    state = json.loads((result.run_dir / "last/state.json").read_text())
    assert state["epoch"] == 1 and state["scheduler"]["step"] == 10


def test_a_run_the_time_limit_ends_ends_on_lookaheads_slow_weights(tmp_path, monkeypatch):
    # as above with 24 steps an epoch: the stall at step 8 stops the run at the next quarter, step 12, two steps
    # after Lookahead's last update (step 10): the model takes the slow weights before the last evaluation
    from vitlab._files import load_safetensors

    clock = _VirtualClock(monkeypatch, step=1.0, evaluation=10.0, slow_steps={8: 100.0})
    result = vitlab.train(tiny_config(tmp_path, epochs=10, time_limit_minutes=1.0, lookahead=True),
                          data=tiny_splits(n_train=384))
    assert result.stopped == "time_limit" and clock.steps == 12
    weights = load_safetensors(result.run_dir / "last/model.safetensors")
    slow = load_safetensors(result.run_dir / "last/lookahead.safetensors")
    assert all(torch.equal(weights[k], slow[k]) for k in weights if weights[k].is_floating_point())


def test_an_evaluation_that_uses_the_time_left_ends_the_run_on_lookaheads_slow_weights(tmp_path, monkeypatch):
    # 24 steps of 1 s fit the 60 s, but epoch 1's evaluation (the first, which measures what one costs) takes
    # 100 s: the run ends there, four steps after Lookahead's last update (step 20), so it takes the slow weights
    # and scores them as its final evaluation (a second one of 100 s)
    from vitlab._files import load_safetensors
    from vitlab.evaluation import evaluate_model

    clock = _VirtualClock(monkeypatch, step=1.0, evaluation=100.0)
    result = vitlab.train(tiny_config(tmp_path, epochs=10, time_limit_minutes=1.0, lookahead=True),
                          data=tiny_splits(n_train=384))
    assert result.stopped == "time_limit" and clock.steps == 24 and clock.now == 224.0
    weights = load_safetensors(result.run_dir / "last/model.safetensors")
    slow = load_safetensors(result.run_dir / "last/lookahead.safetensors")
    assert all(torch.equal(weights[k], slow[k]) for k in weights if weights[k].is_floating_point())
    final = json.loads((result.run_dir / "eval.json").read_text())
    loaded = vitlab.load(result.run_dir / "last")
    scored = evaluate_model(loaded.model, tiny_splits(n_train=384).test, mean=loaded.preprocess.mean,
                            std=loaded.preprocess.std)  # the saved model, the slow weights
    assert result.top1 == result.history[-1]["top1"] == final["top1"] == scored["top1"]


def test_linear_probe_trains_the_head_only(tmp_path):
    from vitlab._files import load_safetensors

    data = tiny_splits()
    start = vitlab.train(tiny_config(tmp_path, "start", epochs=1), data=data)
    model = vitlab.load(start.run_dir / "last").model
    probe = vitlab.training.fit(tiny_config(tmp_path, "probe", linear_probe=True, epochs=1), data=data, model=model)
    a = load_safetensors(start.run_dir / "last/model.safetensors")
    b = load_safetensors(probe.run_dir / "last/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))
    assert not torch.equal(a["head.weight"], b["head.weight"])


# ---------------------------------------------------------------- the commands
@pytest.fixture
def tiny_data(tmp_path):
    return tiny_folder(tmp_path / "tiny")


def test_cli_train_eval_plot(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", tiny_data.spec, "--out", str(run), "--epochs", "2", "--device", "cpu", "--quiet",
            "--set", "batch_size=16", "--set", "eval_batch_size=16"]
    for key, value in TINY_MODEL.items():
        args += ["--set", f"model_overrides.{key}={value}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert f"test accuracy: {100 * metrics[-1]['top1']:.2f}%" in out and f"run folder: {run}" in out
    assert set(metrics[0]) >= {"epoch", "train_loss", "test_loss", "top1", "top5", "lr", "images_per_s",
                               "wall_time"}
    for name in ("config.yaml", "curves.png", "confusion_matrix.png", "eval.json", "last/model.safetensors",
                 "last/config.json", "best/model.safetensors", "last/optimizer.safetensors", "last/rng.safetensors"):
        assert (run / name).is_file(), name
    assert json.loads((run / "last/config.json").read_text())["labels"] == ["c0", "c1", "c2", "c3"]

    # the run's config.yaml repeats the run (into a new folder)
    again = load_train_config(run / "config.yaml", out=str(tmp_path / "again"))
    assert again.epochs == 2 and again.model_overrides == TINY_MODEL and again.batch_size == 16

    # eval of the best checkpoint reproduces its epoch's test accuracy
    assert main(["eval", str(run), "--data", tiny_data.spec, "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    best_epoch = json.loads((run / "best/state.json").read_text())["best_epoch"]
    assert result["top1"] == metrics[best_epoch - 1]["top1"]
    assert result["test_loss"] == pytest.approx(metrics[best_epoch - 1]["test_loss"], rel=1e-6)
    assert (run / "eval/eval.json").is_file() and (run / "eval/confusion_matrix.png").is_file()

    (run / "curves.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second `train --out` into the same folder is refused; --resume of a finished run changes nothing
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--recipe", "no-such-recipe"]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--data", "digits"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_recipes_lists_them(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "cifar10-cpu:" in out and "tintn-cifar10:" in out and "model vit-mnist-hybrid" in out
    assert "note:     goal 80% reached" in out  # what the number means is said where it is
    mnist = out[out.index("\nmnist:"):out.index("\ntintn-cifar10:")]
    assert mnist.count("    measured: ") == 5 and "capped at AVX2 kernels" in mnist  # runs on two kinds of CPU
    rows = {row["name"]: row["measured"] for row in vitlab.list_recipes()}  # one shape: a list of runs
    assert len(rows["cifar10-cpu"]) == 6 and len(rows["digits"]) == 1 and rows["cifar10-gpu"] == []


def test_init_from_pretrained_resets_head_and_resizes_positions(tmp_path):
    start = vitlab.train(tiny_config(tmp_path, "start", epochs=1), data=tiny_splits())
    other = tiny_splits(classes=3, size=12)  # other classes, other image size
    cfg = tiny_config(tmp_path, "finetune", epochs=1, init=str(start.run_dir / "last"), image_size=12, lr=1e-9,
                      min_lr=0.0, weight_decay=0.0)
    result = vitlab.train(cfg, data=other)
    model = vitlab.load(result.run_dir / "last").model
    assert model.config.num_classes == 3 and model.config.labels == ["c0", "c1", "c2"]
    assert tuple(model.config.image_size) == (12, 12) and model.pos_embed.shape[1] == 1 + 6 * 6
    before = vitlab.load(start.run_dir / "last").model
    # lr ~ 0: the body is the pretrained one
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, before.blocks[0].mlp.fc1.weight, atol=1e-6, rtol=0)


def test_python_api_takes_a_data_spec_string(tmp_path, tiny_data):
    result = vitlab.train(tiny_config(tmp_path, "run", epochs=1, data="digits"), data=tiny_data.spec)
    assert f"data: {tiny_data.spec}" in (result.run_dir / "config.yaml").read_text()


def test_evaluate_holds_out_what_the_run_held_out(tmp_path):
    # A folder without a test split is split by the run's val_fraction and seed, in training and in evaluate.
    import numpy as np
    from PIL import Image

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(60 + 120 * c + rng.integers(-20, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    run = vitlab.train(tiny_config(tmp_path, data=f"folder:{root}", epochs=1, batch_size=8, val_fraction=0.5,
                                   seed=3))
    trained = json.loads((run.run_dir / "eval.json").read_text())
    result = vitlab.evaluate(run.run_dir, f"folder:{root}", device="cpu", precision="fp32")
    assert result["count"] == trained["count"] == 20  # half of 40, not the default tenth
    assert result["confusion"] == trained["confusion"]
    with pytest.raises(vitlab.DataError, match="differ from the model's"):
        (root / "c1").rename(root / "renamed")
        vitlab.evaluate(run.run_dir, f"folder:{root}", device="cpu")


def _view_sensitive_model_and_data():
    """A tiny model with large weights and position embeddings (it tells a view from another: left from right,
    moved from not), 24 test images, and the keyword arguments to score them."""
    from vitlab.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(vitlab.ViTConfig(**{**TINY_MODEL, "image_size": 8, "patch_size": 2,
                                                  "num_classes": 4, "in_channels": 1})).eval()
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    data = tiny_splits(n_test=24)
    return model, data, dict(mean=data.mean, std=data.std, batch_size=10, classes=data.classes)


def test_evaluate_hflip_averages_the_probabilities_of_image_and_mirror():
    import torch.nn.functional as F

    model, data, kwargs = _view_sensitive_model_and_data()
    x = (data.test.images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        probs = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2  # the reference, written apart
    got = evaluate_model(model, data.test, tta_hflip=True, **kwargs)
    assert got["top1"] == (probs.argmax(-1) == data.test.labels).float().mean().item()
    assert got["test_loss"] == pytest.approx(F.nll_loss(probs.log(), data.test.labels).item(), rel=1e-5)
    with torch.no_grad():  # the mirror image is scored differently, so the test can tell the two apart
        assert (model(x).softmax(-1) - model(x.flip(-1)).softmax(-1)).abs().max() > 0.05
    assert evaluate_model(model, data.test, **kwargs)["test_loss"] != pytest.approx(got["test_loss"], rel=1e-5)
    # the mirrored test set scores the same as the test set
    mirrored = data.test.subset(torch.arange(len(data.test)))
    mirrored.images = mirrored.images.flip(-1)
    again = evaluate_model(model, mirrored, tta_hflip=True, **kwargs)
    assert again["confusion"] == got["confusion"] and again["test_loss"] == pytest.approx(got["test_loss"])


def test_tta_views_are_airbench_multi_crop_weights_and_moves():
    from vitlab.evaluation import _view, tta_views

    assert tta_views(False, 0) == {(False, 0): 1.0}
    assert tta_views(True, 0) == {(False, 0): 0.5, (True, 0): 0.5}
    assert tta_views(False, 2) == {(False, 0): 0.5, (False, -2): 0.25, (False, 2): 0.25}
    assert tta_views(True, 1) == {(False, 0): 0.25, (True, 0): 0.25, (False, -1): 0.125, (True, -1): 0.125,
                                  (False, 1): 0.125, (True, 1): 0.125}
    for bad in (-1, 1.5, True):
        with pytest.raises(vitlab.ConfigError, match="tta_shift"):
            tta_views(True, bad)
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    down = _view(x, (False, 2))  # moved 2 px down and right, the border reflected
    assert torch.equal(down[..., 2:, 2:], x[..., :-2, :-2])
    assert torch.equal(down[..., 0, 2:], x[..., 2, :-2]) and torch.equal(down[..., 2:, 1], x[..., :-2, 1])
    up = _view(x, (True, -1))  # mirrored, then moved 1 px up and left
    assert torch.equal(up[..., :-1, :-1], x.flip(-1)[..., 1:, 1:])
    assert torch.equal(up[..., -1, :-1], x.flip(-1)[..., -2, 1:])


def test_evaluate_with_tta_shift_averages_the_moved_views_as_written_apart():
    import numpy as np
    import torch.nn.functional as F

    from vitlab.evaluation import evaluate_views, tta_views

    model, data, kwargs = _view_sensitive_model_and_data()
    images = data.test.images.numpy()

    def moved(a, d):  # numpy's reflection, moved d px down and right
        padded = np.pad(a, [(0, 0), (0, 0), (abs(d), abs(d)), (abs(d), abs(d))], mode="reflect")
        return padded[..., abs(d) - d:abs(d) - d + 8, abs(d) - d:abs(d) - d + 8]

    def probs(a):
        with torch.no_grad():
            return model((torch.from_numpy(np.ascontiguousarray(a)).float() / 255 - 0.5) / 0.25).softmax(-1)

    mirror = images[..., ::-1]
    reference = (0.25 * (probs(images) + probs(mirror))
                 + 0.125 * sum(probs(moved(a, d)) for a in (images, mirror) for d in (-2, 2)))
    got = evaluate_model(model, data.test, tta_hflip=True, tta_shift=2, **kwargs)
    assert got["views"] == 6
    assert got["top1"] == (reference.argmax(-1) == data.test.labels).float().mean().item()
    assert got["test_loss"] == pytest.approx(F.nll_loss(reference.log(), data.test.labels).item(), rel=1e-5)
    flip_only = evaluate_model(model, data.test, tta_hflip=True, **kwargs)
    assert flip_only["test_loss"] != pytest.approx(got["test_loss"], rel=1e-4)  # the moved views count
    both = evaluate_views(model, data.test, [tta_views(True, 0), tta_views(True, 2)], **kwargs)  # one pass
    assert [r["test_loss"] for r in both] == pytest.approx([flip_only["test_loss"], got["test_loss"]], rel=1e-6)
    with pytest.raises(vitlab.ConfigError, match=r"tta_shift=8 must be smaller than the image side \(8 px\)"):
        evaluate_model(model, data.test, tta_shift=8, **kwargs)


def test_a_run_with_tta_shift_curves_the_flip_views_and_scores_its_final_model_with_the_moved_ones(tmp_path, tiny_data,
                                                                                                   capsys):
    config = tiny_config(tmp_path, epochs=2, tta_hflip=True, tta_shift=1)
    result = vitlab.train(config, data=tiny_data.spec)
    model = vitlab.load(result.run_dir / "last").model
    kwargs = dict(mean=tiny_data.mean, std=tiny_data.std, batch_size=512, classes=tiny_data.classes)
    flips = evaluate_model(model, tiny_data.test, tta_hflip=True, **kwargs)
    full = evaluate_model(model, tiny_data.test, tta_hflip=True, tta_shift=1, **kwargs)
    assert result.history[-1]["test_loss"] == pytest.approx(flips["test_loss"], rel=1e-6)  # the curve: flips
    assert full["test_loss"] != pytest.approx(flips["test_loss"], rel=1e-6)  # the two can be told apart
    saved = json.loads((result.run_dir / "eval.json").read_text())
    assert saved["views"] == 6 and saved["test_loss"] == pytest.approx(full["test_loss"], rel=1e-6)
    assert result.top1 == saved["top1"] == full["top1"]
    eval_cli = ["eval", str(result.run_dir / "last"), "--data", tiny_data.spec, "--device", "cpu", "--precision",
                "fp32", "--json"]
    assert main(eval_cli) == 0  # as the run's final evaluation did
    assert json.loads(capsys.readouterr().out)["test_loss"] == pytest.approx(full["test_loss"], rel=1e-6)
    assert main(eval_cli + ["--tta-shift", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["test_loss"] == pytest.approx(flips["test_loss"], rel=1e-6)
    assert main(eval_cli + ["--tta-shift", "99"]) == 2
    assert "tta_shift=99 must be smaller than the image side" in capsys.readouterr().err
    with pytest.raises(vitlab.ConfigError, match=r"TrainConfig.tta_shift=-1 must be an integer >= 0"):
        tiny_config(tmp_path, tta_shift=-1)


def test_whiten_stem_starts_a_fresh_run_from_the_whitened_first_convolution(tmp_path, caplog):
    from vitlab.data import Preprocess
    from vitlab.models import create_model, get_config

    data = tiny_splits(n_train=80)
    overrides = dict(TINY_MODEL, patch_embed="conv")  # patch 2 over 1 channel: 4-pixel patches, 16 filters
    config = tiny_config(tmp_path, epochs=1, lr=1e-12, min_lr=0.0, weight_decay=0.0, whiten_stem=True,
                         model_overrides=overrides)
    with caplog.at_level(logging.INFO, logger="vitlab.training"):
        result = vitlab.train(config, data=data)
    assert "whiten_stem: 8 of the first convolution's 16 filters whitened on the patches of 80 training images" \
        in caplog.text
    torch.manual_seed(0)  # the run's initial model, whitened apart on the same images
    expected = create_model(get_config("vit-digits-p2", **overrides, num_classes=4, labels=data.classes))
    pre = vitlab.load(result.run_dir / "last").preprocess
    expected.patch_embed.whiten_(Preprocess(image_size=pre.image_size, channels=1, mean=pre.mean,
                                            std=pre.std)(data.train.images))
    trained = load_safetensors(result.run_dir / "last/model.safetensors")["patch_embed.proj.weight"]
    torch.testing.assert_close(trained, expected.patch_embed.proj.weight.detach(), rtol=0, atol=1e-6)  # lr 1e-12
    assert trained[:8].abs().max() > 5 * trained[8:].abs().max()  # whitened filters are large, the rest as before
    for bad, message in ((dict(init="some.safetensors"), "would overwrite the pretrained first convolution"),
                         (dict(whiten_stem="yes"), "must be true or false")):
        with pytest.raises(vitlab.ConfigError, match=message):
            tiny_config(tmp_path, **{"whiten_stem": True, **bad})


def test_time_limited_run_evaluates_every_nth_epoch_its_first_and_its_last(tmp_path):
    result = vitlab.train(tiny_config(tmp_path, epochs=4, eval_every=3, time_limit_minutes=1000), data=tiny_splits())
    assert [r["top1"] is not None for r in result.history] == [True, False, True, True]
    assert result.stopped == "completed" and result.history[-1]["lr"] == pytest.approx(1e-5)


def test_eval_scores_as_the_run_did_with_tta_hflip(tmp_path, tiny_data, capsys):
    result = vitlab.train(tiny_config(tmp_path, epochs=1, tta_hflip=True), data=tiny_data.spec)
    assert main(["eval", str(result.run_dir / "last"), "--data", tiny_data.spec, "--device", "cpu", "--precision", "fp32",
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test_loss"] == pytest.approx(result.history[0]["test_loss"], rel=1e-6)
    assert main(["eval", str(result.run_dir / "last"), "--data", tiny_data.spec, "--device", "cpu", "--precision",
                 "fp32", "--json", "--no-tta-hflip"]) == 0
    plain = json.loads(capsys.readouterr().out)
    model = vitlab.load(result.run_dir / "last").model
    alone = evaluate_model(model, tiny_data.test, mean=tiny_data.mean, std=tiny_data.std, batch_size=512,
                     classes=tiny_data.classes)
    assert plain["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-6)
    assert plain["test_loss"] != pytest.approx(scored["test_loss"], rel=1e-6)


def test_tensorboard_events_hold_the_metrics(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = vitlab.train(tiny_config(tmp_path, epochs=2), data=tiny_splits())
    events = event_accumulator.EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "test_loss", "top1", "top5", "lr", "images_per_s", "wall_time"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2], key
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in result.history], rel=1e-6), key


def test_finetuning_normalises_as_the_pretrained_weights_were(tmp_path):
    data = tiny_splits()
    start = vitlab.train(tiny_config(tmp_path, "start", epochs=1), data=data)
    pre = json.loads((start.run_dir / "last/preprocess.json").read_text())
    pre.update(mean=[0.3], std=[0.2])  # as if pretrained on other data
    (start.run_dir / "last/preprocess.json").write_text(json.dumps(pre))
    tuned = vitlab.train(tiny_config(tmp_path, "tuned", epochs=1, init=str(start.run_dir / "last")), data=data)
    assert json.loads((tuned.run_dir / "last/preprocess.json").read_text())["mean"] == [0.3]
    own = vitlab.train(tiny_config(tmp_path, "own", epochs=1, init=str(start.run_dir / "last"), normalize="data"),
                       data=data)
    assert json.loads((own.run_dir / "last/preprocess.json").read_text())["mean"] == [0.5]  # tiny_splits' own
    with pytest.raises(ConfigError, match="normalize='imagenet' is for RGB images"):
        vitlab.train(tiny_config(tmp_path, "rgb", epochs=1, normalize="imagenet"), data=data)
    with pytest.raises(ConfigError, match="TrainConfig.normalize='mine' is not one of"):
        tiny_config(tmp_path, normalize="mine")


# ---------------------------------------------------------------- defects found by trying vitlab as a new user
def test_fit_starts_from_the_weights_that_init_names(tmp_path):
    start = vitlab.train(tiny_config(tmp_path, "start", epochs=1), data=tiny_splits())
    other = tiny_splits(classes=3)
    tuned = vitlab.train(tiny_config(tmp_path, "tuned", epochs=1, init=str(start.run_dir / "last"), lr=1e-9,
                                     min_lr=0.0, weight_decay=0.0), data=other)
    before, after = vitlab.load(start.run_dir / "last").model, vitlab.load(tuned.run_dir / "last").model
    assert after.config.labels == ["c0", "c1", "c2"]  # a new head for the new classes ...
    # ... on the pretrained body (lr ~ 0), not on a fresh preset's
    torch.testing.assert_close(after.blocks[0].mlp.fc1.weight, before.blocks[0].mlp.fc1.weight, atol=1e-6, rtol=0)


def test_resume_applies_the_fields_the_caller_passes_even_at_their_defaults(tmp_path):
    data = tiny_splits()
    assert TrainConfig().epochs == 30
    first = vitlab.train(tiny_config(tmp_path, "run", epochs=50, stop_after_epoch=1), data=data)
    resumed = vitlab.train(resume=str(first.run_dir), epochs=30, stop_after_epoch=2, data=data)
    state = json.loads((first.run_dir / "last/state.json").read_text())
    assert resumed.stopped == "stop_after_epoch" and state["epoch"] == 2
    assert state["planned_epochs"] == 30 and state["scheduler"]["total_steps"] == 30 * 4
    assert "epochs: 30" in (first.run_dir / "config.yaml").read_text()


def test_state_json_says_which_weights_best_holds_on_every_epoch(tmp_path, monkeypatch):
    import vitlab.training.engine as engine

    real, calls = engine.evaluate_views, []

    def scripted(model, dataset, view_sets, **kwargs):  # epoch 1: the EMA wins; epoch 2: neither improves on it
        results = real(model, dataset, view_sets, **kwargs)
        calls.append(model)
        results[0]["top1"] = [0.5, 0.7, 0.6, 0.6][len(calls) - 1]  # model, EMA, model, EMA
        return results

    monkeypatch.setattr(engine, "evaluate_views", scripted)
    result = vitlab.train(tiny_config(tmp_path, epochs=2, ema_decay=0.9), data=tiny_splits())
    assert (result.best_top1, result.best_epoch) == (0.7, 1)
    for name in ("last", "best"):
        state = json.loads((result.run_dir / name / "state.json").read_text())
        assert (state["best_source"], state["best_epoch"]) == ("ema", 1), name
    ema_epoch1 = load_safetensors(result.run_dir / "best/model.safetensors")
    assert not torch.equal(ema_epoch1["head.weight"],
                           load_safetensors(result.run_dir / "last/ema.safetensors")["head.weight"])  # epoch 2 moved on


def test_cli_names_an_output_path_that_cannot_be_a_folder(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    train = ["train", "--epochs", "1", "--quiet", "--set", "threads=1"]
    for out, why in ((a_file, "exists and is not a folder"), ("/proc/vitlab-run", "cannot create this folder")):
        assert main(train + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vitlab: error: TrainConfig.out {out}: {why}") and err.count("\n") == 1, err
    run = vitlab.train(tiny_config(tmp_path, "run", epochs=1, data="digits"), data=tiny_splits()).run_dir
    assert main(["eval", str(run), "--data", "digits", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitlab: error: --out {a_file}: exists and is not a folder") and err.count("\n") == 1
    assert a_file.read_text() == "keep me"


def test_vitlab_train_is_a_function_with_its_real_signature():
    import inspect

    assert inspect.isfunction(vitlab.train) and vitlab.train.__module__ == "vitlab.api.runs"
    assert list(inspect.signature(vitlab.train).parameters) == ["config", "data", "progress", "devices", "changes"]
    assert vitlab.evaluate is not vitlab.evaluate_model  # a checkpoint on a data spec; a model on a dataset split
    assert list(inspect.signature(vitlab.evaluate_model).parameters)[:2] == ["model", "dataset"]


def test_normalize_clip_is_openai_clips_mean_and_std(tmp_path):
    data = tiny_splits(channels=3)
    result = vitlab.train(tiny_config(tmp_path, epochs=1, normalize="clip",
                                      model_overrides=dict(TINY_MODEL, in_channels=3)), data=data)
    pre = json.loads((result.run_dir / "last/preprocess.json").read_text())
    assert pre["mean"] == [0.48145466, 0.4578275, 0.40821073] and pre["std"] == [0.26862954, 0.26130258, 0.27577711]
