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


def test_a_recipe_file_reads_numbers_as_the_command_line_does(tmp_path):
    from vitlab.config import load_train_config

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("lr: 1e-3\nmin_lr: 1e-5\nweight_decay: 5.0e-2\nwarmup_epochs: 2\nbetas: [0.9, 0.95]\n")
    config = load_train_config(recipe)
    assert (config.lr, config.min_lr, config.weight_decay, config.warmup_epochs) == (1e-3, 1e-5, 0.05, 2)
    assert config.lr == load_train_config(None, ["lr=1e-3"]).lr
    assert parse_override("note=1e-3x") == ("note", "1e-3x")  # not a number: still text


def test_only_true_and_false_are_booleans_as_in_yaml_1_2():
    from vitlab.config import load_train_config, parse_yaml

    assert parse_yaml("[true, False, TRUE, yes, no, on, off, y, n]") == [True, False, True, "yes", "no", "on", "off",
                                                                           "y", "n"]
    assert load_train_config(None, ["calibrate=true"]).calibrate is True
    with pytest.raises(ConfigError, match=r"^TrainConfig.calibrate='yes' must be true or false$"):
        load_train_config(None, ["calibrate=yes"])
    assert parse_override("recipe=no") == ("recipe", "no")  # a name, not False


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    import json

    from vitlab import VisionTransformer, create_model

    folder = create_model("vit-digits-p2", depth=1).save_pretrained(tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    data["hidden_dim"] = "128"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"model/config.json: ViTConfig.hidden_dim='128' must be a positive integer"):
        VisionTransformer.from_pretrained(folder)
    with pytest.raises(ConfigError, match=r"^ViTConfig.hidden_dim='128'"):  # no file: the field alone
        config_from_dict(ViTConfig, {"hidden_dim": "128"})
