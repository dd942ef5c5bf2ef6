"""The ``vitlab`` command: parses arguments, calls the Python API, formats output and errors.

Each subcommand is a ``cmd_*`` function over a public function a notebook can call the same way.
A :class:`~vitlab.errors.VitlabError` is printed in one or two lines and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from vitlab.errors import VitlabError


def _fmt_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    """Print the presets: name, image size, patch, layers, hidden, heads, parameters, GFLOPs per image."""
    from vitlab.models import PRESETS, create_model, get_config

    rows = []
    for name, preset in PRESETS.items():
        cfg = get_config(name)
        with _meta_device():
            params = create_model(cfg).num_parameters()
        rows.append(dict(name=name, image_size=list(cfg.image_size), patch=list(cfg.patch_size), layers=cfg.depth,
                         hidden=cfg.hidden_dim, heads=cfg.num_heads, params=params,
                         gflops=cfg.flops_per_image() / 1e9, description=preset.description))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = f"{'name':<24}{'image':>9}{'patch':>7}{'layers':>8}{'hidden':>8}{'heads':>7}{'params':>14}{'GFLOPs':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        h, w = r["image_size"]
        ph, pw = r["patch"]
        image = f"{h}" if h == w else f"{h}x{w}"
        patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
        print(f"{r['name']:<24}{image:>9}{patch:>7}{r['layers']:>8}{r['hidden']:>8}{r['heads']:>7}"
              f"{r['params']:>14,}{r['gflops']:>10.3f}")
    return 0


class _meta_device:
    """Build models on the meta device: counting ViT-H/14's parameters should not allocate 2.5 GB."""

    def __enter__(self):
        import torch

        self._ctx = torch.device("meta")
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time training steps or inference batches of a preset; print images/s, FLOP/s and utilisation."""
    from vitlab.bench import benchmark, format_result

    result = benchmark(args.model, batch=args.batch, mode=args.mode, precision=args.precision,
                       compile=args.compile, device=args.device, repeats=args.repeats, warmup=args.warmup,
                       threads=args.threads, gradient_checkpointing=args.gradient_checkpointing,
                       measure_memory=not args.no_memory, check_syncs=args.check_syncs, augment=args.augment)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers that train well.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the model presets")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="time training steps or inference of a model: images/s, FLOP/s, utilisation")
    p.add_argument("--model", required=True, help="preset name (see `vitlab models`)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast precision (default: bf16 where the device has fast bf16 matmul, else fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time reported apart)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; images/s is their median (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--check-syncs", action="store_true", help="GPU: fail on a host-device sync in a step")
    p.add_argument("--augment", action="store_true",
                   help="train: include vitlab.data's on-device augmentation (DeiT recipe) in each step")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_bench)

    return parser


def _version() -> str:
    from vitlab import __version__

    return f"vitlab {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitlab`` console script and ``python -m vitlab``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    import logging

    logging.basicConfig(level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
                        format="%(message)s")
    try:
        return int(func(args) or 0)
    except VitlabError as e:
        print(f"vitlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
