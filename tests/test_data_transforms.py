"""Augmentations tested on values: a flip flips, a crop is a shifted window, Mixup targets sum to one,
the same seed gives the same batch."""

import numpy as np
import pytest
import torch

from vitlab.data import EvalTransform, TrainTransform
from vitlab.data import transforms as T
from vitlab.data.transforms import Mixing
from vitlab.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def _batch(b=16, c=3, h=12, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8), torch.arange(b) % 10


def _unnorm(x, mean=MEAN, std=STD):
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def test_eval_transform_normalises_exactly():
    x, _ = _batch()
    out = EvalTransform(mean=MEAN, std=STD, image_size=12)(x)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    small = EvalTransform(mean=MEAN, std=STD, image_size=(6, 4))(x)
    assert small.shape == (16, 3, 6, 4)


def test_plain_train_transform_is_eval_plus_one_hot():
    x, y = _batch()
    out, t = TrainTransform(mean=MEAN, std=STD, image_size=12, num_classes=10)(x, y, torch.Generator())
    torch.testing.assert_close(out, EvalTransform(mean=MEAN, std=STD, image_size=12)(x))
    assert torch.equal(t, torch.nn.functional.one_hot(y, 10).float())


def test_hflip_flips_about_half():
    x, y = _batch(b=64)
    tf = TrainTransform(mean=(0, 0, 0), std=(1, 1, 1), image_size=12, num_classes=10, hflip=True)
    out, _ = tf(x, y, torch.Generator().manual_seed(1))
    ref = x.float() / 255
    flipped = [torch.allclose(o, r.flip(2), atol=1e-6, rtol=0) for o, r in zip(out, ref)]
    same = [torch.allclose(o, r, atol=1e-6, rtol=0) for o, r in zip(out, ref)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 16 < sum(flipped) < 48


def test_random_crop_is_a_window_of_the_padded_image():
    x, y = _batch(b=32, h=8, w=8)
    tf = TrainTransform(mean=(0, 0, 0), std=(1, 1, 1), image_size=8, num_classes=10, crop_padding=2)
    out, _ = tf(x, y, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x.float() / 255, (2, 2, 2, 2))
    offsets = set()
    for o, p in zip(out, padded):
        hits = [(i, j) for i in range(5) for j in range(5)
                if torch.allclose(o, p[:, i:i + 8, j:j + 8], atol=1e-6, rtol=0)]
        assert hits, "crop is not a window of the padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets differ between images


def test_same_seed_same_batch_other_seed_other_batch():
    x, y = _batch(b=32)
    kw = dict(mean=MEAN, std=STD, image_size=12, num_classes=10, crop_padding=2, hflip=True,
              auto_augment="rand-m9-n2", random_erasing=0.5,
              mixing=Mixing(mixup_alpha=0.8, cutmix_alpha=1.0), label_smoothing=0.1)
    a = TrainTransform(**kw)(x, y, torch.Generator().manual_seed(7))
    b = TrainTransform(**kw)(x, y, torch.Generator().manual_seed(7))
    c = TrainTransform(**kw)(x, y, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_label_smoothing_values():
    t = T.one_hot_targets(torch.tensor([2, 0]), 4, 0.2)
    torch.testing.assert_close(t, torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]]))


def test_mixup_targets_sum_to_one_and_mix_the_reversed_batch():
    x, y = _batch(b=8)
    tf = TrainTransform(mean=(0, 0, 0), std=(1, 1, 1), image_size=12, num_classes=10,
                        mixing=Mixing(mixup_alpha=1.0), label_smoothing=0.1)
    out, t = tf(x, y, torch.Generator().manual_seed(3))
    torch.testing.assert_close(t.sum(1), torch.ones(8))
    ref = x.float() / 255
    # out = lam * x + (1 - lam) * x.flip(0); recover lam from the targets of image 0 and check every pixel
    smooth = T.one_hot_targets(y, 10, 0.1)
    lam = float(((t[0] - smooth[7]) / (smooth[0] - smooth[7]))[y[0]])
    assert 0 < lam < 1
    torch.testing.assert_close(out, lam * ref + (1 - lam) * ref.flip(0))


