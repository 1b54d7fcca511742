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

from pipeline.io import atomic_path, write_text  # noqa: E402


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
