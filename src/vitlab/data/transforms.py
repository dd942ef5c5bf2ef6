"""Batched augmentations that run on the training device (CPU or GPU), seeded by a ``torch.Generator``.

A batch arrives as uint8 (B, C, H, W) on the device; :class:`TrainTransform` converts it to float,
augments it with whole-batch tensor operations (no per-image Python loop), normalises it and returns soft
targets (label smoothing, Mixup, CutMix). :class:`EvalTransform` only resizes (when needed) and normalises.
The same generator state gives the same batch, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vitlab.config import pair
from vitlab.errors import ConfigError


# The input normalisations pretrained ViTs were trained with (timm's IMAGENET_DEFAULT and IMAGENET_INCEPTION):
# torchvision's weights use the first; google-research's JAX checkpoints scale inputs to [-1, 1], the second.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # OpenAI's CLIP
# TrainConfig.normalize -> (mean, std), for the choices that name one
NAMED_MEAN_STD = {"imagenet": IMAGENET_MEAN_STD, "inception": INCEPTION_MEAN_STD, "clip": CLIP_MEAN_STD}


def resize_float(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize float images (B, C, H, W) to ``size`` (bilinear; antialiased when shrinking)."""
    size = pair(size, "size")
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_uint8(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize uint8 images (B, C, H, W) to ``size``, returning uint8 (rounded, clamped)."""
    if tuple(images.shape[-2:]) == pair(size, "size"):
        return images
    return resize_float(images.float(), size).round_().clamp_(0, 255).to(torch.uint8)


def _rand(g: torch.Generator | None, *shape, device) -> torch.Tensor:
    return torch.rand(*shape, generator=g, device=device)


def _host_rng(g: torch.Generator | None, device) -> np.random.Generator:
    """A NumPy generator for a batch's choices that the host must know (which op each image gets, whether and
    how much to mix, where to cut), seeded from ``g``'s state and advancing ``g``.

    A generator's state lives on the host for every device (a CUDA generator's is a seed and an offset), so
    nothing is read back from the device: a GPU never waits for these choices. ``g`` then draws once, so the
    next batch's choices differ; the same ``g`` state gives the same choices (exact resume).
    """
    if g is None:  # the global CPU generator, on the host
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    digest = hashlib.blake2b(g.get_state().numpy().tobytes(), digest_size=8).digest()
    _rand(g, 1, device=device)
    return np.random.default_rng(int.from_bytes(digest, "little"))


def one_hot_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """int labels (B,) -> float targets (B, num_classes): ``1 - s + s/K`` on the label, ``s/K`` elsewhere."""
    off = label_smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return t.scatter_(1, labels.view(-1, 1), 1.0 - label_smoothing + off)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, scale: float = 1.0) -> torch.Tensor:
    """``(x * scale - mean) / std`` per channel for float images (B, C, H, W); ``scale=1/255`` takes raw
    0..255 values. One fused multiply-add (no temporaries), which matters: it runs on every batch."""
    mul, add = _normalize_coefficients(mean, std, scale, x)
    return torch.addcmul(add, x, mul)


def _normalize_coefficients(mean: Sequence[float], std: Sequence[float], scale: float,
                            x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale / std, -mean / std)`` as (1, C, 1, 1) tensors in ``x``'s dtype and device."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ConfigError(f"mean/std have {len(mean)}/{len(std)} values for images with {x.shape[1]} channels")
    mul = torch.tensor([scale / s for s in std], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    add = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return mul, add


class _Normalize:
    """:func:`normalize` with fixed ``mean``/``std``, its coefficient tensors built once per (scale, dtype,
    device, channels) instead of on every batch (on a GPU each build is a host-to-device copy)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._coefficients: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        key = (scale, x.dtype, x.device, x.shape[1])
        coefficients = self._coefficients.get(key)
        if coefficients is None:  # a channel mismatch raises here, every call, as normalize() does
            coefficients = self._coefficients[key] = _normalize_coefficients(self.mean, self.std, scale, x)
        mul, add = coefficients
        return torch.addcmul(add, x, mul)


