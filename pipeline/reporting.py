"""Text tables and flat metric keys of the search, compress and export stages (no decisions).

- `versus_reference(correct, reference)`: each model's paired val difference to the reference
  (`pipeline.stats.paired_difference` over the same images).
- `difference_metrics(prefix, difference)`: the flat keys `dvc metrics diff` compares
  (`int8_val_difference`, `..._low`, `..._high`, `int8_val_n_disagree`).
- `compress_table(metrics)`: what the compress stage prints on stderr: per variant its val
  accuracy, the paired difference to the tuned model with its 95 % interval and how many images
  disagree, the verdict, and the test accuracy (reported once, after every decision).
- `manifest_table(manifest)`: the export manifest as a Markdown table.
- `search_summary(metrics, best_params)`: what the search stage prints on stderr: the study, the
  winner and its retrained score, the paired difference to the baseline, what was shipped.
"""

from __future__ import annotations

import numpy as np

from pipeline.stats import paired_difference


def versus_reference(correct: dict[str, np.ndarray], reference: str) -> dict:
    """name -> PairedDifference of its per-image correctness against `correct[reference]`."""
    return {name: paired_difference(c, correct[reference]) for name, c in correct.items()}


def difference_metrics(prefix: str, record: dict) -> dict:
    """Flat keys for one paired val difference (a `PairedDifference.record()`): the point
    estimate, its interval and the number of images that decide it."""
    return {
        f"{prefix}_val_difference": record["difference"],
        f"{prefix}_val_difference_low": record["low"],
        f"{prefix}_val_difference_high": record["high"],
        f"{prefix}_val_n_disagree": record["n_disagree"],
    }


def describe_difference(record: dict) -> str:
    """`+0.37 [-0.74, +1.48] (5 differ)`: a `PairedDifference.record()` in points."""
    return (
        f"{100 * record['difference']:+.2f} [{100 * record['low']:+.2f}, "
        f"{100 * record['high']:+.2f}] ({record['n_disagree']} differ)"
    )


def compress_table(m: dict) -> str:
    """The compress stage's summary from its metrics (see `pipeline.compress.summarize`)."""
    lines = [
        f"pruned at ratio {m['prune_ratio']:g} (requested {m['prune_ratio_requested']:g}): "
        f"MACs {m['macs_before']:,} -> {m['macs_after']:,} ({m['macs_reduction']:.2f}x fewer), "
        f"params {m['params_before']:,} -> {m['params_after']:,}",
    ]
    if len(m["attempts"]) > 1:
        tried = ", ".join(
            f"{a['ratio']:g} -> {describe_difference(a['val_difference'])}" for a in m["attempts"]
        )
        lines.append(f"over budget at {m['prune_ratio_requested']:g}; ratios tried: {tried}")
    lines.append(
        f"decided on val ({m['val_images']} images, one image = "
        f"{100 / m['val_images']:.2f} points; budget {100 * m['max_accuracy_drop']:.2f} points "
        f"on the point estimate); test ({m['test_images']} images) scored once, for the report"
    )
    lines.append(
        f"{'variant':<12} {'val acc':>8}  {'val vs tuned, points [95% CI]':<33} "
        f"{'test acc':>8} {'size':>12} {'MACs':>10}  accepted"
    )
    for v in m["variants"]:
        verdict = "yes" if v["accepted"] else f"NO: {v['reason']}"
        lines.append(
            f"{v['name']:<12} {v['val_accuracy']:>8.4f}  "
            f"{describe_difference(v['val_difference']):<33} {v['test_accuracy']:>8.4f} "
            f"{v['size_bytes'] / 1024:>8.1f} KiB {v['macs']:>10,}  {verdict}"
        )
    return "\n".join(lines)


def manifest_table(manifest: dict) -> str:
    """The manifest as a Markdown table (printed by the export stage, pasted into notes)."""
    batch = manifest["benchmark_batch"]
    head = (
        f"| variant | val acc | val vs fp32, points [95% CI] | test acc | size (bytes) | params "
        f"| MACs | p50 b1 (ms) | spread (ms) | p95 b1 (ms) | img/s b{batch} | provider | parity "
        f"| accepted | recommended |"
    )
    lines = [head, "|" + " --- |" * 15]
    for e in manifest["variants"]:
        p = e["parity"]
        parity = f"{'ok' if p['passed'] else 'FAIL'} (diff {p['max_abs_diff']:.1e}, " + (
            f"top-1 {p['top1_agreement']:.4f})"
        )
        lines.append(
            f"| {e['name']} | {e['val_accuracy']:.4f} | "
            f"{describe_difference(e['val_difference'])} | {e['test_accuracy']:.4f} | "
            f"{e['size_bytes']} | {e['params']} | {e['macs']} | {e['latency_ms_p50_b1']:.3f} | "
            f"{e['latency_spread_ms']:.3f} | {e['latency_ms_p95_b1']:.3f} | "
            f"{e[f'throughput_b{batch}']:.0f} | {e['provider']} | "
            f"{parity} | {'yes' if e['accepted'] else 'no: ' + e['reason']} | "
            f"{'**yes**' if e['recommended'] else ''} |"
        )
    return "\n".join(lines)


def search_summary(m: dict, best_params: dict) -> str:
    """The search stage's summary from its metrics (see `pipeline.search.run`)."""
    pareto = m.get("n_pareto") is not None
    lines = [
        f"search {m['study_name']}: {m['n_complete']} complete, {m['n_pruned']} pruned, "
        f"{m['n_failed']} failed in {m['search_seconds']:.1f}s; best trial {m['best_trial']} val "
        f"{m['best_trial_val_accuracy']:.4f}"
        + ("" if pareto else f" {best_params}")
        + f", winner val {m['winner_val_accuracy']:.4f} "
        + ("(retrained); " if m["winner_retrained"] else "(its trial's model, not retrained); ")
        + f"{m['epochs_saved_by_pruning']} epochs saved by early stopping"
    ]
    if pareto:
        cost = next(
            k.removeprefix("selected_")
            for k in m
            if k.startswith("selected_") and k not in ("selected_trial", "selected_val_accuracy")
        )
        lines.append(
            f"Pareto front: {m['n_pareto']} trials, hypervolume {m['hypervolume']:.6g} (reference "
            f"accuracy, {cost}: {m['hypervolume_reference']}); {m['select']} chose trial "
            f"{m['selected_trial']}: val {m['selected_val_accuracy']:.4f}, {cost} "
            f"{m['selected_' + cost]:.6g}, {best_params}"
        )
    prefix = "search_minus_baseline_val_"
    if prefix + "difference" in m:
        record = {k: m[prefix + k] for k in ("difference", "low", "high", "n_disagree")}
        lines.append(
            f"winner vs baseline on val, points [95% CI]: "
            f"{describe_difference(record)}; baseline val {m['baseline_val_accuracy']:.4f}"
        )
    if m["tuned_source"] == "baseline":
        lines.append(
            "search: the search's winner is worse than the baseline beyond the noise; "
            "models/tuned.pt is the BASELINE model (tuned_source: baseline)"
        )
    lines.append(
        f"tuned model ({m['tuned_source']}): val {m['tuned_val_accuracy']:.4f}, test "
        f"{m['tuned_test_accuracy']:.4f} (reported once; baseline test "
        f"{m['baseline_test_accuracy']})"
    )
    return "\n".join(lines)
