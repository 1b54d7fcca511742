"""Latency and throughput of the exported variants, measured so that a recommendation knows its
noise (the rules that read them: `pipeline.champion`).

Batch-1 latency, per provider, of every variant that runs on it, timed in turns
(`onnx_tools.interleaved_latency`): `ROUNDS` rounds of max(1, `export.latency_runs` // ROUNDS)
runs each, after `export.warmup_runs` warm-up runs, the variants' order rotated each round, so a
slow spell of a shared machine hits every variant alike. Each round, and the warm-up, also lasts
at least `MIN_ROUND_S` (more runs of a fast model): with one run per round, a model of ten
microseconds got a spread that changed from one export run to the next, and with it the
recommendation (30 identical runs of the test project's four variants: two different
recommendations with 1 run per round, one with 20 ms rounds). CPU sessions are pinned to `THREADS`
intra-op threads. Each variant gets `champion.summarize_latency` (p50 = median of the round
medians, p95, spread = range of the round medians without the highest and the lowest) and its
throughput at `export.benchmark_batch` (`onnx_tools.throughput`). `settings(params)` is what the
manifest and the model card record: these numbers and the machine.
"""

from __future__ import annotations

import os
import platform

import numpy as np

from pipeline import onnx_tools
from pipeline.champion import summarize_latency
from pipeline.config import Params

CPU = "CPUExecutionProvider"
THREADS = 1  # intra-op threads of every CPU session timed: one core, comparable across runs
ROUNDS = 5
MIN_ROUND_S = 0.02  # the least time each variant is timed per round (and warmed up)


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings(params: Params) -> dict:
    """How latency was measured and on what machine (recorded in the manifest)."""
    import onnxruntime

    cfg = params.export
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "system": platform.platform(terse=True),
        "onnxruntime": onnxruntime.__version__,
        "cpu_threads": THREADS,
        "rounds": ROUNDS,
        "runs_per_round": max(1, cfg.latency_runs // ROUNDS),
        "min_round_s": MIN_ROUND_S,
        "warmup_runs": cfg.warmup_runs,
        "batch": cfg.benchmark_batch,
    }


def benchmark(variants: list, x: np.ndarray, params: Params) -> None:
    """Set `entry["latency"]` = {provider: numbers} of every variant (`ExportedVariant`s with
    `sessions` by provider), interleaved per provider."""
    cfg = params.export
    runs = max(1, cfg.latency_runs // ROUNDS)
    for v in variants:
        v.entry["latency"] = {}
    for provider in dict.fromkeys(p for v in variants for p in v.sessions):
        sessions = {
            v.spec.name: (
                onnx_tools.session_for(v.proto.SerializeToString(), CPU, threads=THREADS)[0]
                if provider == CPU
                else v.sessions[provider]
            )
            for v in variants
            if provider in v.sessions
        }
        rounds = onnx_tools.interleaved_latency(
            sessions, x, ROUNDS, runs, cfg.warmup_runs, min_round_s=MIN_ROUND_S
        )
        for v in variants:
            if v.spec.name not in sessions:
                continue
            numbers = summarize_latency(rounds[v.spec.name])
            numbers[f"throughput_b{cfg.benchmark_batch}"] = onnx_tools.throughput(
                sessions[v.spec.name], x, cfg.benchmark_batch, cfg.latency_runs
            )
            v.entry["latency"][provider] = _rounded(numbers)


def _rounded(numbers: dict) -> dict:
    return {
        k: [round(t, 4) for t in v] if isinstance(v, list) else round(v, 4)
        for k, v in numbers.items()
    }
