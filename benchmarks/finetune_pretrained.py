"""Fine-tuning weights that have learned something, against training from scratch, at the same wall time.

Nothing can be downloaded here, so the pretrained weights are made here: a small pure ViT (vit-cifar-p4,
which timm and Hugging Face can express) is trained with vitlab on CIFAR-10 (`../shared/data`), exported as a
timm state dict and as a Hugging Face folder, and each export is fine-tuned with `vitlab finetune` on the
fruit photos at 48 px instead of 32 (the position grid is resized from 8x8 to 12x12), beside the same
architecture trained from scratch at 48 px for the same minutes. Twice: on the whole fruit training split, and
on 10 photos a class (batch 16 there). Every step is a `vitlab` command, printed before it runs.

    PYTHONPATH=src python benchmarks/finetune_pretrained.py                      # ~25 min on 2 CPU cores
    PYTHONPATH=src python benchmarks/finetune_pretrained.py --pretrain-minutes 2 --finetune-minutes 0.3  # a try

Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_ROOT, _unpack_cifar, machine  # noqa: E402  (the same data copies and machine line)


def vitlab(*args: str) -> None:
    """Run one `vitlab` command, printed first, as a user would type it."""
    command = ["vitlab", *args]
    print("$ " + " ".join(shlex.quote(a) for a in command), flush=True)
    subprocess.run([sys.executable, "-m", "vitlab", *args], check=True)


def few_shot(fruits: Path, dest: Path, per_class: int) -> Path:
    """A folder dataset with the first ``per_class`` training photos of each class and the whole test split
    (symbolic links, nothing copied)."""
    if dest.exists():
        return dest
    for split in ("Train", "Test"):
        for class_dir in sorted(p for p in (fruits / split).iterdir() if p.is_dir()):
            photos = sorted(class_dir.iterdir())
            target = dest / split / class_dir.name
            target.mkdir(parents=True)
            for photo in photos[:per_class] if split == "Train" else photos:
                (target / photo.name).symlink_to(photo.resolve())
    return dest


def curve(run: Path) -> list[tuple[float, float]]:
    """(minutes, test top-1 %) of each evaluated epoch of a run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["wall_time"] / 60, 100 * r["top1"]) for r in rows if r.get("top1") is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vitlab")
    parser.add_argument("--work", type=Path, default=Path("runs/finetune-pretrained"))
    parser.add_argument("--pretrain-minutes", type=float, default=15.0)
    parser.add_argument("--finetune-minutes", type=float, default=1.0)
    parser.add_argument("--per-class", type=int, default=10, help="photos a class in the few-shot split")
    parser.add_argument("--image-size", type=int, default=48, help="fine-tuning size (pretraining: 32)")
    args = parser.parse_args()
    work, size = args.work, str(args.image_size)
    work.mkdir(parents=True, exist_ok=True)
    cifar = _unpack_cifar(args.data_root, args.cache_dir)
    fruits = args.data_root / "fruits360-subset"
    print(f"machine: {machine()}", flush=True)

    pretrained = work / "cifar10-vit-cifar-p4"
    if not (pretrained / "last").is_dir():
        vitlab("train", "--recipe", "cifar10-cpu", "--data", f"folder:{cifar}", "--model", "vit-cifar-p4",
               "--set", f"time_limit_minutes={args.pretrain_minutes}", "--set", "tta_hflip=false",
               "--set", "eval_every=1", "--out", str(pretrained), "--quiet")
    vitlab("export", str(pretrained), "--format", "timm", "--out", str(work / "pretrained-timm.safetensors"))
    vitlab("export", str(pretrained), "--format", "hf", "--out", str(work / "pretrained-hf"))

    budget = ["--set", f"time_limit_minutes={args.finetune_minutes}", "--set", "epochs=200",
              "--set", f"image_size={size}", "--set", "eval_every=1", "--quiet"]
    datasets = {"all photos": fruits, f"{args.per_class} photos a class":
                few_shot(fruits, work / f"fruits-{args.per_class}-a-class", args.per_class)}
    results = {}
    for name, data in datasets.items():
        tag = "all" if name == "all photos" else "few"
        runs = {
            "timm file, fine-tuned": ["finetune", str(work / "pretrained-timm.safetensors"),
                                      "--set", "model_overrides.num_heads=4"],  # a timm file holds no head count
            "Hugging Face folder, fine-tuned": ["finetune", str(work / "pretrained-hf")],
            "from scratch": ["train", "--model", "vit-cifar-p4"],
        }
        for label, command in runs.items():
            out = work / f"{tag}-{label.split(',')[0].split()[0].lower()}"
            batch = [] if tag == "all" else ["--set", "batch_size=16"]  # the few-shot split holds 60 photos
            if not (out / "eval.json").is_file():
                vitlab(*command, "--recipe", "fruits", "--data", f"folder:{data}", *budget, *batch, "--out", str(out))
            results[(name, label)] = curve(out)
    pre = curve(pretrained)
    print(f"\npretraining: vit-cifar-p4 on CIFAR-10, {pre[-1][0]:.1f} min, test top-1 {pre[-1][1]:.2f}%")
    print(f"fine-tuning at {size} px on the fruits ({args.finetune_minutes:g} min each), test top-1 after each "
          "epoch (minutes: %):")
    for (name, label), points in results.items():
        shown = ", ".join(f"{m:.2f}: {a:.1f}" for m, a in points[:6]) + (" ..." if len(points) > 6 else "")
        print(f"  {name:<18} {label:<32} final {points[-1][1]:6.2f}% at {points[-1][0]:.2f} min  ({shown})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