def test_cutmix_weight_is_the_pasted_area():
    x = torch.zeros(2, 1, 10, 10, dtype=torch.uint8)
    x[1] = 255
    y = torch.tensor([0, 1])
    tf = TrainTransform(mean=(0,), std=(1,), image_size=10, num_classes=2, mixing=Mixing(cutmix_alpha=1.0))
    for seed in range(5):
        out, t = tf(x, y, torch.Generator().manual_seed(seed))
        pasted = float(out[0].mean())  # image 0 is black; pasted pixels come from the white image 1
        assert float(t[0, 1]) == pytest.approx(pasted)
        torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_mix_prob_zero_is_no_mixing():
    x, y = _batch(b=8)
    tf = TrainTransform(mean=MEAN, std=STD, image_size=12, num_classes=10, mixing=Mixing(mixup_alpha=1.0, prob=0.0))
    _, t = tf(x, y, torch.Generator())
    assert torch.equal(t, torch.nn.functional.one_hot(y, 10).float())


def test_random_resized_crop_shape_and_full_crop_is_identity():
    x, y = _batch(b=4, h=16, w=16)
    tf = TrainTransform(mean=MEAN, std=STD, image_size=(8, 8), num_classes=10, random_resized_crop=(0.08, 1.0))
    out, _ = tf(x, y, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 8, 8)
    full = T.random_resized_crop(x.float(), (16, 16), (1.0, 1.0), torch.Generator(), ratio=(1.0, 1.0))
    torch.testing.assert_close(full, x.float(), atol=1e-3, rtol=0)


def test_random_erasing_replaces_one_box_per_erased_image():
    x, y = _batch(b=32)
    tf = TrainTransform(mean=MEAN, std=STD, image_size=12, num_classes=10, random_erasing=1.0)
    out, _ = tf(x, y, torch.Generator().manual_seed(0))
    ref = EvalTransform(mean=MEAN, std=STD, image_size=12)(x)
    changed = (out != ref).any(1)  # (B, H, W)
    for m in changed:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert len(rows) > 0
        # the changed pixels fill their bounding box: a rectangle
        assert int(m.sum()) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


@pytest.mark.parametrize("policy", ["rand-m9-n2", "trivial", "rand-m5-n3"])
def test_auto_augment_changes_images_and_stays_in_range(policy):
    x, y = _batch(b=64)
    tf = TrainTransform(mean=(0, 0, 0), std=(1, 1, 1), image_size=12, num_classes=10, auto_augment=policy)
    out, _ = tf(x, y, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = sum(not torch.allclose(o, r) for o, r in zip(out, x.float() / 255))
    assert changed > 32


def test_auto_augment_ops_on_values():
    x = torch.tensor([[[[0.0, 0.25], [0.5, 1.0]]]])
    T_ops = T.AutoAugment("rand-m10-n1")
    assert T_ops.num_ops == 1 and T_ops.magnitude == 10
    torch.testing.assert_close(T._autocontrast(x * 0.5 + 0.2), x)
    torch.testing.assert_close(T._posterize(x, torch.tensor([1.0])), torch.tensor([[[[0.0, 0.0], [128 / 255, 128 / 255]]]]))
    # a 90 degree rotation of a square image through the affine helper
    img = torch.arange(16.0).view(1, 1, 4, 4)
    m = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]])
    rotated = T._affine(img, m, torch.zeros(1, 2))
    assert torch.equal(rotated.round(), torch.rot90(img, 1, (2, 3))) or torch.equal(rotated.round(), torch.rot90(img, -1, (2, 3)))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="auto_augment='autoaug-v0'"):
        TrainTransform(mean=MEAN, std=STD, image_size=8, num_classes=2, auto_augment="autoaug-v0")
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainTransform(mean=MEAN, std=STD, image_size=8, num_classes=2, label_smoothing=1.0)
    with pytest.raises(ConfigError, match="3 channels"):
        EvalTransform(mean=(0.5,), std=(0.5,), image_size=8)(_batch()[0])


