"""The MLP activation of a timm ViT, which its weights cannot tell, read from what names the architecture: real
timm models (tests/fixtures/make_timm_fixtures.py: OpenAI CLIP's QuickGELU, SigLIP's tanh GELU) load with parity."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from vitlab._files import load_safetensors
from vitlab.interop import detect_format, load_pretrained, read_pretrained
from vitlab.interop.timm import TIMM_ACTIVATIONS, timm_activation

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "timm"
CASES = {"clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", "quick_gelu"),
         "siglip_gelu_tanh": ("vit_base_patch32_siglip_256", "gelu_tanh")}


@pytest.fixture(scope="module")
def expected():
    return load_safetensors(FIXTURES / "expected.safetensors")


def _logits(model, images):
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("key", CASES)
def test_a_timm_hub_folder_loads_with_its_activation_and_normalisation(key, expected):
    arch, activation = CASES[key]
    folder = FIXTURES / key
    assert detect_format(folder) == "timm"
    found = read_pretrained(folder)  # no override: config.json names the architecture
    assert found.format == "timm" and found.model.config.mlp_activation == activation
    torch.testing.assert_close(_logits(found.model, expected["images"]), expected[key], atol=1e-5, rtol=0)
    assert found.normalization is not None and len(found.normalization[0]) == 3  # pretrained_cfg's mean/std


@pytest.mark.parametrize("key", CASES)
def test_a_state_dict_named_after_its_architecture_loads_with_its_activation(key, expected, tmp_path):
    arch, activation = CASES[key]
    model = load_pretrained(FIXTURES / f"{arch}.safetensors", num_heads=2)
    assert model.config.mlp_activation == activation
    torch.testing.assert_close(_logits(model, expected["images"]), expected[key], atol=1e-5, rtol=0)
    tagged = shutil.copy(FIXTURES / f"{arch}.safetensors", tmp_path / f"{arch}.openai.safetensors")  # a hub tag
    assert load_pretrained(tagged, num_heads=2).config.mlp_activation == activation


def test_an_anonymous_state_dict_says_what_it_assumed_and_an_override_fixes_it(expected, tmp_path, caplog):
    arch, _ = CASES["clip_quickgelu"]
    anonymous = shutil.copy(FIXTURES / f"{arch}.safetensors", tmp_path / "weights.safetensors")
    with caplog.at_level(logging.WARNING, logger="vitlab.interop.timm"):
        plain = load_pretrained(anonymous, num_heads=2)
    assert plain.config.mlp_activation == "gelu" and "mlp_activation='quick_gelu'" in caplog.text
    off = (_logits(plain, expected["images"]) - expected["clip_quickgelu"]).abs().max()
    assert off > 1e-2  # GELU in place of QuickGELU is visibly wrong: why the table and the warning exist
    fixed = load_pretrained(anonymous, num_heads=2, mlp_activation="quick_gelu")
    torch.testing.assert_close(_logits(fixed, expected["images"]), expected["clip_quickgelu"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", CASES)
def test_the_parity_checks_tell_the_activations_apart(key, expected):
    arch, activation = CASES[key]
    wrong = load_pretrained(FIXTURES / f"{arch}.safetensors", num_heads=2, mlp_activation="gelu")
    assert (_logits(wrong, expected["images"]) - expected[key]).abs().max() > 1e-3  # 100x the tolerance above


def test_the_table_names_only_timm_architectures_of_the_two_other_activations():
    assert set(TIMM_ACTIVATIONS.values()) == {"quick_gelu", "gelu_tanh"}
    assert all("quickgelu" in name for name, act in TIMM_ACTIVATIONS.items() if act == "quick_gelu")
    assert timm_activation("vit_base_patch16_siglip_224") is None  # timm builds this SigLIP with exact GELU
    assert timm_activation("vit_so400m_patch16_siglip_384.v2_webli.safetensors") == "gelu_tanh"
    assert timm_activation("vit_base_patch16_clip_quickgelu_2240") is None  # a prefix alone is not the name
