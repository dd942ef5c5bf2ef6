"""The ``vitlab`` commands: one ``cmd_*`` function a subcommand, each over a public function a notebook can call
the same way, and :func:`build_parser`. :func:`vitlab.cli.main` runs them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vitlab._device import PRECISIONS
from vitlab._version import __version__
from vitlab.api import (calibrate, convert, evaluate, export, list_recipes, load, plot_attention, plot_run, predict,
                        read_pretrained, resume_config, serve, train, write_report)
from vitlab.api.explain import format_table
from vitlab.api.tools import (BEST, CONFIG_JSON, CONFIG_YAML, CONFUSION, EVAL, LAST, PREPROCESS, WEIGHTS, Limits, ProgressBar, benchmark, cache_files, clear_cache, data_kinds_help,
                              dataset_info, default_cache_dir, download_dataset, format_result, model_table, pack)
from vitlab.config import apply_overrides, load_train_config, parse_override


def cmd_models(args: argparse.Namespace) -> int:
    """Print the presets: name, image size, patch (+ "stem": a convolutional stem), layers, hidden, heads,
    parameters, GFLOPs per image."""
    rows = model_table()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = f"{'name':<24}{'image':>9}{'patch':>10}{'layers':>8}{'hidden':>8}{'heads':>7}{'params':>14}{'GFLOPs':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        h, w = r["image_size"]
        ph, pw = r["patch"]
        image = f"{h}" if h == w else f"{h}x{w}"
        patch = (f"{ph}" if ph == pw else f"{ph}x{pw}") + (" stem" if r["patch_embed"] == "conv_stem" else "")
        print(f"{r['name']:<24}{image:>9}{patch:>10}{r['layers']:>8}{r['hidden']:>8}{r['heads']:>7}"
              f"{r['params']:>14,}{r['gflops']:>10.3f}")
    return 0


def _load_overrides(args: argparse.Namespace) -> dict:
    return dict(parse_override(text) for text in (args.set or []))


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert any supported checkpoint to a vitlab save_pretrained folder."""
    found = read_pretrained(args.checkpoint, format=args.format, num_heads=args.num_heads, **_load_overrides(args))
    out = convert(found, args.out)
    c = found.model.config
    size = lambda hw: str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"  # noqa: E731
    print(f"{args.checkpoint} ({found.format}) -> {out}: {c.depth} layers, hidden {c.hidden_dim}, "
          f"{c.num_heads} heads, patch {size(c.patch_size)}, image {size(c.image_size)}, {c.num_classes} classes")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a checkpoint (any format vitlab.load reads) to ONNX or a Hugging Face folder."""
    loaded = load(args.checkpoint, format=args.input_format, num_heads=args.num_heads)
    out = export(loaded, args.out, format=args.format)  # with its fitted temperature, where the format can
    print(f"{args.checkpoint} -> {out} ({args.format})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """``vitlab finetune CHECKPOINT --data SPEC ...`` is ``vitlab train --init CHECKPOINT --data SPEC ...``:
    the head is replaced for the data's classes and the positions resized to ``--set image_size=N``."""
    from vitlab.cli import main

    return main(["train", "--init", str(args.checkpoint), *args.train_args])


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes for image files and folders; a table or JSON lines. Exit 1 if a file could not be read."""
    results = predict(args.checkpoint, args.paths, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        print(format_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"vitlab: skipped {r.error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_attention(args: argparse.Namespace) -> int:
    """One figure of attention maps over the images; exit 1 if a file could not be read."""
    items = plot_attention(args.checkpoint, args.paths, args.output, method=args.method, heads=args.heads,
                           head_fusion=args.head_fusion, discard_ratio=args.discard_ratio, data=args.data,
                           num_images=args.num_images, dpi=args.dpi)
    failed = [i for i in items if i.error]
    for i in items:
        if not i.error:
            true = f"  (true: {i.true_label})" if i.true_label is not None else ""
            print(f"{i.name}: {i.label} {i.probability:.1%}{true}")
    for i in failed:
        print(f"vitlab: skipped {i.error}", file=sys.stderr)
    print(f"wrote {args.output}")
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML report of a training run."""
    path = write_report(args.run, args.output, num_images=args.num_images, method=args.method,
                        checkpoint=args.checkpoint)
    print(f"wrote {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The web page and JSON API over a trained model, until Ctrl-C."""
    limits = Limits(max_bytes=int(args.max_upload_mb * 2**20), max_files=args.max_files, max_pixels=args.max_pixels)
    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, limits=limits)
    return 0