# ----- geometric ops -----------------------------------------------------------------------------------------

def random_crop(x: torch.Tensor, padding: int, g: torch.Generator | None) -> torch.Tensor:
    """Pad every image by ``padding`` zeros and cut a random crop of the original size from each."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    pw = w + 2 * padding
    oy = (_rand(g, b, device=x.device) * (2 * padding + 1)).long().clamp_(max=2 * padding)
    ox = (_rand(g, b, device=x.device) * (2 * padding + 1)).long().clamp_(max=2 * padding)
    # flat index of every output pixel in its padded image: one gather instead of per-image slicing
    base = (torch.arange(h, device=x.device)[:, None] * pw + torch.arange(w, device=x.device)).view(1, -1)
    index = (base + (oy * pw + ox)[:, None]).unsqueeze(1).expand(b, c, h * w)  # (B, C, H*W)
    return padded.view(b, c, -1).gather(2, index).view(b, c, h, w)


def random_hflip(x: torch.Tensor, g: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = _rand(g, x.shape[0], device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_resized_crop(x: torch.Tensor, size: Sequence[int], scale: tuple[float, float],
                        g: torch.Generator | None, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a random box (area fraction in ``scale``, aspect in ``ratio``) from each image, resize to ``size``."""
    b = x.shape[0]
    dev = x.device
    area = scale[0] + (scale[1] - scale[0]) * _rand(g, b, device=dev)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(g, b, device=dev)
    r = log_r.exp()
    fw = (area * r).sqrt().clamp(max=1.0)  # box width as a fraction of the image width
    fh = (area / r).sqrt().clamp(max=1.0)
    cx = fw / 2 + (1 - fw) * _rand(g, b, device=dev)  # box centre, in [0, 1]
    cy = fh / 2 + (1 - fh) * _rand(g, b, device=dev)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = fw, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = fh, 2 * cy - 1
    h, w = pair(size, "size")
    return F.grid_sample(x, _grid(theta, h, w), mode="bilinear", padding_mode="border", align_corners=False)


def _grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)`` by broadcasting; its batched matmul is
    slow on the CPU for small images. theta: (B, 2, 3) -> grid (B, h, w, 2)."""
    u = ((torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    v = ((torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    t = theta.view(-1, 6, 1, 1)
    gx = t[:, 0] * u + t[:, 1] * v + t[:, 2]
    gy = t[:, 3] * u + t[:, 4] * v + t[:, 5]
    return torch.stack([gx, gy], dim=-1)


def _affine(x: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Apply per-image affine maps given in pixel units about the centre: ``in = M @ out + shift`` (pixels).

    matrix: (B, 2, 2) over (x, y); shift: (B, 2) in pixels. Outside pixels become 0.
    """
    b, c, h, w = x.shape
    half = torch.tensor([w / 2, h / 2], device=x.device, dtype=x.dtype)
    # pixel -> normalised coordinates: S^-1 M S, so rotations stay rotations on non-square images
    theta = torch.empty(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, :, :2] = matrix * half.view(1, 1, 2) / half.view(1, 2, 1)
    theta[:, :, 2] = shift / half
    return F.grid_sample(x, _grid(theta, h, w), mode="bilinear", padding_mode="zeros", align_corners=False)


# ----- colour ops (float images in [0, 1]) ---------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (B, 1, H, W)


def _blend(img: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: ``degenerate + factor * (img - degenerate)``; factor (B,)."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (img - degenerate)).clamp_(0, 1)


def _sharpness_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) inside, the border pixels unchanged (as PIL),
    computed as nine shifted adds: on small batches several times faster than a depthwise convolution."""
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x
    total = 5 * x[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                total = total + x[..., dy:dy + h - 2, dx:dx + w - 2]
    out = x.clone()
    out[..., 1:-1, 1:-1] = total / 13
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp_(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel with PIL's lookup table (``ImageOps.equalize``)."""
    b, c, h, w = x.shape
    v = (x * 255).round_().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.int64).scatter_add_(1, v, torch.ones_like(v))
    # PIL: step = (pixels - count of the last non-empty bin) // 255; lut[i] = (step // 2 + pixels below i) // step
    last = 255 - (hist.flip(1) > 0).to(torch.int64).argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255  # (B*C, 1)
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand_as(lut))  # one colour: unchanged
    return (lut.gather(1, v).to(x.dtype) / 255).view(b, c, h, w)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = (2.0 ** (8 - bits)).view(-1, 1, 1, 1)
    return (torch.floor((x * 255).round() / step) * step / 255)


