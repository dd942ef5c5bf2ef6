"""Patchify: cut the image into patches and project each to ``hidden_dim``.

The two styles of the from-scratch tutorials, with the same maths: a strided convolution, or unfold + linear.
Given the same weights (the conv kernel reshaped to ``(D, C*ph*pw)``) they give equal outputs.

A third, ``conv_stem``, is the convolutional stem of Xiao et al., "Early Convolutions Help Transformers See
Better" (NeurIPS 2021): for a patch of ``2**k`` pixels, ``k`` stride-2 3x3 convolutions, each followed by
BatchNorm and ReLU, then a 1x1 convolution to ``hidden_dim``. It gives the same token grid as the patchify
layer, costs little more, and makes a small ViT train much faster and more stably on small datasets.
``extra_convs`` stride-1 3x3 convolutions (each with BatchNorm and ReLU) can follow the stride-2 ones, at the
token grid's resolution: a small hybrid. In place of transformer blocks of about the same cost it reached a
higher accuracy in the same time on a 2-core CPU (docs/training.md; presets vit-cifar-hybrid, vit-mnist-hybrid).

A fourth, ``shifted``, is the shifted patch tokenization of SL-ViT (Lee et al., "Vision Transformer for
Small-Size Datasets", 2021): the image and four copies moved half a patch diagonally (zero-padded) are stacked
on the channels, cut into patches, flattened pixel by pixel (each pixel's 5C values together, as the authors'
``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``), layer-normalised and projected: each token also sees
the pixels of its neighbours.

The convolutional stem reads its input in channels_last (NHWC) memory order, oneDNN's preferred layout for
convolutions: with bf16 a training step of vit-cifar-hybrid ran 1.03-1.07x faster on two kinds of 2-core CPU
(docs/performance.md, "channels_last"). Only the activations change layout; the weights, and so the
checkpoints and the optimizer state, stay contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.config import ViTConfig

from vitlab.config import conv_stem_channels
from vitlab.errors import ConfigError


class PatchEmbed(nn.Module):
    """``(B, C, H, W) -> (B, N, D)`` with ``N = (H/ph) * (W/pw)`` patches in row-major order."""

    def __init__(self, *, in_channels: int, hidden_dim: int, patch_size: tuple[int, int], style: str = "conv",
                 extra_convs: int = 0, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.style = style
        self.channels_last = style == "conv_stem"  # the stem's input in NHWC (the module docstring)
        if style == "conv":
            self.proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        elif style == "conv_stem":
            layers: list[nn.Module] = []
            c_in = in_channels
            for c_out in conv_stem_channels(hidden_dim, patch_size[0]):
                layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            for _ in range(extra_convs):
                layers += [nn.Conv2d(c_in, c_in, kernel_size=3, stride=1, padding=1, bias=False),
                           nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
            self.stem = nn.Sequential(*layers)
            self.proj = nn.Conv2d(c_in, hidden_dim, kernel_size=1, bias=bias)
        elif style == "shifted":
            dim = 5 * in_channels * patch_size[0] * patch_size[1]
            self.norm = nn.LayerNorm(dim)  # PyTorch's default eps, as the authors' code
            self.proj = nn.Linear(dim, hidden_dim, bias=bias)
        else:
            self.proj = nn.Linear(in_channels * patch_size[0] * patch_size[1], hidden_dim, bias=bias)

    def whiten_(self, images: torch.Tensor, eps: float = 5e-4, transform=None) -> tuple[int, int]:
        """Airbench's whitening initialisation of the first convolution (:func:`whiten_conv_`) on ``images``;
        returns (filters set, filters)."""
        conv = self.stem[0] if self.style == "conv_stem" else self.proj if self.style == "conv" else None
        if conv is None:
            raise ConfigError("whiten_stem needs a convolutional patch embedding (patch_embed: conv or conv_stem), "
                              f"not {self.style!r}")
        return whiten_conv_(conv, images, eps=eps, transform=transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "conv":
            return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        if self.style == "conv_stem":
            if self.channels_last:  # the (B, D, h, w) output is then NHWC too, so (B, N, D) comes out contiguous
                x = x.contiguous(memory_format=torch.channels_last)
            return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, D, h, w) -> (B, N, D)
        if self.style == "shifted":
            return self.proj(self.norm(shifted_patches(x, self.patch_size)))
        patches = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size)  # (B, C*ph*pw, N)
        return self.proj(patches.transpose(1, 2))  # (B, N, C*ph*pw) -> (B, N, D)


WHITEN_IMAGES = 5000  # airbench's whitening sample: the first 5000 training images (whiten_stem, the teacher)


@torch.no_grad()
def whiten_conv_(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4, transform=None) -> tuple[int, int]:
    """Airbench's whitening initialisation (Keller Jordan's CIFAR-10 speedruns): ``conv``'s filters become the
    eigenvectors of the (uncentred) covariance of the patches it sees in ``images`` (model inputs,
    ``(B, C, H, W)`` float, or what ``transform`` makes of each slice of them, e.g. uint8 images and their
    :class:`~vitlab.data.Preprocess`), each divided by the square root of its eigenvalue + ``eps``, in pairs
    ``v, -v`` from the largest eigenvalue down, as many as the layer has filters (the rest keep theirs). Its
    outputs on those patches are then uncorrelated, channel ``2i`` with variance ``l_i / (l_i + eps)``; its bias
    (if any) is zeroed for those filters. Returns (filters set, filters)."""
    c, (kh, kw) = conv.in_channels, conv.kernel_size
    dim = c * kh * kw
    cov, count = torch.zeros(dim, dim, dtype=torch.float64), 0
    (sh, sw), (h, w) = conv.stride, images.shape[-2:]
    per_image = max(1, ((h - kh) // sh + 1) * ((w - kw) // sw + 1))
    for chunk in images.split(max(1, 2 ** 20 // per_image)):  # about a million patches at a time
        chunk = (transform(chunk) if transform is not None else chunk).float().cpu()
        # the patches at the layer's stride, inside the image (no padding)
        patches = F.unfold(chunk, (kh, kw), stride=conv.stride).transpose(1, 2).reshape(-1, dim)
        cov += patches.double().T @ patches.double()
        count += len(patches)
    if not count:
        raise ConfigError("whiten_stem: no image patches to whiten on (the training set is empty)")
    values, vectors = torch.linalg.eigh(cov / count)  # ascending
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    filters = (vectors / (values + eps).sqrt()).T  # row i: eigenvector i, scaled
    pairs = torch.stack([filters, -filters], 1).reshape(2 * dim, dim)
    k = min(conv.out_channels, 2 * dim)
    conv.weight[:k] = pairs[:k].reshape(k, c, kh, kw).to(conv.weight)
    if conv.bias is not None:
        conv.bias[:k] = 0
    return k, conv.out_channels


def shifted_patches(x: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """SL-ViT's shifted patches: ``(B, C, H, W) -> (B, N, ph*pw*5C)``, the image and its copies moved half a patch
    left-up, right-up, left-down and right-down (zeros where they leave the frame), pixel-major."""
    (ph, pw), (H, W) = patch_size, x.shape[-2:]
    sh, sw = ph // 2, pw // 2
    padded = F.pad(x, (sw, sw, sh, sh))
    views = torch.cat([x] + [padded[:, :, i:i + H, j:j + W] for i in (0, 2 * sh) for j in (0, 2 * sw)], dim=1)
    B, C5 = views.shape[:2]
    views = views.reshape(B, C5, H // ph, ph, W // pw, pw).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, ph, pw, 5C)
    return views.reshape(B, (H // ph) * (W // pw), ph * pw * C5)


def patch_weight(weight: torch.Tensor, config: ViTConfig, style: str | None = None) -> torch.Tensor:
    """The patchify weight in the layout of ``style`` (default ``config.patch_embed``): a conv kernel
    ``(D, C, ph, pw)`` for ``conv``, that kernel flattened to ``(D, C*ph*pw)`` for ``linear`` (unfold's
    channel-major order, so both give equal outputs). Any other shape (a conv stem's 1x1 kernel, a wrong
    file) passes unchanged, for strict loading to name.
    """
    style = style or config.patch_embed
    d, c, (ph, pw) = config.hidden_dim, config.in_channels, config.patch_size
    if style == "linear" and tuple(weight.shape) == (d, c, ph, pw):
        return weight.reshape(d, c * ph * pw)
    if style == "conv" and tuple(weight.shape) == (d, c * ph * pw):
        return weight.reshape(d, c, ph, pw)
    return weight