def cmd_data_cache(args: argparse.Namespace) -> int:
    """List (or with --clear delete) the decoded-image cache files of folder datasets."""
    where = args.cache_dir or str(default_cache_dir())
    if args.clear:
        removed, freed = clear_cache(args.cache_dir)
        print(f"removed {removed} cache file{'s' if removed != 1 else ''} ({freed / 2**20:.1f} MiB) from {where}")
        return 0
    files = cache_files(args.cache_dir)
    for path, size in files:
        print(f"{size / 2**20:10.1f} MiB  {path}")
    total = sum(size for _, size in files)
    print(f"{len(files)} cache file{'s' if len(files) != 1 else ''}, {total / 2**20:.1f} MiB in {where}/images"
          f"{' (vitlab data cache --clear deletes them)' if files else ''}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    """Print a dataset's images per split, classes, image size and channels (``vitlab.data.dataset_info``)."""
    info = dataset_info(args.spec, image_size=args.image_size, channels=args.channels,
                        val_fraction=args.val_fraction, seed=args.seed, cache_dir=args.cache_dir,
                        skip_bad_files=args.skip_bad_files, workers=args.workers)
    if args.json:
        print(json.dumps(info))
        return 0
    h, w = info["image_size"]
    print(f"dataset   {info['name']}  ({info['spec']})")
    print("images    " + ", ".join(f"{k} {v:,}" for k, v in info["splits"].items()))
    print(f"size      {h}x{w}, {info['channels']} channel{'s' if info['channels'] > 1 else ''}")
    print("mean/std  " + ", ".join(f"{m:.4f}" for m in info["mean"]) + " / "
          + ", ".join(f"{s:.4f}" for s in info["std"]))
    counts = info["class_counts"]["train"]
    names = ", ".join(f"{c} ({n})" for c, n in zip(info["classes"], counts))
    print(f"classes   {len(info['classes'])}: {names}")
    for split, source in info["sources"].items():
        where = {"memory": "in memory", "memory map": f"memory map {source.get('path')}",
                 "shards": f"{source.get('shards')} shards"}[source["kind"]]
        print(f"{'pixels' if split == 'train' else '':<9} {split}: {where} ({source['bytes'] / 2**20:,.1f} MiB)")
    if info["skipped_files"]:
        print(f"skipped   {len(info['skipped_files'])} bad files:")
        for msg in info["skipped_files"]:
            print(f"  {msg}")
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    """Write a dataset as WebDataset shards (``vitlab.data.pack``)."""
    meta = pack(args.spec, args.out, shard_size=args.shard_size, seed=args.seed, image_size=args.image_size,
                channels=args.channels, cache_dir=args.cache_dir, workers=args.workers)
    for split, info in meta["splits"].items():
        print(f"{split:<6} {info['samples']:,} samples in {len(info['shards'])} shards")
    print(f"ok: {args.out}; use it as --data wds:{args.out}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    """Download a dataset from its official address, checked against the official md5s."""
    spec = download_dataset(args.name, args.root, base_url=args.base_url)
    print(f"ok: {args.name} is in {args.root}; use it as --data {spec}")
    return 0


def _image_size_arg(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use 32 or 32x48") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use 32 or 32x48")
    return (parts[0], parts[1])


def cmd_bench(args: argparse.Namespace) -> int:
    """Time training steps or inference batches of a preset; print images/s, FLOP/s and utilisation."""
    result = benchmark(args.model, batch=args.batch, mode=args.mode, precision=args.precision,
                       compile=args.compile, device=args.device, repeats=args.repeats, warmup=args.warmup,
                       threads=args.threads, gradient_checkpointing=args.gradient_checkpointing,
                       measure_memory=not args.no_memory, check_syncs=args.check_syncs, augment=args.augment)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (default: the small digits ViT on the built-in digits), print the test accuracy and run folder."""
    given = {"model": args.model, "data": args.data, "out": args.out, "epochs": args.epochs, "device": args.device,
             "init": args.init}
    if args.resume:
        changes = apply_overrides({k: v for k, v in given.items() if v is not None and k != "out"}, args.set)
        config = resume_config(args.resume, changes)
    else:
        config = load_train_config(args.recipe, args.set, **given)
    result = train(config, progress=None if args.quiet else ProgressBar(sys.stdout))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    if result.top1 is not None:
        best = f" (best {100 * result.best_top1:.2f}% at epoch {result.best_epoch})" if result.best_top1 else ""
        epochs = len(result.history)
        print(f"test accuracy: {100 * result.top1:.2f}%{best} after {epochs} epoch{'s' if epochs != 1 else ''}, "
              f"{result.wall_time / 60:.1f} min")
    if result.calibration is not None:
        print(format_calibration(result.calibration))
    if result.stopped != "completed":
        print(f"stopped early ({result.stopped.replace('_', ' ')}); continue with: vitlab train --resume "
              f"{result.run_dir}")
    print(f"run folder: {result.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run or checkpoint on a dataset's test split; write eval.json and confusion_matrix.png."""
    given = Path(args.checkpoint)
    out = args.out or str(given / "eval" if given.is_dir() else given.with_name(f"{given.stem}-eval"))
    result = evaluate(args.checkpoint, args.data, batch_size=args.batch_size, device=args.device,
                      precision=args.precision, out=out, tta_hflip=args.tta_hflip, tta_shift=args.tta_shift)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "confusion"}))
        return 0
    print(f"{result['checkpoint']} on {result['data']} ({result['count']} test images)")
    print(f"test loss {result['test_loss']:.4f}   top-1 {100 * result['top1']:.2f}%   top-5 "
          f"{100 * result['top5']:.2f}%")
    scaled = f" (logits / T, the fitted temperature T = {result['temperature']:.4f})" \
        if result["temperature"] != 1.0 else ""
    print(f"calibration{scaled}: NLL {result['nll']:.4f}   ECE {100 * result['ece']:.2f}%   MCE "
          f"{100 * result['mce']:.2f}%   L2 {100 * result['ece_l2']:.2f}%   Brier {result['brier']:.4f}")
    width = max(len(c) for c in result["classes"])
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {100 * acc:6.2f}%")
    print(f"wrote {out}/{EVAL} and {out}/{CONFUSION}")
    return 0


