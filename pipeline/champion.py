"""Which variant to recommend and when the registry's `champion` alias moves: deterministic rules
over latencies that carry their own noise (no timing here; see `onnx_tools.interleaved_latency`).

- `summarize_latency(rounds_ms)`: one variant's batch-1 times, measured in interleaved rounds,
  as `latency_ms_p50_b1` (the median of the round medians), `latency_ms_p95_b1` (over every
  run) and `latency_spread_ms`: how far the same variant moved between rounds on this machine,
  the range of the round medians without the highest and the lowest one (from `TRIM_FROM`
  rounds on). The full range let one slow round decide: in 2 of 21 identical export runs of
  the test project a slow spell hit the first round of three variants (fp32 0.016 against
  0.010-0.011 ms in its other four rounds), the spreads grew to 0.006-0.012 ms, all four
  variants tied, and the smallest file, int8 at 1.6x the p50 of fp32, was recommended. A CI
  run made it champion that way, and the next identical run measured it beaten beyond noise
  and moved the alias.
- `faster(a, b)`: `a` is faster than `b` only when `b`'s p50 exceeds `a`'s by more than the
  larger of the two spreads and by at least `MIN_GAIN` of `b`'s p50; otherwise neither is. The
  spread is measured within one run, and identical runs drift by more than it: the test
  project's fp32 and fp16 variants (8.1 and 8.8 us, spread 0.2 us) swapped places between two
  identical export runs, and the alias moved for a 0.7 us gain no user would act on.
- `recommend(entries)`: the candidates are the accepted variants that no accepted variant is
  faster than (the fastest by p50 is always one; "faster" is not transitive, so "tied with the
  fastest" would not do: a variant tied with the fastest can still be beaten by a third one);
  among them the smaller file wins, then the earlier variant in the fixed order
  (`pipeline.variants.VARIANTS`, the order of `entries`). So no accepted variant is ever faster
  than the recommended one beyond the noise.
- `alias_decision(entries, recommended, current_sha256)`: the alias moves to the recommended
  file only when there is no champion, when the champion's file is not one of this run's
  variants (the models changed) or is not accepted, or when the recommended one is faster than
  it by at least `ALIAS_MIN_GAIN` (beyond the noise measured in this run too); a file already
  registered is never registered again. The alias asks for a larger gain than the
  recommendation (hysteresis): a gain near `MIN_GAIN` is measured on either side of it by
  identical runs (the test project's fp32 beat its pruned and fp16 variants by 7.7-10.7 % in 8
  identical runs), so the alias would go back and forth between two files that no run tells
  apart beyond doubt.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import StageFailed

# the least share of the slower variant's p50 by which a faster one must beat it (besides the
# spread): smaller gains do not carry over between runs
MIN_GAIN = 0.10
ALIAS_MIN_GAIN = 0.20  # what the recommended variant must gain on the champion to take its alias
TRIM_FROM = 5  # with this many rounds or more, the spread leaves out the highest and the lowest

RULE = (
    "the fastest accepted variant by batch-1 p50 on its default provider, timed in interleaved "
    "rounds; a variant is faster only by more than the larger spread (range of the round "
    f"medians without the highest and the lowest) and by at least {MIN_GAIN:.0%} of the slower "
    "one's p50; among the accepted variants that no other is faster than, the smaller file, then "
    f"the fixed variant order; the champion alias moves to it only for a gain of at least "
    f"{ALIAS_MIN_GAIN:.0%} of the champion's p50 (beyond the spread too)"
)


def summarize_latency(rounds_ms: list[list[float]]) -> dict:
    """p50 (median of round medians), p95 (over every run) and spread (range of the round
    medians, the highest and the lowest left out from `TRIM_FROM` rounds on) of one variant, in
    ms."""
    medians = [float(np.median(r)) for r in rounds_ms]
    every = [t for r in rounds_ms for t in r]
    middle = sorted(medians)[1:-1] if len(medians) >= TRIM_FROM else medians
    return {
        "latency_ms_p50_b1": float(np.median(medians)),
        "latency_ms_p95_b1": float(np.percentile(every, 95)),
        "latency_spread_ms": max(middle) - min(middle),
        "latency_rounds_ms": medians,
    }


def faster(a: dict, b: dict, min_gain: float = MIN_GAIN) -> bool:
    """True when `a` is faster than `b` beyond the noise: the p50 gap exceeds both spreads and
    is at least `min_gain` of `b`'s p50."""
    gap = b["latency_ms_p50_b1"] - a["latency_ms_p50_b1"]
    beyond_spread = gap > max(a["latency_spread_ms"], b["latency_spread_ms"])
    return beyond_spread and gap >= min_gain * b["latency_ms_p50_b1"]