def test_resize_uint8_downscale_is_antialiased():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    x[..., :2, :2] = 255  # a bright corner, away from where a plain bilinear 8 -> 1 samples (3.5, 3.5)
    plain = torch.nn.functional.interpolate(x.float(), size=(1, 1), mode="bilinear", align_corners=False)
    assert float(plain) == 0.0
    out = T.resize_uint8(x, (1, 1))
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 1, 1)
    assert 5 <= int(out) <= 40  # the corner is averaged in (a box filter would give 16)


def test_grid_equals_affine_grid_and_smooth_equals_conv():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(T._grid(theta, 7, 9), torch.nn.functional.affine_grid(theta, [5, 1, 7, 9],
                                                                                      align_corners=False))
    x = torch.rand(4, 3, 6, 5, generator=torch.Generator().manual_seed(1))
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    conv = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
                                      k.expand(3, 1, 3, 3), groups=3)
    smooth = T._sharpness_degenerate(x)
    torch.testing.assert_close(smooth[..., 1:-1, 1:-1], conv[..., 1:-1, 1:-1])
    border = torch.ones(6, 5, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.equal(smooth[..., border], x[..., border])  # PIL leaves the border as it was


def test_colour_ops_match_pil():
    """Each colour op on [0, 1] floats equals PIL's ImageEnhance / ImageOps on the uint8 image (within 1/255)."""
    from PIL import Image, ImageEnhance, ImageOps

    rng = np.random.default_rng(0)
    a = rng.integers(20, 230, (9, 11, 3), dtype=np.uint8)
    a[:3] //= 3  # uneven histogram
    img = Image.fromarray(a)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255

    def check(ours, pil):
        got = (ours * 255).round().squeeze(0).permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(got - np.asarray(pil).astype(int))
        assert diff.max() <= 1, diff.max()

    f = torch.tensor([1.7])
    check(T._blend(x, torch.zeros_like(x), f), ImageEnhance.Brightness(img).enhance(1.7))
    check(T._blend(x, T._gray(x).expand_as(x), f), ImageEnhance.Color(img).enhance(1.7))
    check(T._blend(x, T._gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), torch.tensor([0.4])),
          ImageEnhance.Contrast(img).enhance(0.4))
    check(T._blend(x, T._sharpness_degenerate(x), f), ImageEnhance.Sharpness(img).enhance(1.7))
    check(T._posterize(x, torch.tensor([3.0])), ImageOps.posterize(img, 3))
    check(torch.where(x >= 128 / 255, 1 - x, x), ImageOps.solarize(img, 128))
    check(T._autocontrast(x), ImageOps.autocontrast(img))
    check(T._equalize(x), ImageOps.equalize(img))


def test_image_size_is_checked_by_config_pair():
    with pytest.raises(ConfigError, match="image_size='big'"):
        EvalTransform(mean=MEAN, std=STD, image_size="big")
    with pytest.raises(ConfigError, match="image_size"):
        TrainTransform(mean=MEAN, std=STD, image_size=(8, 8, 8), num_classes=2)
    assert EvalTransform(mean=MEAN, std=STD, image_size=[6, 4]).image_size == (6, 4)


def test_normalisation_tensors_built_once_with_unchanged_results(monkeypatch):
    x, y = _batch()
    built = []
    real = T._normalize_coefficients
    monkeypatch.setattr(T, "_normalize_coefficients", lambda *a: built.append(a[2]) or real(*a))
    ev = EvalTransform(mean=MEAN, std=STD, image_size=12)
    tr = TrainTransform(mean=MEAN, std=STD, image_size=12, num_classes=10)
    for _ in range(3):
        assert torch.equal(ev(x), T.normalize(x.float(), MEAN, STD, scale=1 / 255))
        assert torch.equal(tr(x, y, torch.Generator())[0], T.normalize(x.float(), MEAN, STD, scale=1 / 255))
    # the 6 normalize() calls build each time; each transform built once
    assert len(built) == 6 + 1 + 1
    cached = T._Normalize(MEAN, STD)  # what both transforms use: tensors per dtype (and device, scale)
    for dtype in (torch.float32, torch.float64, torch.float32):
        assert torch.equal(cached(x.to(dtype), scale=0.5), T.normalize(x.to(dtype), MEAN, STD, scale=0.5))
    assert len(built) == 8 + 2 + 3