def format_calibration(result: dict) -> str:
    """The fitted temperature and the test split's calibration before and after it, as lines of text."""
    before, after = result["test_before"], result["test_after"]
    rows = [f"temperature T = {result['temperature']:.4f}, fitted on {result['val_images']:,} validation images "
            f"(NLL {result['val_nll_before']:.4f} -> {result['val_nll_after']:.4f})",
            f"{'test split':<14}{'top-1':>9}{'NLL':>9}{'ECE':>9}{'MCE':>9}{'Brier':>9}"]
    for name, r in (("before (T=1)", before), ("after", after)):
        rows.append(f"{name:<14}{100 * r['top1']:>8.2f}%{r['nll']:>9.4f}{100 * r['ece']:>8.2f}%"
                    f"{100 * r['mce']:>8.2f}%{r['brier']:>9.4f}")
    return "\n".join(rows)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the temperature of a run's model on its validation split; print the test split before and after."""
    result = calibrate(args.run, args.data, batch_size=args.batch_size, device=args.device, precision=args.precision)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['checkpoint']} on {result['data']}")
    print(format_calibration(result))
    print(f"saved in {result['checkpoint']}/{PREPROCESS}; predict, report and export now use it")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's curves (train/test loss, test accuracy per epoch) and confusion matrix as PNG."""
    for path in plot_run(args.run):
        print(path)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the packaged training recipes with the accuracy each reached and the command that measured it."""
    rows = list_recipes()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    for row in rows:
        print(f"{row['name']}: {row['description']}")
        print(f"    model {row['model']}, data {row['data']}, {row['epochs']} epochs")
        runs = [m for m in row["measured"] if m.get("top1") is not None]
        for m in runs:
            print(f"    measured: {m['top1']}% test accuracy in {m.get('wall_time', '?')} on {m.get('machine', '?')}")
            print(f"    command:  {m.get('command', '?')}")
            if m.get("note"):
                print(f"    note:     {m['note']}")
        if not runs:
            print("    measured: not yet")
    return 0


def _training_commands(sub) -> None:
    """The parsers of ``vitlab train, eval, calibrate, plot, recipes``."""
    p = sub.add_parser("train", help="train a ViT (no arguments: the small default model on the built-in digits)")
    p.add_argument("--model", help="model preset (`vitlab models`); default vit-digits-p2")
    p.add_argument("--data", help=f"data spec: {data_kinds_help()}; default digits")
    p.add_argument("--recipe", help=f"a recipe name (`vitlab recipes`) or a YAML file, e.g. RUN/{CONFIG_YAML}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any TrainConfig field, e.g. --set lr=1e-3 --set epochs=50 (repeatable)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--out", help="run folder (default runs/<recipe-or-model>-<data>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN exactly where it stopped")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from pretrained weights (a vitlab or run folder, a "
                   "Hugging Face folder, timm/torchvision .pth/.safetensors, JAX .npz): `vitlab finetune`")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run or checkpoint: loss, top-1/top-5, per class, confusion")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--data", help="data spec whose test split to evaluate on (default: the run's own data)")
    p.add_argument("--out", help=f"folder for {EVAL} and {CONFUSION} (default RUN_OR_CHECKPOINT/eval)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default): bf16 where the device has fast bf16 matmul, else fp32, as training does")
    p.add_argument("--tta-hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="also score each image's mirror image and average the probabilities (default: as the run "
                        "evaluated, its tta_hflip)")
    p.add_argument("--tta-shift", type=int, default=None, metavar="PIXELS",
                   help="also score those views moved PIXELS diagonally, weighing half (airbench's multi-crop; "
                        "default: as the run's final evaluation did, its tta_shift; 0: none)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="fit a temperature for a run's logits on its validation split "
                       "(temperature scaling); print ECE and NLL before and after")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--data", help="data spec (default: the run's own); its val/ folder, or the images a run with "
                   "calibrate=true held out, is what T is fitted on")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("plot", help="draw a run's loss and accuracy curves (and confusion matrix) as PNG")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("recipes", help="list the training recipes and the accuracy each reached")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_recipes)


def _explain_commands(sub) -> None:
    """The parsers of ``vitlab predict, attention, report``."""
    p = sub.add_parser("predict", help="name what is in photos: top-k classes with probabilities")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder (uses best/, else last/) or a "
                   "checkpoint folder")
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="how many classes to list per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("attention", help="draw attention maps over images into one figure")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder or a checkpoint folder")
    p.add_argument("paths", metavar="IMAGE_OR_FOLDER", nargs="*", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="figure file to write (.png, .svg, .pdf, .jpg)")
    p.add_argument("--method", choices=("rollout", "last"), default="rollout",
                   help="attention rollout over all layers (default) or the last layer's attention")
    p.add_argument("--heads", action="store_true", help="also show the last layer's map of every head")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean",
                   help="how heads are combined per layer (default mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="rollout: drop this lowest fraction of each layer's weights (default 0)")
    p.add_argument("--data", metavar="SPEC", help="instead of images: the evaluation split of a dataset "
                   "(e.g. folder:DIR, cifar10:DIR), shown with true labels")
    p.add_argument("--num-images", type=int, default=16, help="with --data: how many images (default 16)")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution (default 100; lower, smaller file)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("report", help="write one self-contained HTML report of a training run")
    p.add_argument("run", metavar="RUN", help="a run folder written by `vitlab train`")
    p.add_argument("-o", "--output", help="HTML file to write (default RUN/report.html)")
    p.add_argument("--num-images", type=int, default=16, help="test images in the attention grid (default 16)")
    p.add_argument("--method", choices=("rollout", "last"), default="rollout", help="attention map method")
    p.add_argument("--checkpoint", choices=(BEST, LAST), default=None,
                   help="which checkpoint of the run to report on (default best/, else last/)")
    p.set_defaults(func=cmd_report)


def _serve_command(sub) -> None:
    """The parser of ``vitlab serve``."""
    p = sub.add_parser("serve", help="a web page and a JSON API over a trained model: drop a photo, see the "
                       "classes and where the model looked")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder (uses best/, else last/) or any "
                   "checkpoint vitlab.load reads")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N, mps")
    p.add_argument("--max-upload-mb", type=float, default=Limits.max_bytes / 2**20,
                   help=f"largest file accepted, in MB (default {Limits.max_bytes / 2**20:g})")
    p.add_argument("--max-files", type=int, default=Limits.max_files,
                   help=f"most files in one request (default {Limits.max_files})")
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels,
                   help=f"largest image in pixels (default {Limits.max_pixels:,}, PIL's decompression-bomb limit)")
    p.set_defaults(func=cmd_serve)


def _model_and_data_commands(sub) -> None:
    """The parsers of ``vitlab models, data info|cache|download``."""
    p = sub.add_parser("models", help="list the model presets")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="inspect and download datasets")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("info", help="images per split, classes, image size and channels of a data spec")
    q.add_argument("spec", help=data_kinds_help())
    q.add_argument("--image-size", type=_image_size_arg, default=None, help="resize to this (e.g. 32 or 32x48)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to 1 (L) or 3 (RGB)")
    q.add_argument("--val-fraction", type=float, default=0.1, help="held out of a folder without val/test")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--cache-dir", default=None, help="decoded-image cache (default $VITLAB_CACHE or ~/.cache/vitlab)")
    q.add_argument("--skip-bad-files", action="store_true", help="leave out unreadable images and list them")
    q.add_argument("--workers", type=int, default=None, help="decoding processes")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_data_info)
    q = data_sub.add_parser("pack", help="write a dataset (a folder or any data spec) as WebDataset tar shards")
    q.add_argument("spec", help="what to pack: folder:DIR (its files go in as they are) or any data spec")
    q.add_argument("out", help="the folder to write SPLIT-000000.tar, ... and dataset.json in; use it as wds:OUT")
    q.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    q.add_argument("--seed", type=int, default=0, help="the order the samples are written in (shuffled)")
    q.add_argument("--image-size", type=_image_size_arg, default=None,
                   help="resize to this first (PNG then; default: the files as they are)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to 1 (L) or 3 (RGB) first")
    q.add_argument("--cache-dir", default=None, help="decoded-image cache (default $VITLAB_CACHE or ~/.cache/vitlab)")
    q.add_argument("--workers", type=int, default=None, help="decoding processes")
    q.set_defaults(func=cmd_data_pack)
    q = data_sub.add_parser("cache", help="the decoded-image cache: its files and size; --clear")
    q.add_argument("--cache-dir", default=None, help="the cache (default $VITLAB_CACHE or ~/.cache/vitlab)")
    q.add_argument("--clear", action="store_true", help="delete the cached images (folders are decoded again)")
    q.set_defaults(func=cmd_data_cache)
    q = data_sub.add_parser("download", help="download cifar10, cifar100, mnist or fashion-mnist (md5-checked)")
    q.add_argument("name", choices=("cifar10", "cifar100", "mnist", "fashion-mnist"))
    q.add_argument("--root", required=True, help="folder to put the files in")
    q.add_argument("--base-url", default=None, help="a mirror to use instead of the official address")
    q.set_defaults(func=cmd_data_download)


def _pretrained_commands(sub) -> None:
    """The parsers of ``vitlab finetune, convert, export``."""
    p = sub.add_parser("finetune", help="fine-tune a pretrained checkpoint: `vitlab train --init CHECKPOINT ...`")
    p.add_argument("checkpoint", help="any file or folder `vitlab convert` reads")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments of `vitlab train` (--data SPEC ...)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("convert", help="convert a pretrained checkpoint (HF folder, timm, torchvision, JAX .npz) "
                       "to a vitlab folder")
    p.add_argument("checkpoint", help="file or folder: HF save_pretrained folder, timm/torchvision .pth or "
                   ".safetensors, google-research .npz")
    p.add_argument("--out", required=True, help=f"folder to write ({CONFIG_JSON} + {WEIGHTS})")
    p.add_argument("--format", choices=["vitlab", "hf", "timm", "torchvision", "jax"], default=None,
                   help="skip format detection")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (timm/torchvision files do not store them; default: standard for the size)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a ViTConfig field (repeatable)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export a model to ONNX (dynamic batch), a Hugging Face folder or a timm file")
    p.add_argument("checkpoint", help="run folder, vitlab folder, or any file `vitlab convert` reads")
    p.add_argument("--format", choices=["onnx", "hf", "timm"], default="onnx",
                   help="onnx (a .onnx file), hf (a transformers folder), timm (a .safetensors state dict)")
    p.add_argument("--out", required=True, help="the .onnx file, or the folder for --format hf")
    p.add_argument("--input-format", choices=["vitlab", "hf", "timm", "torchvision", "jax"], default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.set_defaults(func=cmd_export)


def _bench_command(sub) -> None:
    """The parsers of ``vitlab bench``."""
    p = sub.add_parser("bench", help="time training steps or inference of a model: images/s, FLOP/s, utilisation")
    p.add_argument("--model", required=True, help="preset name (see `vitlab models`)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
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


def build_parser() -> argparse.ArgumentParser:
    """The ``vitlab`` argument parser: one sub-parser a command, each with its ``cmd_*`` function."""
    parser = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers that train well.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _training_commands(sub)
    _explain_commands(sub)
    _serve_command(sub)
    _model_and_data_commands(sub)
    _pretrained_commands(sub)
    _bench_command(sub)
    return parser
