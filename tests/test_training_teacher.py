"""The CNN teacher (airbench94's network and recipe) and DeiT's hard distillation through the distillation token."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _train_fixtures import TINY_MODEL, tiny_config, tiny_splits

import vitlab
from vitlab._files import load_safetensors
from vitlab.config import TrainConfig
from vitlab.errors import ConfigError
from vitlab.models import create_model, get_config
from vitlab.models.cnn import AirbenchNet
from vitlab.training.step import Distillation, TrainStep, soft_cross_entropy
from vitlab.training.teacher import make_teacher, teacher_lr_factor, teacher_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

DEIT = dict(TINY_MODEL, distillation_token=True, distillation_head=True, patch_size=4)


def test_airbench_net_has_airbench94s_layers_and_parameter_count():
    net = AirbenchNet()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    # airbench94's nn.Sequential: whitening conv 0, GELU 1, ConvGroups 2-4, pool 5, flatten 6, head 7, scale 8
    assert shapes["0.weight"] == (24, 3, 2, 2) and shapes["0.bias"] == (24,)
    assert shapes["2.conv1.weight"] == (64, 24, 3, 3) and shapes["2.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["3.conv1.weight"] == (256, 64, 3, 3) and shapes["4.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["7.weight"] == (10, 256) and "7.bias" not in shapes
    # 312 + (13824 + 36864 + 2*128) + (147456 + 589824 + 2*512) + (2*589824 + 2*512) + 2560
    assert net.num_parameters() == 1_972_792
    # frozen: the whitening filters (24 x 12) and every BatchNorm scale (64 + 64 + 4 x 256)
    assert net.num_parameters(trainable_only=True) == 1_972_792 - 288 - 1152
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)  # the smallest size its pools allow
    # airbench's convolutions start with a Dirac identity on their first in_channels filters
    w = net[2].conv2.weight
    assert torch.equal(w[:64, :, 1, 1], torch.eye(64)) and w[:64, :, 0].abs().sum() == 0


def test_airbench_whitening_decorrelates_the_patches():
    net = AirbenchNet()
    images = torch.rand(64, 3, 16, 16) * torch.tensor([1.0, 0.5, 2.0])[:, None, None]
    done, filters = net.whiten_(images)
    assert (done, filters) == (24, 24)
    patches = F.unfold(images, 2).transpose(1, 2).reshape(-1, 12).double()
    out = patches @ net[0].weight.detach().reshape(24, 12).double().T
    cov = out.T @ out / len(out)
    first = cov[::2, ::2]  # filters 2i and 2i+1 are v and -v
    values = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    assert torch.allclose(first.diagonal(), values / (values + 5e-4), atol=1e-6)
    assert (first - torch.diag(first.diagonal())).abs().max() < 1e-6
    assert torch.allclose(cov[1::2, 1::2], first) and not net[0].weight.requires_grad


def test_teacher_learning_rate_is_clean_airbenchs_triangle():
    total = 50  # warmup int(0.2 * 50) = 10 steps from 0.2 to 1, then a straight line to 0
    assert teacher_lr_factor(0, total) == pytest.approx(0.2)
    assert teacher_lr_factor(5, total) == pytest.approx(0.6)
    assert teacher_lr_factor(10, total) == pytest.approx(1.0)
    assert teacher_lr_factor(30, total) == pytest.approx(0.5)
    assert teacher_lr_factor(49, total) == pytest.approx(1 / 40)


def test_teacher_optimizer_decouples_rate_and_decay_as_airbench():
    net = AirbenchNet()
    opt = teacher_optimizer(net, batch_size=1000)
    biases, others = opt.param_groups
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    assert others["lr"] == pytest.approx(10.0 / kilostep) and biases["lr"] == pytest.approx(64 * 10.0 / kilostep)
    for group in (biases, others):  # PyTorch's decay is lr * weight_decay per step: 0.015 per 1024 images
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.015 * 1000 / kilostep)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.85
    assert len(biases["params"]) == 6 and all(p.ndim == 1 for p in biases["params"])  # the 6 BatchNorm biases
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == net.num_parameters(trainable_only=True)


def test_teacher_needs_16_pixels():
    with pytest.raises(ConfigError, match=r"teacher='airbench94' needs images of at least 16 px.*\(8, 8\)"):
        make_teacher("airbench94", in_channels=1, num_classes=4, image_size=(8, 8))


def test_both_heads_are_the_two_halves_of_deits_logits():
    model = create_model(get_config("vit-digits-p2", **DEIT, num_classes=4, image_size=16)).eval()
    x = torch.randn(3, 1, 16, 16)
    cls_logits, dist_logits = model(x, both_heads=True)
    assert torch.allclose((cls_logits + dist_logits) / 2, model(x), atol=1e-6)
    assert not torch.allclose(cls_logits, dist_logits)
    plain = create_model(get_config("vit-digits-p2", **TINY_MODEL, num_classes=4))
    with pytest.raises(ValueError, match="both_heads=True needs a distillation head"):
        plain(torch.randn(1, 1, 8, 8), both_heads=True)


def test_distillation_loss_is_deits_hard_loss():
    torch.manual_seed(0)
    model = create_model(get_config("vit-digits-p2", **DEIT, num_classes=4, image_size=16))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4)).eval()
    inputs, targets = torch.randn(6, 1, 16, 16), torch.softmax(torch.randn(6, 4), -1)
    heads = model(inputs, both_heads=True)
    loss = Distillation(teacher).loss(heads, inputs, targets, torch.device("cpu"), "fp32")
    teacher_class = teacher(inputs).argmax(-1)
    expected = 0.5 * soft_cross_entropy(heads[0], targets) + 0.5 * F.cross_entropy(heads[1], teacher_class)
    assert torch.allclose(loss, expected)
    # the distillation head learns the teacher's classes, not the labels: its gradient comes from that term only
    loss.backward()
    grad = model.head_dist.weight.grad.clone()
    model.zero_grad()
    (0.5 * F.cross_entropy(model(inputs, both_heads=True)[1], teacher_class)).backward()
    assert torch.allclose(model.head_dist.weight.grad, grad, atol=1e-7)


def test_train_step_with_a_teacher_trains_on_deits_loss():
    from vitlab.training.step import make_train_step

    torch.manual_seed(0)
    model = create_model(get_config("vit-digits-p2", **DEIT, num_classes=4, image_size=16))
    config = TrainConfig(data="tiny", epochs=1, label_smoothing=0.0, clip_grad=None)
    step = make_train_step(model, config, device=torch.device("cpu"), precision="fp32", steps_per_epoch=1,
                           num_classes=4, image_size=(16, 16), mean=(0.5,), std=(0.25,))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4)).eval()
    step.distillation = Distillation(teacher)
    images, labels = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), torch.arange(8) % 4
    inputs = (images.float() / 255 - 0.5) / 0.25  # no augmentation in this config: the step's inputs
    heads = model(inputs, both_heads=True)
    expected = 0.5 * F.cross_entropy(heads[0], labels) + 0.5 * F.cross_entropy(heads[1], teacher(inputs).argmax(-1))
    assert isinstance(step, TrainStep)
    loss_sum = step([(images, labels)])
    assert float(loss_sum) == pytest.approx(8 * float(expected.detach()), rel=1e-5)


def test_fit_trains_the_teacher_first_and_saves_it(tmp_path):
    data = tiny_splits(n_train=96, size=16)
    result = vitlab.train(tiny_config(tmp_path, model_overrides=DEIT, image_size=16, teacher="airbench94",
                                      teacher_epochs=40),
                          data=data)
    info = json.loads((result.run_dir / "teacher/teacher.json").read_text())
    assert info["model"] == "airbench94" and info["epochs"] == 40 and info["steps"] == 40  # 96 images: one batch
    assert info["parameters"] == 1_963_304 - 6 * 256  # 1 channel, 4 classes: 256 x 6 fewer head weights
    assert info["top1"] >= 0.9  # brightness says the class: the teacher learns it in 40 steps
    assert result.wall_time >= info["seconds"]  # its time counts against the run's
    weights = load_safetensors(result.run_dir / "teacher/model.safetensors")
    assert weights["0.weight"].shape == (8, 1, 2, 2)
    assert result.history[-1]["top1"] is not None


def test_resume_keeps_the_teacher_and_is_exact(tmp_path):
    data = tiny_splits(n_train=64, size=16)
    bits = dict(model_overrides=DEIT, image_size=16, teacher="airbench94", teacher_epochs=2, hflip=True,
                label_smoothing=0.1)
    straight = vitlab.train(tiny_config(tmp_path, "straight", **bits), data=data)
    vitlab.train(tiny_config(tmp_path, "split", stop_after_epoch=1, **bits), data=data)
    saved = (tmp_path / "split/teacher/teacher.json").read_text()
    resumed = vitlab.train(tiny_config(tmp_path, "x", resume=str(tmp_path / "split"), **bits), data=data)
    assert (tmp_path / "split/teacher/teacher.json").read_text() == saved  # loaded, not trained again
    a = load_safetensors(straight.run_dir / "last/model.safetensors")
    b = load_safetensors(resumed.run_dir / "last/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]


@pytest.mark.parametrize("changes, message", [
    (dict(teacher="resnet18"), r"TrainConfig.teacher='resnet18' must be one of airbench94 or null"),
    (dict(teacher="airbench94", teacher_epochs=0), r"TrainConfig.teacher_epochs=0 must be a positive number"),
])
def test_bad_teacher_fields_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_a_teacher_needs_deits_distillation_head(tmp_path):
    with pytest.raises(ConfigError, match="needs a model with DeiT's distillation token and head: set "
                                          "model_overrides.distillation_token=true"):
        vitlab.train(tiny_config(tmp_path, image_size=16, teacher="airbench94"), data=tiny_splits(size=16))
    assert not (tmp_path / "run/teacher").exists()  # refused before any training


def test_teacher_lr_factor_ends_at_zero():
    assert math.isclose(teacher_lr_factor(50, 50), 0.0, abs_tol=1e-12)
