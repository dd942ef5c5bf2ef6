"""Hugging Face folders of today's pretrained families against ``transformers`` models built from their configs
with random weights (nothing is downloaded): DeiT (with teacher, without, bare), DINOv2 (with registers too),
CLIP's image tower (with projection, inside a full CLIPModel), SigLIP's (and a full SiglipModel). Outputs equal
to 1e-5, attention probabilities and hidden states where the peer returns them; the export loads back in
transformers with equal outputs; the families vitlab cannot express are refused by name."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import randomise

transformers = pytest.importorskip("transformers")

from vitlab import CheckpointError, ConfigError, ViTConfig, VisionTransformer  # noqa: E402
from vitlab.interop import detect_format, export_hf, load_pretrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

T = transformers
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _eager(model):
    model.config._attn_implementation = "eager"  # the path that returns attention probabilities
    for sub in ("vision_config", "text_config"):
        if hasattr(model.config, sub):
            getattr(model.config, sub)._attn_implementation = "eager"
    return model


# name -> (the transformers model, the output vitlab's model(x) gives)
MODELS = {
    "deit-with-teacher": (lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**SMALL, intermediate_size=64,
                                                                                       num_labels=3)), "logits"),
    "deit-classifier": (lambda: T.DeiTForImageClassification(T.DeiTConfig(**SMALL, intermediate_size=64,
                                                                           num_labels=3)), "logits"),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, mlp_ratio=2)), "pooler_output"),
    "dinov2-registers": (lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        **SMALL, mlp_ratio=2, num_register_tokens=3)), "pooler_output"),
    "clip-vision": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, intermediate_size=64)), "pooler_output"),
    "clip-vision-projection": (lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(
        **SMALL, intermediate_size=64, projection_dim=16)), "image_embeds"),
    "siglip-vision": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, intermediate_size=64)),
                      "pooler_output"),
}
EXPECTED = {
    "deit-with-teacher": dict(distillation_token=True, distillation_head=True, num_classes=3),
    "deit-classifier": dict(distillation_token=True, distillation_head=False, num_classes=3),
    "dinov2": dict(layer_scale=1.0, mlp_dim=64, norm_eps=1e-6, num_classes=0),
    "dinov2-registers": dict(register_tokens=3, pos_embed_patches_only=True, pos_resize_antialias=True),
    "clip-vision": dict(norm_before_blocks=True, patch_embed_bias=False, mlp_activation="quick_gelu",
                        projection_dim=None, norm_eps=1e-5),
    "clip-vision-projection": dict(projection_dim=16),
    "siglip-vision": dict(class_token=False, pool="map", mlp_activation="gelu_tanh"),
}
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _saved(name, tmp_path, seed=0):
    make, output = MODELS[name]
    hf = _eager(randomise(make(), seed=seed))
    hf.save_pretrained(tmp_path / name)
    return hf, output, tmp_path / name


@pytest.mark.parametrize("name", MODELS)
def test_folder_gives_the_outputs_attentions_and_hidden_states_of_its_model(tmp_path, name):
    hf, output, folder = _saved(name, tmp_path, seed=len(name))
    assert detect_format(folder) == "hf"
    model = load_pretrained(folder)
    for field, value in EXPECTED[name].items():
        assert getattr(model.config, field) == value, field
    with torch.no_grad():
        ref = hf(pixel_values=X, output_attentions=True, output_hidden_states=True)
        out = model(X, return_attentions=True, return_hidden_states=True)
        torch.testing.assert_close(model(X), getattr(ref, output), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, getattr(ref, output), atol=1e-5, rtol=0)
    assert len(out.attentions) == len(ref.attentions) == 2
    for ours, theirs in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3  # registers included, as Hugging Face's
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_a_full_image_text_model_gives_its_image_tower(tmp_path, name):
    if name == "clip":
        hf = T.CLIPModel(T.CLIPConfig(vision_config=dict(**SMALL, intermediate_size=64), text_config=TEXT,
                                      projection_dim=16))
    else:
        hf = T.SiglipModel(T.SiglipConfig(vision_config=dict(**SMALL, intermediate_size=64), text_config=TEXT))
    randomise(hf, seed=4).save_pretrained(tmp_path / name)
    model = load_pretrained(tmp_path / name)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=X)
        torch.testing.assert_close(model(X), getattr(ref, "pooler_output", ref), atol=1e-5, rtol=0)
    assert model.config.projection_dim == (16 if name == "clip" else None)


def test_deit_bare_model_reads_the_class_token(tmp_path):
    hf = randomise(T.DeiTModel(T.DeiTConfig(**SMALL, intermediate_size=64)), seed=2)
    hf.save_pretrained(tmp_path / "deit")
    model = load_pretrained(tmp_path / "deit")  # the pooler (Linear + tanh of the class token) is Hugging Face's own
    assert model.config.num_classes == 0 and not model.config.distillation_head
    with torch.no_grad():
        out = hf(pixel_values=X).last_hidden_state
        torch.testing.assert_close(model.forward_features(X), out, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(X), out[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["dinov2", "dinov2-registers"])
def test_dinov2_position_grid_is_interpolated_as_hugging_face_does(tmp_path, name):
    # Dinov2 resizes plain bicubic, Dinov2WithRegisters antialiased: each model knows its own way.
    hf, _, folder = _saved(name, tmp_path, seed=6)
    model = load_pretrained(folder)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = hf(pixel_values=x).pooler_output
        torch.testing.assert_close(model(x, interpolate_pos_encoding=True), ref, atol=1e-5, rtol=0)
        model.resize_image_size(48)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["deit-with-teacher", "deit-classifier", "dinov2", "dinov2-registers",
                                  "clip-vision", "clip-vision-projection", "siglip-vision"])
def test_export_loads_in_transformers_with_equal_outputs(tmp_path, name):
    hf, output, folder = _saved(name, tmp_path, seed=8)
    model = load_pretrained(folder)
    export_hf(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [type(hf).__name__]
    again = getattr(T, written["architectures"][0]).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(getattr(again(pixel_values=X), output), getattr(hf(pixel_values=X), output),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(load_pretrained(tmp_path / "out")(X), model(X), atol=1e-6, rtol=0)


def test_fine_tuned_deit_exports_as_the_classifier_without_teacher(tmp_path):
    hf, _, folder = _saved("deit-with-teacher", tmp_path, seed=9)
    model = load_pretrained(folder)
    model.reset_classifier(2, labels=["cat", "dog"])
    assert model.head_dist is None and not model.config.distillation_head and model.config.distillation_token
    export_hf(model, tmp_path / "out")
    again = T.DeiTForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert again.config.id2label == {0: "cat", 1: "dog"}
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=X).logits, model(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, family, word", [
    (dict(layer_scale=0.1), "ViT", "layer_scale (Hugging Face's ViT and DeiT have none; its DINOv2 takes a "
                                    "layer-scale backbone without a head: reset_classifier(0) first)"),
    (dict(pos_embed_patches_only=True), "ViT", "pos_embed_patches_only=True"),
    (dict(register_tokens=2), "ViT", "register_tokens=2"),
    (dict(distillation_token=True, layer_scale=0.1), "DeiT", "layer_scale"),
    (dict(norm_before_blocks=True, patch_embed_bias=False), "CLIP", "a classifier (Hugging Face's CLIP"),
    (dict(class_token=False, pool="map"), "SigLIP", "a classifier"),
    (dict(class_token=False, pool="map", num_classes=0, patch_embed_bias=False), "SigLIP", "patch_embed_bias=False"),
    (dict(layer_scale=0.1, num_classes=0, register_tokens=2), "DINOv2 with registers",
     "pos_embed_patches_only=False"),
])
def test_export_refuses_what_the_family_cannot_express_by_name(tmp_path, change, family, word):
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=4, mlp_dim=64, num_classes=3)
    with pytest.raises(ConfigError, match=re.escape(f"cannot export to a Hugging Face {family} folder: {word}")):
        export_hf(VisionTransformer(cfg.replace(**change)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_families_vitlab_cannot_express_are_refused_by_model_type(tmp_path):
    T.BeitModel(T.BeitConfig(**SMALL, intermediate_size=64)).save_pretrained(tmp_path / "beit")
    message = r"beit: a Hugging Face BEiT \(relative position bias\) folder \(config.json model_type 'beit'\), " \
              r"which vitlab cannot express"
    with pytest.raises(CheckpointError, match=message):
        detect_format(tmp_path / "beit")
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path / "beit", format="hf")


@pytest.mark.parametrize("make, word", [
    (lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**SMALL, mlp_ratio=2, num_labels=3)),
     "Dinov2ForImageClassification, whose classifier reads the class token and the mean patch token side by side"),
    (lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, mlp_ratio=2, use_swiglu_ffn=True)),
     "use_swiglu_ffn=true \\(DINOv2 giant's SwiGLU MLP\\)"),
])
def test_heads_and_mlps_vitlab_cannot_express_are_refused(tmp_path, make, word):
    make().save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=word):
        load_pretrained(tmp_path / "m")
