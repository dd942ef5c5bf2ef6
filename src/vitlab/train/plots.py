"""PNG plots of a run: the training curves (train/test loss and test accuracy per epoch, the seed article's
three curves) and the confusion matrix with class names."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Train and test loss per epoch (left) and test top-1 accuracy per epoch (right), as one PNG."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    tested = [row for row in history if row.get("top1") is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o", ms=3, label="train loss")
    ax_loss.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], marker="o", ms=3,
                 label="test loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot([r["epoch"] for r in tested], [100 * r["top1"] for r in tested], marker="o", ms=3,
                label="test top-1")
    if any(r.get("ema_top1") is not None for r in tested):
        ax_acc.plot([r["epoch"] for r in tested], [100 * r["ema_top1"] for r in tested], marker="o", ms=3,
                    label="test top-1 (EMA)")
        ax_acc.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path,
                   title: str | None = None) -> Path:
    """The confusion matrix (rows: true class, columns: predicted) with class names and counts."""
    plt = _pyplot()
    import numpy as np

    cm = np.asarray(confusion)
    k = len(classes)
    size = min(max(4.0, 0.5 * k + 2), 20)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(k)
    slanted = k > 4 and max(len(c) for c in classes) > 2  # long names overlap when horizontal
    ax.set_xticks(ticks, classes, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > threshold else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return _save(fig, path)


def plot_run_files(run: str | Path, history: list[dict], final_eval: dict | None) -> list[Path]:
    """The run folder's plots: ``curves.png`` and, given the last evaluation, ``confusion_matrix.png``."""
    run = Path(run)
    paths = [plot_curves(history, run / "curves.png", title=run.name)]
    if final_eval is not None:
        paths.append(plot_confusion(final_eval["confusion"], final_eval["classes"], run / "confusion_matrix.png",
                                    title=f"{run.name}: top-1 {100 * final_eval['top1']:.2f}%"))
    return paths


def _save(fig, path: str | Path) -> Path:
    from io import BytesIO

    from vitlab._files import atomic_write_bytes

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
