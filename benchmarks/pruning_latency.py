"""Does pruning pay in latency? Batch-1 p50 of the pruned fp32 model against the dense one.

Task: the harder offline task made CIFAR-shaped (`_common.cifar_shaped_digits`: 150 training
images upscaled to 3x32x32; the digits' 270 val images). Model: the default `cnn` (32-64-128),
trained by the pipeline's engine with the default recipe. Pruning: the compress stage's own
ratio search (`ratio_search.prune_attempt` through `reuse_equal_widths` and `search_ratio`, i.e.
`pruning.prune_and_finetune`: L2 magnitude, widths rounded to `compress.round_to`, fine-tuned
by the engine), from `--ratio` with a 0.3-point val budget (`compress.max_accuracy_drop` 0.003)
and `compress.backoff_steps` bisection steps, fine-tuning `--finetune-epochs` (30: the
pipeline's default 8 epochs are 24 optimizer steps on 150 images, too few; ratio 0.5 then lost
12.6 points). Beside it: a control, the dense model trained as many more epochs with the
fine-tuning recipe (is a gain from pruning or from the extra training?), and `--compare-ratio`
pruned with `round_to` 8 and 1 (widths that are not multiples of 8): what the rounding buys.

Every model is exported by the compress stage's `onnx_variants.export_fp32`
(`onnx_tools.export_onnx`), scored on val in ONNX Runtime (paired difference to the dense
model, in points) and timed in one ONNX Runtime thread, all models interleaved: batch-1
latency by `onnx_tools.interleaved_latency` in `--rounds` rounds, batch-64 throughput by the
same in 4x as many short rounds (8 batches each), the order rotated every round; medians over
rounds, in brackets the middle half of the rounds (p25-p75). MACs
(`pruning.count_macs_params`) are shown beside the latency: their ratio overstates the gain.
The last line is dense / pruned batch-1 p50.

    python benchmarks/pruning_latency.py [--ratio R] [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cifar_shaped_digits, machine, print_table  # noqa: E402

from pipeline import onnx_tools, onnx_variants  # noqa: E402
from pipeline.config import parse_params  # noqa: E402
from pipeline.data import DeviceData  # noqa: E402
from pipeline.engine import correct_per_image, fit  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.pruning import (  # noqa: E402
    count_macs_params,
    finetune_config,
    finetune_schedule,
    pruned_widths,
)
from pipeline.ratio_search import prune_attempt, reuse_equal_widths, search_ratio  # noqa: E402

HARD_TRAIN_IMAGES = 150  # the harder offline task of search_efficiency.py
BATCH = 64


def conv_widths(model: torch.nn.Module) -> str:
    return "-".join(str(m.out_channels) for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def timings(models: dict, images: np.ndarray, rounds: int, runs: int) -> dict:
    """name -> {"p50": [per round ms], "tput": [per round img/s]}, every model interleaved."""
    sessions = {name: onnx_tools.session_for(path, threads=1)[0] for name, path in models.items()}
    latency = onnx_tools.interleaved_latency(
        sessions, images, rounds, runs, warmup_runs=20, min_round_s=0.2
    )
    # batch 64: many short rounds (8 batches of each model per round), order rotated
    batches = onnx_tools.interleaved_latency(sessions, images, 4 * rounds, 8, 3, batch=BATCH)
    return {
        n: {
            "p50": [float(np.median(r)) for r in latency[n]],
            "tput": [BATCH * 1e3 / float(np.median(r)) for r in batches[n]],
        }
        for n in sessions
    }


def _spread(values: list[float], digits: int) -> str:
    """The median over rounds and, in brackets, the middle half of the rounds (p25-p75)."""
    low, mid, high = np.percentile(values, [25, 50, 75])
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="first ratio the search tries")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    parser.add_argument(
        "--finetune-epochs", type=int, default=30, help="compress.finetune_epochs (default 8)"
    )
    parser.add_argument(
        "--compare-ratio", type=float, default=0.6, help="pruned with round_to 8 and 1"
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs, rounds and runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    epochs, rounds, runs = (5, 3, 50) if args.quick else (args.epochs, args.rounds, 300)
    compress = {
        "prune_ratio": args.ratio,
        "max_accuracy_drop": 0.003,
        "finetune_epochs": args.finetune_epochs,
    }
    params = parse_params({"device": "cpu", "train": {"epochs": epochs}, "compress": compress})
    data = DeviceData(cifar_shaped_digits(HARD_TRAIN_IMAGES), torch.device("cpu"))

    torch.manual_seed(params.seed)
    dense = create_model("cnn", data.num_classes, data.in_channels, data.image_size)
    result = fit(dense, data, params.train, seed=params.seed, progress=False, description="dense")
    if result.status != "ok":
        raise SystemExit(f"training the dense model failed: {result.message}")
    dense_correct = correct_per_image(dense, data)

    def search(p):
        attempt = reuse_equal_widths(
            lambda ratio: prune_attempt(dense, data, p, dense_correct, ratio),
            lambda ratio: pruned_widths(dense, data, ratio, p.compress, p.train),
        )
        return search_ratio(p.compress.prune_ratio, p.compress.backoff_steps, attempt)

    chosen, attempts = search(params)
    # control: the dense model trained as many more epochs with the fine-tuning recipe (does
    # the pruned model gain from pruning or from the extra training?)
    control = copy.deepcopy(dense)
    extra_epochs = sum(finetune_schedule(params.compress))
    finetune = finetune_config(params.train, params.compress)
    fit(control, data, finetune, seed=params.seed, epochs=extra_epochs, progress=False)
    compared = {}
    for round_to in (8, 1):
        cfg = dataclasses.replace(params.compress, round_to=round_to)
        p = dataclasses.replace(params, compress=cfg)
        compared[round_to] = prune_attempt(dense, data, p, dense_correct, args.compare_ratio)
    models = {
        "dense": dense,
        f"dense + {extra_epochs} epochs (control)": control,
        f"pruned {chosen.ratio:g} (kept)": chosen.model,
        f"pruned {args.compare_ratio:g}, round_to 8": compared[8].model,
        f"pruned {args.compare_ratio:g}, round_to 1": compared[1].model,
    }
    models = {name: model.cpu().eval() for name, model in models.items()}
    example = data.x["train"][:1].cpu()
    images = onnx_tools.pixels_nhwc(data.images["val"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, model) in enumerate(models.items()):
            paths[name] = Path(tmp) / f"model{i}.onnx"
            onnx_variants.export_fp32(copy.deepcopy(model), paths[name], data, {})
        dense_variant, dense_predictions = onnx_variants.measure(
            "dense", paths["dense"], data, (0, 0)
        )
        reference = dense_predictions == data.y["val"].cpu().numpy()
        times = timings(paths, images, rounds, runs)
        base_p50 = np.median(times["dense"]["p50"])
        base_tput = np.median(times["dense"]["tput"])
        dense_macs = count_macs_params(models["dense"], example)[0]
        for name, model in models.items():
            variant, _ = onnx_variants.measure(name, paths[name], data, (0, 0), reference)
            macs, n_params = count_macs_params(model, example)
            p50, tput = np.median(times[name]["p50"]), np.median(times[name]["tput"])
            rows.append(
                {
                    "model": name,
                    "widths": conv_widths(model),
                    "params": n_params,
                    "MMACs": macs / 1e6,
                    "val acc": f"{variant.val_accuracy:.4f}",
                    "vs dense pts": f"{100 * variant.val_difference.difference:+.2f}",
                    "p50 ms b1": _spread(times[name]["p50"], 4),
                    f"img/s b{BATCH}": _spread(times[name]["tput"], 0),
                    "MACs x": f"{dense_macs / macs:.2f}",
                    "b1 latency x": f"{base_p50 / p50:.2f}",
                    f"b{BATCH} tput x": f"{tput / base_tput:.2f}",
                }
            )
    print(f"machine: {machine()}, onnxruntime threads 1")
    print(
        f"task: {data.info['name']}, {data.info['counts']} images; dense cnn {epochs} epochs, "
        f"val {dense_variant.val_accuracy:.4f} in ONNX Runtime"
    )
    tried = ", ".join(
        f"{a.ratio:g} -> {100 * a.val_difference.difference:+.2f} pts"
        + (f" (same widths as {a.same_widths_as:g})" if a.same_widths_as is not None else "")
        for a in attempts
    )
    print(
        f"ratio search (budget 0.30 points, PyTorch fp32 on val): {tried}; kept {chosen.ratio:g}"
    )
    columns = ["model", "widths", "params", "MMACs", "val acc", "vs dense pts", "p50 ms b1"]
    columns += [f"img/s b{BATCH}", "MACs x", "b1 latency x", f"b{BATCH} tput x"]
    print_table(rows, columns)
    kept, rounded, unrounded = rows[2], rows[3], rows[4]
    overstated = float(kept["MACs x"]) / float(kept["b1 latency x"])
    print(
        f"pruned {chosen.ratio:g} vs dense: {kept['MACs x']}x fewer MACs, "
        f"{kept['b1 latency x']}x lower batch-1 p50 (MACs overstate it {overstated:.2f}x), "
        f"val {kept['vs dense pts']} points"
    )
    rounding = float(rounded["b1 latency x"]) / float(unrounded["b1 latency x"])
    print(
        f"ratio {args.compare_ratio:g}: widths {rounded['widths']} (round_to 8) run at "
        f"{rounding:.2f}x the speed of {unrounded['widths']} (round_to 1), with "
        f"{float(unrounded['MACs x']) / float(rounded['MACs x']):.2f}x the MACs of the latter"
    )
    print(f"pruning_latency wall {time.perf_counter() - start:.1f} s")
    print(f"speedup: {kept['b1 latency x']}x")


if __name__ == "__main__":
    main()