# The geometric ops come last so that, with images sorted by op, they form one slice (one grid_sample).
OPS = ("identity", "autocontrast", "equalize", "solarize", "color", "posterize", "contrast", "brightness",
       "sharpness", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Largest strength of each op: (RandAugment, TrivialAugment-wide), after timm and torchvision.
_MAX_LEVEL = {
    "rotate": (30.0, 135.0),  # degrees
    "shear": (0.3, 0.99),
    "translate": (0.45, 0.5),  # fraction of the image side
    "enhance": (0.9, 0.99),  # factor 1 +- this
    "posterize": (4, 6),  # bits removed
}


class AutoAugment:
    """RandAugment (``"rand-mM-nN"``: N ops per image at magnitude M of 10) or TrivialAugment (``"trivial"``:
    one op per image at a uniformly random magnitude, wide ranges), applied batch-wise: every image draws
    its own ops, and each op runs once on the images that drew it."""

    def __init__(self, policy: str):
        text = policy.strip().lower()
        m = re.fullmatch(r"rand((?:-[mn]\d+(?:\.\d+)?)*)", text)
        if text in ("trivial", "trivialaugment", "trivial-augment"):
            self.kind, self.num_ops, self.magnitude = "trivial", 1, None
        elif m:
            params = dict(re.findall(r"-([mn])(\d+(?:\.\d+)?)", m.group(1)))
            self.kind = "rand"
            self.num_ops = int(float(params.get("n", 2)))
            self.magnitude = float(params.get("m", 9))
            if not 0 <= self.magnitude <= 10 or self.num_ops < 1:
                raise ConfigError(f"auto_augment={policy!r}: need 0 <= m <= 10 and n >= 1")
        else:
            raise ConfigError(f"auto_augment={policy!r} is not a policy; use 'rand-m9-n2' or 'trivial'")
        self.policy = policy

    def __call__(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        for _ in range(self.num_ops):
            x = self._one_round(x, g)
        return x

    def _one_round(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        wide = 1 if self.kind == "trivial" else 0
        # Each image's op is chosen on the host (no device sync), and the images are sorted by op: each op then
        # runs on a contiguous slice (a view), and the batch is gathered and scattered once per round.
        ops = _host_rng(g, dev).integers(0, len(OPS), b)
        order_np = np.argsort(ops, kind="stable")
        ends = np.cumsum(np.bincount(ops, minlength=len(OPS))).tolist()
        order = torch.as_tensor(order_np, device=dev)
        op = torch.as_tensor(ops[order_np], device=dev)
        if self.magnitude is None:
            mag = _rand(g, b, device=dev)
        else:
            mag = torch.full((b,), self.magnitude / 10, device=dev)
        sign = torch.where(_rand(g, b, device=dev) < 0.5, -1.0, 1.0)
        xs = x.index_select(0, order)
        mag, sign = mag[order], sign[order]
        pieces = []
        start = 0
        for k, name in enumerate(OPS[:len(OPS) - len(_GEOMETRIC)]):
            end = ends[k]
            if end > start:
                pieces.append(self._colour_op(name, xs[start:end], mag[start:end], sign[start:end], wide))
            start = end
        if ends[-1] > start:
            pieces.append(self._geometric(xs[start:], op[start:], mag[start:] * sign[start:], wide))
        # index_select by the inverse permutation: much faster on the CPU than out[order] = ...
        return torch.cat(pieces).index_select(0, torch.argsort(order))

    @staticmethod
    def _colour_op(name: str, xs: torch.Tensor, mag: torch.Tensor, sign: torch.Tensor, wide: int) -> torch.Tensor:
        factor = 1 + mag * sign * _MAX_LEVEL["enhance"][wide]
        if name == "identity":
            return xs
        if name == "autocontrast":
            return _autocontrast(xs)
        if name == "equalize":
            return _equalize(xs)
        if name == "solarize":
            return torch.where(xs >= (1 - mag).view(-1, 1, 1, 1), 1 - xs, xs)
        if name == "posterize":
            return _posterize(xs, (8 - (mag * _MAX_LEVEL["posterize"][wide]).round()).clamp(1, 8))
        if name == "color":
            return _blend(xs, _gray(xs).expand_as(xs), factor)
        if name == "contrast":
            return _blend(xs, _gray(xs).mean(dim=(1, 2, 3), keepdim=True).expand_as(xs), factor)
        if name == "brightness":
            return _blend(xs, torch.zeros_like(xs), factor)
        return _blend(xs, _sharpness_degenerate(xs), factor)  # sharpness

    @staticmethod
    def _geometric(xs: torch.Tensor, op: torch.Tensor, signed: torch.Tensor, wide: int) -> torch.Tensor:
        """Rotate / shear / translate images (one op each, given by ``op``) with one affine resampling."""
        n = xs.shape[0]
        h, w = xs.shape[-2:]
        is_op = {name: op == OPS.index(name) for name in _GEOMETRIC}
        angle = signed * math.radians(_MAX_LEVEL["rotate"][wide])
        shear = signed * _MAX_LEVEL["shear"][wide]
        move = signed * _MAX_LEVEL["translate"][wide]
        rot = is_op["rotate"]
        one, zero = torch.ones_like(signed), torch.zeros_like(signed)
        cos = torch.where(rot, angle.cos(), one)
        sin = torch.where(rot, angle.sin(), zero)
        m01 = torch.where(is_op["shear_x"], shear, -sin)
        m10 = torch.where(is_op["shear_y"], shear, sin)
        matrix = torch.stack([cos, m01, m10, cos], dim=1).view(n, 2, 2)
        shift = torch.stack([torch.where(is_op["translate_x"], move * w, zero),
                             torch.where(is_op["translate_y"], move * h, zero)], dim=1)
        return _affine(xs, matrix.to(xs.dtype), shift.to(xs.dtype))


def random_erasing(x: torch.Tensor, p: float, g: torch.Generator | None,
                   scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3)):
    """With probability ``p`` per image, replace a random box by normal noise (on normalised images)."""
    b, c, h, w = x.shape
    dev = x.device
    erase = _rand(g, b, device=dev) < p
    area = (scale[0] + (scale[1] - scale[0]) * _rand(g, b, device=dev)) * h * w
    r = (math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(g, b, device=dev)).exp()
    bh = (area * r).sqrt().round().clamp(1, h)
    bw = (area / r).sqrt().round().clamp(1, w)
    top = ((h - bh + 1) * _rand(g, b, device=dev)).floor()
    left = ((w - bw + 1) * _rand(g, b, device=dev)).floor()
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + bh).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + bw).view(-1, 1, 1)) & erase.view(-1, 1, 1))
    noise = torch.randn(x.shape, generator=g, device=dev, dtype=x.dtype)
    return torch.where(inside.unsqueeze(1), noise, x)


