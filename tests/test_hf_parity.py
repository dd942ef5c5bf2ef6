"""Parity with Hugging Face's ViT: same weights, same logits (1e-5) and the same attention probabilities."""

from __future__ import annotations

import pytest
import torch

from vitlab import VisionTransformer
from vitlab.interop.hf import convert_hf_state_dict, vit_config_from_hf

transformers = pytest.importorskip("transformers")


def hf_model(**kw):
    cfg = transformers.ViTConfig(**kw)
    cfg._attn_implementation = "eager"  # the path that returns attention probabilities
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    # HF initialises biases and norms to constants; randomise everything so the mapping is really tested.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


CASES = {
    "rgb": dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=3,
                num_attention_heads=4, intermediate_size=96, num_labels=7),
    "gray-nobias": dict(image_size=28, patch_size=7, num_channels=1, hidden_size=36, num_hidden_layers=2,
                        num_attention_heads=3, intermediate_size=60, num_labels=10, qkv_bias=False,
                        layer_norm_eps=1e-6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_attentions_match_hugging_face(case):
    hf = hf_model(**CASES[case])
    config = vit_config_from_hf(hf.config)
    assert config.in_channels == CASES[case]["num_channels"]
    model = VisionTransformer(config).eval()
    model.load_state_dict(convert_hf_state_dict(hf.state_dict(), config), strict=True)

    torch.manual_seed(1)
    x = torch.randn(3, config.in_channels, *config.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True, output_hidden_states=True)
        fused = model(x)
        out = model(x, return_attentions=True, return_hidden_states=True)

    torch.testing.assert_close(fused, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    assert len(out.attentions) == len(ref.attentions) == config.depth
    for ours, theirs in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_interpolated_positions_match_hugging_face():
    """Fine-tuning at a new resolution: our bicubic grid resize equals HF's interpolate_pos_encoding."""
    hf = hf_model(**CASES["rgb"])
    config = vit_config_from_hf(hf.config)
    model = VisionTransformer(config).eval()
    model.load_state_dict(convert_hf_state_dict(hf.state_dict(), config))
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).logits
        ours = model(x, interpolate_pos_encoding=True)
        model.resize_image_size((48, 64))
        resized = model(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(resized, ref, rtol=0, atol=1e-5)
