"""The command line: the output of `vitlab models`, and `python -m vitlab`."""

from __future__ import annotations

import json
import subprocess
import sys

from vitlab.cli import main


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "image", "patch", "layers", "hidden", "heads", "params", "GFLOPs"]
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert rows["vit-b16"] == ["vit-b16", "224", "16", "12", "768", "12", "86,567,656", "35.128"]
    assert rows["vit-h14"][6] == "632,045,800"
    assert rows["vit-cifar-showcase-p8"][6] == "847,626"


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    l16 = next(r for r in rows if r["name"] == "vit-l16")
    assert l16["params"] == 304_326_632 and l16["image_size"] == [224, 224] and "Table 1" in l16["description"]


def test_python_dash_m_runs_the_cli():
    ok = subprocess.run([sys.executable, "-m", "vitlab", "models"], capture_output=True, text=True)
    assert ok.returncode == 0 and "vit-l32" in ok.stdout