def mixup_cutmix(x: torch.Tensor, targets: torch.Tensor, g: torch.Generator | None, *, mixup_alpha: float,
                 cutmix_alpha: float, mix_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with the batch reversed (timm's "batch" mode); soft targets mixed by the same weight.

    With both alphas > 0 each batch uses Mixup or CutMix with equal chance. CutMix's weight is the exact
    area kept. Targets that sum to one stay summing to one.
    """
    if mix_prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return x, targets
    rng = _host_rng(g, x.device)  # the batch-level choices, known to the host without a device sync
    if rng.random() >= mix_prob:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    other = x.flip(0)
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.random() * h), int(rng.random() * w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = other[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        x = x * lam + other * (1 - lam)
    return x, targets * lam + targets.flip(0) * (1 - lam)


@dataclass(frozen=True)
class Mixing:
    """Mixup / CutMix of a batch (:func:`mixup_cutmix`): the two Beta distributions' alphas (0: off) and the
    chance that a batch is mixed at all (timm's ``Mixup(mixup_alpha, cutmix_alpha, prob)``)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0

    def __call__(self, x: torch.Tensor, targets: torch.Tensor,
                 g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return mixup_cutmix(x, targets, g, mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                            mix_prob=self.prob)


class TrainTransform:
    """The training input pipeline on the batch's device: uint8 images + int labels -> normalised float
    images (B, C, H, W) + soft targets (B, num_classes).

    Order: to float, random resized crop (else resize to ``image_size``), pad-and-crop, horizontal flip,
    RandAugment/TrivialAugment, normalise, random erasing, Mixup/CutMix (targets with label smoothing).
    """

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], image_size, num_classes: int,
                 crop_padding: int = 0, hflip: bool = False,
                 random_resized_crop: tuple[float, float] | None = None, auto_augment: str | None = None,
                 random_erasing: float = 0.0, mixing: Mixing | None = None, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if not 0.0 <= random_erasing <= 1.0:
            raise ConfigError(f"random_erasing={random_erasing} must be a probability in [0, 1]")
        if crop_padding < 0:
            raise ConfigError(f"crop_padding={crop_padding} must be >= 0")
        if random_resized_crop is not None:
            lo, hi = random_resized_crop
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"random_resized_crop={random_resized_crop} must be a (min, max) area fraction "
                                  f"with 0 < min <= max <= 1")
        self.mean, self.std = tuple(mean), tuple(std)
        self._normalize = _Normalize(self.mean, self.std)
        self.image_size = pair(image_size, "image_size")
        self.num_classes = num_classes
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.random_resized_crop = tuple(random_resized_crop) if random_resized_crop is not None else None
        self.auto_augment = AutoAugment(auto_augment) if auto_augment else None
        self.random_erasing = random_erasing
        self.mixing = mixing or Mixing()
        self.label_smoothing = label_smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = generator
        x = images.float()  # uint8 (B, C, H, W) -> float 0..255; crops, flips, resizing work on any scale
        if self.random_resized_crop is not None:
            x = random_resized_crop(x, self.image_size, self.random_resized_crop, g)
        else:
            x = resize_float(x, self.image_size)
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, g)
        if self.hflip:
            x = random_hflip(x, g)
        scale = 1 / 255
        if self.auto_augment is not None:  # its colour ops work on [0, 1]
            x = self.auto_augment(x.div_(255), g)
            scale = 1.0
        x = self._normalize(x, scale=scale)
        if self.random_erasing > 0:
            x = random_erasing(x, self.random_erasing, g)
        targets = one_hot_targets(labels, self.num_classes, self.label_smoothing)
        return self.mixing(x, targets, g)


class EvalTransform:
    """Evaluation input: uint8 (B, C, H, W) -> float, resized to ``image_size`` if needed, normalised."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], image_size):
        self.mean, self.std = tuple(mean), tuple(std)
        self._normalize = _Normalize(self.mean, self.std)
        self.image_size = pair(image_size, "image_size")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # uint8 (B, C, H, W) -> float 0..255
        if tuple(x.shape[-2:]) != self.image_size:
            x = resize_float(x, self.image_size)
        return self._normalize(x, scale=1 / 255)


@dataclass(frozen=True)
class Preprocess:
    """How a trained model's input is made from an image: decoded at ``image_size`` ``(H, W)`` with ``channels``
    (1 or 3), then scaled to [0, 1] and normalised with the per-channel ``mean`` and ``std`` it was trained with.
    Calling it on uint8 ``(B, C, H, W)`` images gives the model's float input (the evaluation path of training)."""

    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:  # one transform for all batches: it keeps its normalisation tensors
        object.__setattr__(self, "_transform", EvalTransform(mean=self.mean, std=self.std,
                                                             image_size=self.image_size))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._transform(images)
