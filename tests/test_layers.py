"""The imports of src/vitlab run downwards only, as the README's Layout section and docs/design.md draw it.

Every module belongs to a layer; it may import its own layer and the layers below it, never a layer above nor
another layer of the same rank (training and explain do not import each other). Only the api imports interop
(foreign formats), and training imports no figures. An import inside a function counts as one at the top of the
file: a lazy import must not hide a loop.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitlab"

# the first name under vitlab/ -> its layer; the layers' ranks, bottom first
LAYER = {"errors": "ground", "_files": "ground", "_device": "ground", "_version": "ground"}
RANKS = {
    "ground": 0, "config": 1,
    "checkpoints": 2,  # vitlab's own files: model, checkpoint and run folders
    "models": 3, "data": 3,  # the network only; images and batches
    "loaded": 4, "metrics": 4,  # a model ready to use (LoadedModel); scores, pure
    "plots": 5,  # every figure
    "evaluation": 6,  # running a model over a split and scoring it
    "training": 7, "explain": 7, "interop": 7,  # the loop; what a trained model learned; foreign formats
    "bench": 8,  # times training's step
    "server": 8,  # vitlab serve: the web page and JSON API over explain's prediction path
    "notebook": 8,  # progress display and the inline result of vitlab.train
    "api": 9, "cli": 10, "package": 11, "__main__": 12,  # api: the verbs; package: vitlab/__init__.py
}


# beyond the ranks: the only layers that may import a layer (besides itself), and imports ranks would allow but
# the design does not (training takes a ready model and draws nothing; evaluation scores, the verbs draw; the
# metrics are pure: no files, no data)
ONLY_FROM = {"interop": {"api"}}
NEVER = {"training": {"interop", "plots"}, "evaluation": {"plots"}, "metrics": {"checkpoints", "data"}}


def _layer(module: str) -> str:
    """``vitlab.training.step`` -> ``training``; ``vitlab`` -> ``package``."""
    parts = module.split(".")
    return "package" if len(parts) == 1 else LAYER.get(parts[1], parts[1])


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str):
    """(line, vitlab module) of every import in the file, at any depth; ``from vitlab.x import y`` gives
    ``vitlab.x``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base]
        else:
            continue
        yield from ((node.lineno, name) for name in names if name == "vitlab" or name.startswith("vitlab."))


def violations(root: Path = SRC) -> list[str]:
    """``file:line: layer imports module (layer)`` for each import that runs against the layers."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module(path, root)
        own = _layer(module)
        for line, target in _imports(path, module):
            other = _layer(target)
            if other != own and (RANKS[other] >= RANKS[own] or other in NEVER.get(own, ())
                                 or own not in ONLY_FROM.get(other, {own})):
                found.append(f"{path.relative_to(root.parent)}:{line}: {own} imports {target} ({other})")
    return found


def test_every_module_has_a_layer():
    layers = {_layer(_module(p, SRC)) for p in SRC.rglob("*.py")}
    assert layers <= set(RANKS), sorted(layers - set(RANKS))


def test_imports_run_downwards_only():
    assert violations() == []


@pytest.mark.parametrize("source, target", [
    ("models/vit.py", "vitlab.data"), ("training/engine.py", "vitlab.explain"), ("training/step.py", "vitlab.bench"),
    ("explain/report.py", "vitlab.training"), ("interop/hf.py", "vitlab.training"), ("data/specs.py", "vitlab.cli"),
    ("checkpoints.py", "vitlab.models"), ("config.py", "vitlab"), ("server/app.py", "vitlab.api"),
    ("server/model.py", "vitlab.bench"), ("loaded.py", "vitlab.evaluation"), ("metrics.py", "vitlab.data"),
    ("training/engine.py", "vitlab.interop"), ("training/step.py", "vitlab.plots"), ("evaluation.py", "vitlab.plots"),
    ("explain/predict.py", "vitlab.interop"), ("server/app.py", "vitlab.interop"), ("cli/commands.py", "vitlab.interop"),
])
def test_the_check_names_an_import_against_the_layers(tmp_path, source, target):
    """A copy of the package with one upward import added inside a function: the check names exactly that one."""
    copy = tmp_path / "vitlab"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    file = copy / source
    lines = len(file.read_text(encoding="utf-8").splitlines())
    file.write_text(file.read_text(encoding="utf-8") + f"\n\ndef _late():\n    import {target}  # noqa\n")
    assert violations(copy) == [f"vitlab/{source}:{lines + 4}: {_layer(_module(file, copy))} imports {target} "
                                f"({_layer(target)})"]


def _modules_after(code: str, env: dict | None = None) -> tuple[set[str], str]:
    """The top-level modules a fresh interpreter holds after running ``code``, and what it printed."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(sorted({m.split('.')[0] for m in "
                          "sys.modules}))"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    *printed, modules = out.stdout.strip().splitlines()
    return set(ast.literal_eval(modules)), "\n".join(printed)


