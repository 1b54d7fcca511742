"""What an architecture costs to run, measured once per study: the second objective of a Pareto
search (`search.objectives: [accuracy, latency | size | macs]`).

- `measure(arch, params, info)`: the architecture (a fresh, untrained model: its cost does not
  depend on its weights) exported by `onnx_tools.export_onnx` exactly as the export stage
  exports it (uint8 NHWC pixels in, preprocessing in the graph), then timed in ONNX Runtime on
  the provider the export stage will use (`CUDAExecutionProvider` when `device` allows it and
  it runs, else the CPU with `benchmarking.THREADS` intra-op thread), at `search.latency_batch`
  images per run: `ROUNDS` rounds of `RUNS` runs after `WARMUP` warm-up runs, p50 = the median
  of the round medians, spread = their range (without the highest and the lowest from
  `champion.TRIM_FROM` rounds on; `champion.summarize_latency`). Also its MACs and
  parameters (Torch-Pruning's counter, as the compress stage counts) and its ONNX file size.
- `study_cost(study, arch, params, info)`: the same numbers, read from the study when any worker
  or an earlier run of this study has measured this architecture (a study user attribute
  `cost:<key>`), else measured and stored there; the first stored value wins, so a resumed or
  parallel study never re-measures and every trial of one architecture has the same cost.
- `objective_value(cost, objective)`: the number the study minimises (latency in ms, size in
  MB, MACs in millions).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import onnx_tools
from pipeline.benchmarking import THREADS
from pipeline.champion import summarize_latency
from pipeline.config import Params

ROUNDS = 5
RUNS = 20
WARMUP = 10
COST_ATTR = "cost:"
# objective -> (key in the cost record, scale to the unit the study minimises)
UNITS = {"latency": ("latency_ms", 1.0), "size": ("size_bytes", 1e-6), "macs": ("macs", 1e-6)}
SUFFIX = {"latency": "ms", "size": "MB", "macs": "million MACs"}
LABELS = {"latency": "latency (ms)", "size": "ONNX size (MB)", "macs": "MACs (millions)"}


def objective_value(cost: dict, objective: str) -> float:
    key, scale = UNITS[objective]
    return cost[key] * scale


def timing_provider(device: str) -> str:
    """The provider the export stage would time first: CUDA when `device` allows a GPU and
    ONNX Runtime has it, else the CPU (TensorRT is left out: an engine build per architecture
    would cost more than the trial)."""
    wanted = onnx_tools.providers(device)
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in wanted else onnx_tools.CPU


def cost_key(arch: dict, params: Params) -> str:
    """What the cost depends on: the architecture, the batch and the provider asked for."""
    record = {
        "arch": arch,
        "batch": params.search.latency_batch,
        "provider": timing_provider(params.device),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def measure(arch: dict, params: Params, info: dict) -> dict:
    """Export the untrained architecture, time it (see the module doc), count it."""
    from pipeline.checkpoint import build_model
    from pipeline.pruning import count_macs_params

    torch.manual_seed(0)
    model = build_model(arch).eval()
    shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
    macs, n_params = count_macs_params(model, torch.zeros(1, *shape))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "arch.onnx"
        proto = onnx_tools.export_onnx(
            model, path, shape, opset=params.export.opset, mean=info["mean"], std=info["std"]
        )
        size = onnx_tools.file_size(path)
    provider = timing_provider(params.device)
    threads = THREADS if provider == onnx_tools.CPU else None
    session, actual = onnx_tools.session_for(proto.SerializeToString(), provider, threads)
    batch = params.search.latency_batch
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (max(batch, 8), shape[1], shape[2], shape[0]), dtype=np.uint8)
    rounds = onnx_tools.interleaved_latency(
        {"arch": session}, pixels, ROUNDS, RUNS, WARMUP, batch=batch
    )["arch"]
    latency = summarize_latency(rounds)
    return {
        "latency_ms": round(latency["latency_ms_p50_b1"], 5),
        "latency_spread_ms": round(latency["latency_spread_ms"], 5),
        "latency_batch": batch,
        "provider": actual,
        "macs": macs,
        "params": n_params,
        "size_bytes": size,
    }


def study_cost(study, arch: dict, params: Params, info: dict) -> dict:
    """The architecture's cost from the study's cache, measured and stored when absent."""
    attr = COST_ATTR + cost_key(arch, params)
    cached = study.user_attrs.get(attr)
    if cached is not None:
        return cached
    cost = measure(arch, params, info)
    cached = study.user_attrs.get(attr)  # another worker may have stored it meanwhile
    if cached is not None:
        return cached
    study.set_user_attr(attr, cost)
    return cost
