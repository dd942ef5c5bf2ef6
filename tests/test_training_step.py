"""The one training step: fit() and `vitlab bench` run the same one, it waits for nothing, and it compiles whole."""

from __future__ import annotations

import pytest
import torch
from _train_fixtures import TINY_MODEL, tiny_config, tiny_splits
from torch.utils._python_dispatch import TorchDispatchMode

import vitlab
from vitlab._files import load_safetensors
from vitlab.bench import make_step
from vitlab.data import BatchLoader
from vitlab.training.engine import _epoch_seed
from vitlab.training.step import lookahead_decay, make_train_step

pytestmark = pytest.mark.usefixtures("one_thread")

# every part of the step that draws random numbers or carries state: flips, dropout, drop path, label smoothing,
# clipping, EMA, the warmup
STEP_BITS = dict(hflip=True, dropout=0.1, drop_path=0.1, label_smoothing=0.1, clip_grad=0.5, ema_decay=0.9,
                 warmup_epochs=1)


def _tiny_model(config, classes):
    torch.manual_seed(config.seed)  # as fit() seeds the initial weights
    return vitlab.create_model(config.model, **config.model_overrides, dropout=config.dropout,
                               drop_path=config.drop_path, num_classes=len(classes), labels=classes)


@pytest.mark.device
def test_a_bench_step_and_a_fit_step_leave_bit_identical_weights(tmp_path, device):
    data = tiny_splits(n_train=16)
    config = tiny_config(tmp_path, epochs=1, batch_size=16, device=device.type, **STEP_BITS)  # one step
    fitted = vitlab.train(config, data=data).run_dir / "last"

    model = _tiny_model(config, data.classes).to(device).train()
    generator = torch.Generator(device=device).manual_seed(_epoch_seed(config.seed, 0, 0))
    step = make_step(model, mode="train", precision="fp32", device=device, image_size=(8, 8),
                     channels=1, num_classes=4, config=config, steps_per_epoch=1, normalization=(data.mean, data.std),
                     generator=generator)
    loader = BatchLoader(data.train, batch_size=16, shuffle=True, seed=config.seed, drop_last=True)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    torch.manual_seed(_epoch_seed(config.seed, 0, 0) + 1)  # dropout and drop path, as fit() seeds them
    step(images.to(device), labels.to(device))

    for name, module in (("model.safetensors", model), ("ema.safetensors", step.train_step.ema)):
        saved = load_safetensors(fitted / name)
        assert saved.keys() == module.state_dict().keys()
        for key, value in module.state_dict().items():
            assert torch.equal(saved[key], value.cpu()), f"{name}:{key}"
    assert not torch.equal(saved["head.weight"], _tiny_model(config, data.classes).head.weight)  # it trained