WEB = {"starlette", "uvicorn", "multipart", "python_multipart"}


def test_import_vitlab_loads_neither_the_web_stack_nor_matplotlib_and_its_names_load_on_use():
    modules, _ = _modules_after("import vitlab")
    assert not modules & (WEB | {"matplotlib", "torch", "PIL"})
    modules, printed = _modules_after("import vitlab\nfrom vitlab import train, ViTConfig, serve\n"
                                      "print(train.__module__, ViTConfig.__module__, serve.__module__)")
    assert printed == "vitlab.api.runs vitlab.config vitlab.api.explain" and "torch" in modules
    assert not modules & (WEB | {"matplotlib"}) and "vitlab" in modules  # serve loads the web stack when called


def test_vitlab_version_imports_no_torch():
    modules, printed = _modules_after("from vitlab.cli import main\nmain(['--version'])")
    assert printed == f"vitlab {vitlab_version()}" and "torch" not in modules


def vitlab_version() -> str:
    from vitlab._version import __version__
    return __version__


def test_without_the_web_packages_serve_says_what_to_install_in_one_line_and_the_rest_works():
    blocked = f"import sys\nfor m in {sorted(WEB)}:\n    sys.modules[m] = None\n"
    out = subprocess.run([sys.executable, "-c", blocked + "from vitlab.cli import main\n"
                          "raise SystemExit(main(['serve', 'runs/x']))"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert re.fullmatch(r'vitlab: error: vitlab serve needs the web packages \((starlette|uvicorn) is not installed\): '
                        r'pip install "vitlab\[serve\]"\n', out.stderr), out.stderr
    modules, printed = _modules_after(blocked + "from vitlab.cli import main\nmain(['models', '--json'])\n"
                                      "import vitlab\ntry:\n    vitlab.serve('runs/x')\nexcept ImportError as e:\n"
                                      "    print(type(e).__name__)")
    assert printed.splitlines()[0].startswith('{"name": ') and printed.splitlines()[-1] == "MissingExtraError"


# vitlab's own file names; the foreign formats' files of the same name (a Hugging Face folder's config.json and
# model.safetensors, a saved HF dataset's state.json) are interop's and the HF data source's to name
VITLAB_FILES = ("model.safetensors", "preprocess.json", "state.json", "config.json", "config.yaml", "metrics.jsonl",
                "eval.json", "calibration.json", "optimizer.safetensors", "rng.safetensors", "ema.safetensors",
                "curves.png", "confusion_matrix.png", "reliability.png")
FOREIGN = ("interop", "data/sources/hf.py")


def file_names_outside_checkpoints(root: Path = SRC) -> list[str]:
    """``file:line: name`` for each string in code (docstrings aside) that names a vitlab file, outside
    ``checkpoints.py`` and the foreign formats."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative == "checkpoints.py" or relative.startswith(FOREIGN):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{relative}:{node.lineno}: {name}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  for name in VITLAB_FILES if name in node.value]
    return found


def test_only_the_checkpoints_module_names_vitlabs_files(tmp_path):
    assert file_names_outside_checkpoints() == []
    copy = tmp_path / "vitlab"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    engine = copy / "training" / "engine.py"
    engine.write_text(engine.read_text(encoding="utf-8") + '\n\nLATE = "best/model.safetensors"\n')
    lines = len(engine.read_text(encoding="utf-8").splitlines())
    assert file_names_outside_checkpoints(copy) == [f"training/engine.py:{lines}: model.safetensors"]
