"""Config helpers: key=value overrides parsed as YAML values, unknown fields named, YAML round trip."""

from __future__ import annotations

import pytest

from vitlab.config import (ViTConfig, apply_overrides, config_from_dict, dump_yaml, load_yaml, parse_override,
                           to_dict)
from vitlab.errors import ConfigError


@pytest.mark.parametrize("text,expected", [
    ("lr=3e-4", ("lr", 3e-4)), ("epochs=10", ("epochs", 10)), ("hflip=true", ("hflip", True)),
    ("image_size=[32, 48]", ("image_size", [32, 48])), ("layer_scale=null", ("layer_scale", None)),
    ("model=vit-b16", ("model", "vit-b16")), ("data=folder:/tmp/x", ("data", "folder:/tmp/x")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_apply_overrides_and_errors():
    assert apply_overrides({"a": 1, "b": {"c": 2}}, ["a=5", "b.c=3", "d=x"]) == {"a": 5, "b": {"c": 3}, "d": "x"}
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("lr")
    with pytest.raises(ConfigError, match=r"unknown ViTConfig field 'hiddendim' \(did you mean 'hidden_dim'\?\)"):
        config_from_dict(ViTConfig, {"hiddendim": 3})


def test_yaml_round_trip(tmp_path):
    cfg = ViTConfig(image_size=(32, 48), patch_size=8, hidden_dim=48, num_heads=4, mlp_dim=96, depth=2,
                    num_classes=3, labels=["cat", "dog", "emu"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(to_dict(cfg)))
    assert config_from_dict(ViTConfig, load_yaml(path)) == cfg
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_yaml(tmp_path / "missing.yaml")