class _HostSyncs(TorchDispatchMode):
    """Records every read of a tensor's value by the host (on a GPU, a wait for the device): the operator behind
    ``.item()``, and the Python conversions ``.tolist()``, ``bool()``, ``float()``, ``int()``, ``index()``."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        super().__init__()
        self.syncs = []
        for name in self.READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, _name=name, _original=original):
                self.syncs.append(_name)
                return _original(tensor, *args)
            monkeypatch.setattr(torch.Tensor, name, read)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def _step_and_batch(config, channels=1, device=torch.device("cpu")):
    data = tiny_splits(n_train=16, channels=channels)
    torch.manual_seed(config.seed)
    model = vitlab.create_model(config.model, **config.model_overrides, dropout=config.dropout,
                                drop_path=config.drop_path, num_classes=4, in_channels=channels).to(device).train()
    step = make_train_step(model, config, device=device, precision="fp32", steps_per_epoch=4,
                           num_classes=4, image_size=(8, 8), mean=data.mean, std=data.std)
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    return step, [(images[:8], labels[:8]), (images[8:], labels[8:])]


@pytest.mark.parametrize("augment", [dict(mixup_alpha=0.8, cutmix_alpha=1.0, random_erasing=0.25),
                                     dict(auto_augment="rand-m9-n2", crop_padding=2, mixup_alpha=0.8),
                                     dict(auto_augment="trivial", random_resized_crop=[0.5, 1.0], cutmix_alpha=1.0)])
@pytest.mark.device
def test_the_step_never_waits_for_the_device(tmp_path, monkeypatch, augment, device):
    config = tiny_config(tmp_path, accum_steps=2, device=device.type, **augment, **STEP_BITS)
    step, batches = _step_and_batch(config, channels=3, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    step(batches, generator)  # the optimizer's state is made on the first step
    for _ in range(3):  # Mixup and CutMix each get their turn
        with _HostSyncs(monkeypatch) as watch:
            loss = step(batches, generator)
        monkeypatch.undo()
        assert watch.syncs == []
    with _HostSyncs(monkeypatch) as watch:  # the check can fail: reading the loss is a sync
        float(loss)
    monkeypatch.undo()
    assert watch.syncs


@pytest.mark.device
def test_the_whole_step_can_be_handed_to_torch_compile(tmp_path, device):
    """Compiled whole (dynamo + AOT autograd; the inductor backend differs only by kernel rounding), the step
    leaves the weights of the eager step, bit for bit, step after step."""
    import torch._dynamo

    config = tiny_config(tmp_path, accum_steps=2, device=device.type, **STEP_BITS)
    eager, batches = _step_and_batch(config, device=device)
    twin, _ = _step_and_batch(config, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager")
    g_eager = torch.Generator(device=device).manual_seed(1)
    g_compiled = torch.Generator(device=device).manual_seed(1)
    for i in range(3):
        torch.manual_seed(i)
        a = eager(batches, g_eager)
        torch.manual_seed(i)
        b = compiled(batches, g_compiled)
        assert torch.equal(a, b)
    for module_a, module_b in ((eager.model, twin.model), (eager.ema, twin.ema)):
        for (name, x), y in zip(module_a.state_dict().items(), module_b.state_dict().values()):
            assert torch.equal(x, y), name
    assert twin.scheduler.step_count == 3
    torch._dynamo.reset()


def test_lookahead_schedule():
    assert lookahead_decay(3, 100) is None and lookahead_decay(99, 100) is None  # between updates
    assert lookahead_decay(5, 100) == 0.95 ** 5 * 0.05 ** 3
    assert lookahead_decay(50, 100) == 0.95 ** 5 * 0.125
    assert lookahead_decay(100, 100) == 0.95 ** 5  # the last step's update; TrainStep.finish adds one of decay 1


class _AirbenchLookahead:
    """airbench94's LookaheadState, as its code has it (KellerJordan/airbench): an EMA of the float state that
    the network is reset to on every update."""

    def __init__(self, net):
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, net, decay):
        for ema_param, net_param in zip(self.net_ema.values(), net.state_dict().values()):
            if net_param.dtype in (torch.half, torch.float):
                ema_param.lerp_(net_param, 1 - decay)
                net_param.copy_(ema_param)


@pytest.mark.device
def test_lookahead_is_airbenchs(tmp_path, monkeypatch, device):
    """20 steps with ``lookahead: true`` and the run's end (``finish``) leave the weights (and BatchNorm
    statistics) of the same steps without it followed by airbench's own Lookahead updates (steps 5, 10, 15 and
    20, then decay 1 after its loop), bit for bit; an update waits for nothing."""
    bits = dict(STEP_BITS, epochs=5, device=device.type, model_overrides=dict(TINY_MODEL, patch_embed="conv_stem"))
    ours, batches = _step_and_batch(tiny_config(tmp_path, lookahead=True, **bits), device=device)
    plain, _ = _step_and_batch(tiny_config(tmp_path, **bits), device=device)
    assert ours.slow is not None and plain.slow is None and ours.scheduler.total_steps == 20
    reference = _AirbenchLookahead(plain.model)
    g_ours, g_plain = (torch.Generator(device=device).manual_seed(1) for _ in range(2))
    for i in range(1, 21):
        torch.manual_seed(i)
        with _HostSyncs(monkeypatch) as watch:
            ours(batches, g_ours)
        monkeypatch.undo()
        assert watch.syncs == []
        torch.manual_seed(i)
        plain(batches, g_plain)
        if i % 5 == 0:
            reference.update(plain.model, 0.95 ** 5 * (i / 20) ** 3)
        if i == 5:  # an update leaves the model on the slow weights
            assert all(torch.equal(a, b) for a, b in zip(ours.model.parameters(), ours.slow.parameters()))
        if i == 6:
            assert not torch.equal(ours.model.head.weight, ours.slow.head.weight)
    ours.finish()
    reference.update(plain.model, 1.0)
    state, expected = ours.model.state_dict(), plain.model.state_dict()
    assert "patch_embed.stem.1.running_mean" in state
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    before = _step_and_batch(tiny_config(tmp_path, **bits), device=device)[0].model
    assert not torch.equal(before.head.weight, ours.model.head.weight)  # it trained
