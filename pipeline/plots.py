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


def _curve(trial) -> dict[int, float]:
    """epoch -> val accuracy a trial reported: Optuna's intermediate values, or in a Pareto
    study (where Optuna keeps none) the curve the trial stored (`pareto_study.CURVE_ATTR`)."""
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    curve = trial.user_attrs.get("val_accuracy_by_epoch") or []
    return {epoch: value for epoch, value in enumerate(curve, start=1)}


def search_history_figure(study):
    """(figure, axes, points) of the search history: each complete trial's objective (val
    accuracy) against its number, each pruned trial at the last value it reported (the rung
    where it stopped, a distinct marker), and the best value so far. `points`: dicts with
    number, state, value, epochs (the step of that value)."""
    from optuna.trial import TrialState

    points = []
    for t in study.get_trials(deepcopy=False):
        curve = _curve(t)
        if t.state == TrialState.COMPLETE and t.values is not None:
            last = max(curve, default=None)
            value = t.values[0]
            points.append(
                {"number": t.number, "state": "COMPLETE", "value": value, "epochs": last}
            )
        elif t.state == TrialState.PRUNED and curve:
            last = max(curve)
            points.append(
                {"number": t.number, "state": "PRUNED", "value": curve[last], "epochs": last}
            )
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    styles = {
        "COMPLETE": {"marker": "o", "color": "tab:blue", "label": "complete"},
        "PRUNED": {"marker": "x", "color": "tab:orange", "label": "pruned (last reported value)"},
    }
    for state, style in styles.items():
        chosen = [p for p in points if p["state"] == state]
        if chosen:
            ax.scatter([p["number"] for p in chosen], [p["value"] for p in chosen], **style)
    complete = sorted((p["number"], p["value"]) for p in points if p["state"] == "COMPLETE")
    if complete:
        best, xs, ys = float("-inf"), [], []
        for number, value in complete:
            best = max(best, value)
            xs.append(number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:green", label="best so far (complete)")
    ax.margins(x=0.05, y=0.1)
    ax.set_xlabel("trial")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"search history: {study.study_name}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # never over a point
    return fig, ax, points


def search_plots(study, out_dir: str | Path) -> list[Path]:
    """Optimization history, parameter importances and lr x weight decay, as PNG files."""
    import warnings

    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    out_dir = Path(out_dir)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    enough = len(complete) >= 2
    # a Pareto study: importances and contour of the val accuracy (the first objective)
    target = {} if len(study.directions) == 1 else {"target": lambda t: t.values[0]}
    figures = {
        "search_history.png": lambda: search_history_figure(study)[1],
        "search_importance.png": lambda: (
            ovm.plot_param_importances(study, target_name="val accuracy", **target)
            if enough
            else _note_axes("parameter importances need 2 or more complete trials")
        ),
        "search_lr_wd.png": lambda: (
            ovm.plot_contour(
                study, params=["lr", "weight_decay"], target_name="val accuracy", **target
            )
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


def pareto_figure(
    title: str,
    cost_label: str | None,
    complete: dict,
    front: list[int],
    stopped: list[tuple[float, float]],
    selected: int | None,
    budget: dict | None = None,
):
    """(figure, axes) of a Pareto search: every complete trial's (val accuracy, cost)
    (`complete`: number -> point), the trials stopped early faded at their last accuracy, the
    front (`front`: numbers, cheapest first) as a staircase, the chosen trial ringed, a budget
    ({key: value}) as a line. `cost_label` None (a single-objective study): a note instead."""
    if cost_label is None:
        ax = _note_axes(
            "single-objective search: set search.objectives: [accuracy, latency]\n"
            "for an accuracy x latency Pareto front"
        )
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    if stopped:
        ax.scatter(
            [c for _, c in stopped],
            [a for a, _ in stopped],
            marker="x",
            color="tab:orange",
            alpha=0.35,
            label="stopped early (last val accuracy)",
        )
    if complete:
        ax.scatter(
            [c for _, c in complete.values()],
            [a for a, _ in complete.values()],
            color="tab:blue",
            label="complete",
        )
        points = [complete[n] for n in front]
        ax.step(
            [c for _, c in points],
            [a for a, _ in points],
            where="post",
            color="tab:green",
            label=f"Pareto front ({len(points)})",
        )
    if selected is not None and selected in complete:
        a, c = complete[selected]
        ax.scatter(
            [c],
            [a],
            s=160,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            label=f"chosen: trial {selected}",
        )
    if budget:
        ((key, value),) = budget.items()
        if key == "min_accuracy":
            ax.axhline(value, color="grey", linestyle="--", label=f"min accuracy {value:g}")
        else:
            ax.axvline(value, color="grey", linestyle="--", label=f"budget {value:g}")
    ax.margins(x=0.08, y=0.1)
    ax.set_xlabel(cost_label)
    ax.set_ylabel("val accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig, ax


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


PROVIDER_MARKERS = {
    "CPUExecutionProvider": "o",
    "CUDAExecutionProvider": "s",
    "TensorrtExecutionProvider": "^",
}


def spread(positions: list[float], gap: float, low: float = 0.03, high: float = 0.97) -> list:
    """`positions` (ascending, axes fraction) moved as little as it takes to be `gap` apart
    and within [low, high] (when they fit), order kept: where the labels of close points go."""
    out = list(positions)
    for i in range(len(out)):
        out[i] = max(out[i], low if i == 0 else out[i - 1] + gap)
    for i in reversed(range(len(out))):
        out[i] = min(out[i], high if i == len(out) - 1 else out[i + 1] - gap)
    return out


def export_latency_figure(manifest: dict):
    """(figure, axes, points) of the export plot: val accuracy against batch-1 p50 latency, one
    point per variant and provider. Labels sit in a column right of the axes, in the order of
    their points' accuracy, each joined to its point by a thin line, so variants that tie (the
    usual case for pruned / int8 / fp16) never overlap; the margins keep every marker, and the
    recommended one's ring, inside the axes. `points`: dicts with name, provider, x, y,
    accepted, recommended and the label's text."""
    points = []
    for e in manifest["variants"]:
        for provider, timing in e["latency"].items():
            points.append(
                {
                    "name": e["name"],
                    "provider": provider,
                    "x": timing["latency_ms_p50_b1"],
                    "y": e["val_accuracy"],
                    "accepted": e["accepted"],
                    "recommended": e["recommended"] and provider == e["provider"],
                    "label": f"{e['name']} ({provider.removesuffix('ExecutionProvider')})",
                }
            )
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    for p in points:
        color = "tab:green" if p["accepted"] else "tab:red"
        ax.scatter(p["x"], p["y"], color=color, marker=PROVIDER_MARKERS.get(p["provider"], "D"))
        if p["recommended"]:
            ax.scatter(p["x"], p["y"], s=260, facecolors="none", edgecolors="black", lw=1.5)
    ax.margins(x=0.12, y=0.18)  # room for the ring around the recommended point
    low, high = ax.get_ylim()
    # bottom label = lowest point; among ties the rightmost point takes the lower label, so no
    # line crosses another tied point
    ordered = sorted(points, key=lambda p: (p["y"], -p["x"]))
    wanted = [(p["y"] - low) / (high - low) for p in ordered]
    for p, label_y in zip(ordered, spread(wanted, gap=0.08), strict=True):
        ax.annotate(
            p["label"],
            (p["x"], p["y"]),
            xytext=(1.04, label_y),
            textcoords="axes fraction",
            va="center",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6, "shrinkB": 6},
        )
        p["label_y"] = float(label_y)
    ax.set_xlabel("latency, batch 1, p50 (ms)")
    ax.set_ylabel("val accuracy")
    ax.set_title("export: accepted (green) / rejected (red); circled: recommended", fontsize=10)
    return fig, ax, points


def export_latency_plot(manifest: dict, path: str | Path) -> list[dict]:
    """export: `export_latency_figure` saved as a PNG; returns its points."""
    fig, _, points = export_latency_figure(manifest)
    save_figure(fig, path)
    return points