def recommend(entries: list[dict]) -> str:
    """The recommended variant's name (see the module docstring); `entries` in the fixed order."""
    accepted = [(i, e) for i, e in enumerate(entries) if e["accepted"]]
    if not accepted:
        raise StageFailed(
            "no variant is accepted; see reports/compress.json and the parity checks"
        )
    unbeaten = [(i, e) for i, e in accepted if not any(faster(x, e) for _, x in accepted)]
    return min(unbeaten, key=lambda ie: (ie[1]["size_bytes"], ie[0]))[1]["name"]


def alias_decision(
    entries: list[dict], recommended: str, current_sha256: str | None
) -> tuple[bool, str]:
    """(move the alias to `recommended`?, why) given the champion version's file sha256."""
    new = next(e for e in entries if e["name"] == recommended)
    if current_sha256 is None:
        return True, "no champion yet"
    if current_sha256 == new["sha256"]:
        return False, f"the champion is this file already ({recommended})"
    current = next((e for e in entries if e["sha256"] == current_sha256), None)
    if current is None:
        return True, "the champion's file is not among this run's variants (the models changed)"
    name = current["name"]
    if not current["accepted"]:
        return True, f"the champion ({name}) is not accepted in this run"
    gap = f"p50 {new['latency_ms_p50_b1']:.4f} vs {current['latency_ms_p50_b1']:.4f} ms"
    spread = max(new["latency_spread_ms"], current["latency_spread_ms"])
    if faster(new, current, ALIAS_MIN_GAIN):
        return True, (
            f"{recommended} is faster than the champion ({name}): {gap}, spread {spread:.4f}"
        )
    return False, (
        f"{recommended} is not faster than the champion ({name}) by {ALIAS_MIN_GAIN:.0%} "
        f"beyond the noise: {gap}, spread {spread:.4f}; the champion stays"
    )


ALIAS = "champion"
VERSION_TAGS = (
    "name", "val_accuracy", "test_accuracy", "sha256", "size_bytes", "latency_ms_p50_b1",
    "latency_spread_ms", "provider",
)  # fmt: skip


def update_champion(tracker, registered_model: str, manifest: dict, model_uri: str, card: str):
    """Apply `alias_decision` in the model registry through `tracker` (`pipeline.tracking.Run`):
    register the recommended file (once per sha256) and point `ALIAS` at it only when the rule
    says so; when the champion is this run's file, its tags and description (`card`) are this
    run's. Returns (champion version or None, moved, why)."""
    entries, name = manifest["variants"], manifest["recommended"]
    new = next(e for e in entries if e["name"] == name)
    current = tracker.aliased_version(registered_model, ALIAS)
    move, why = alias_decision(entries, name, current.get("sha256") if current else None)
    version = current["version"] if current else None
    if move:
        version = tracker.register_file(model_uri, registered_model, new["sha256"])
        tracker.set_model_alias(registered_model, ALIAS, version)
    if move or current.get("sha256") == new["sha256"]:
        tags = {k: new[k] for k in VERSION_TAGS}
        tracker.describe_version(registered_model, version, tags, card)
    tracker.set_tags({"champion_version": version, "champion_moved": move, "champion_why": why})
    return version, move, why
