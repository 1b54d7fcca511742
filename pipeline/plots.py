"""PNG plots (matplotlib, Agg) and CSV series for `dvc plots`; written atomically.

DVC's HTML plots need a CDN, so every curve a user should look at is also a PNG file that
MLflow stores as an artifact.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.files import atomic_path, write_text  # noqa: E402


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_curves(history: list[dict], path: str | Path, title: str = "training") -> None:
    """Loss (left) and accuracy (right) against epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train accuracy")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def _note_axes(text: str):
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    return ax


def search_plots(study, out_dir: str | Path) -> list[Path]:
    """Optimization history, parameter importances and lr x weight decay, as PNG files."""
    import warnings

    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    out_dir = Path(out_dir)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    enough = len(complete) >= 2
    figures = {
        "search_history.png": lambda: ovm.plot_optimization_history(study),
        "search_importance.png": lambda: (
            ovm.plot_param_importances(study)
            if enough
            else _note_axes("parameter importances need 2 or more complete trials")
        ),
        "search_lr_wd.png": lambda: (
            ovm.plot_contour(study, params=["lr", "weight_decay"])
            if enough
            else _note_axes("the lr x weight decay contour needs 2 or more complete trials")
        ),
    }
    written = []
    for name, draw in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            ax = draw()
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        save_figure(fig, out_dir / name)
        written.append(out_dir / name)
    return written


def compression_plot(variants: list[dict], max_drop: float, path: str | Path) -> None:
    """compress: val accuracy against file size per variant (`variants`: compress.json's
    entries, the reference first); the budget below the reference as a dashed line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, v in enumerate(variants):
        x, y = v["size_bytes"] / 1024, v["val_accuracy"]
        ax.scatter(x, y, color="tab:green" if v["accepted"] else "tab:red", s=40, zorder=3)
        offset = 6 + 12 * (i // 2) if i % 2 else -12 - 12 * (i // 2)  # variants often tie
        ax.annotate(v["name"], (x, y), textcoords="offset points", xytext=(4, offset), fontsize=8)
    budget = variants[0]["val_accuracy"] - max_drop
    ax.axhline(budget, color="gray", linestyle="--", linewidth=1, label="accuracy budget")
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("ONNX file size (KiB)")
    ax.set_ylabel("val top-1 accuracy (what the guard reads)")
    ax.set_title("compression: accepted (green) / rejected (red)")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def export_latency_plot(manifest: dict, path: str | Path) -> None:
    """export: val accuracy against batch-1 p50 latency, one point per variant and provider."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {
        "CPUExecutionProvider": "o",
        "CUDAExecutionProvider": "s",
        "TensorrtExecutionProvider": "^",
    }
    for e in manifest["variants"]:
        color = "tab:green" if e["accepted"] else "tab:red"
        for provider, timing in e["latency"].items():
            x, y = timing["latency_ms_p50_b1"], e["val_accuracy"]
            ax.scatter(x, y, color=color, marker=markers.get(provider, "D"), s=60)
            label = f"{e['name']} ({provider.removesuffix('ExecutionProvider')})"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            if e["recommended"] and provider == e["provider"]:
                ax.scatter(x, y, s=260, facecolors="none", edgecolors="black", linewidths=1.5)
    ax.set_xlabel("latency, batch 1, p50 (ms)")
    ax.set_ylabel("val accuracy")
    ax.set_title("export: accepted (green) / rejected (red); circled: recommended")
    save_figure(fig, path)
