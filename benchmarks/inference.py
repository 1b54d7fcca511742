"""Inference speed and int8 accuracy: PyTorch eager fp32 against ONNX Runtime fp32, int8, fp16.

Models: a CIFAR-size `cnn` (default widths 32-64-128) and `resnet` (depth 20), trained with the
pipeline's engine on the harder offline task made CIFAR-shaped (`_common.cifar_shaped_digits`:
150 training images upscaled to 3x32x32; the digits' 270 val images), then written as the
compress stage writes its variants (`onnx_variants.export_fp32`; int8 by
`onnx_tools.quantize_int8` calibrated on `onnx_variants.calibration_images`, as
`export_variants` does; fp16 by `onnx_tools.convert_fp16`) and scored on val by
`onnx_variants.measure` (accuracy, paired difference to fp32 in points). Also, speed only, the
exported variants of the default run (exported_models/manifest.json, when present).

Timing, per model, every engine interleaved so a slow spell of a shared machine hits all alike
(one ONNX Runtime thread per session, `--threads`), by `onnx_tools.interleaved_latency`: batch-1
latency in `--rounds` rounds, batch-64 throughput in 4x as many short rounds (8 batches each),
the order rotated every round; medians over rounds, in brackets the middle half of the rounds
(p25-p75). The last line is int8 over ONNX Runtime fp32 throughput at batch 64,
the lower of the cnn's and the resnet's.

    python benchmarks/inference.py [--quick] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
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

BATCH = 64
HARD_TRAIN_IMAGES = 150  # the harder offline task of search_efficiency.py
MODELS = {"cnn": ("cnn", {}), "resnet20": ("resnet", {"depth": 20})}
FP32 = "onnxruntime fp32"


class TorchSession:
    """PyTorch eager behind ONNX Runtime's `run` interface, so one timer measures both. Fed the
    same uint8 NHWC pixels as the ONNX models, it scales and normalises them as their graphs do.
    """

    class _Input:
        name = "input"

    def __init__(self, model: torch.nn.Module, mean: list, std: list):
        self.model = model.eval()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def get_inputs(self):
        return [self._Input()]

    def run(self, _outputs, feeds):
        with torch.inference_mode():
            x = torch.from_numpy(feeds["input"]).permute(0, 3, 1, 2).float() / 255
            return [self.model((x - self.mean) / self.std).numpy()]


def trained_model(name: str, options: dict, data: DeviceData, epochs: int) -> torch.nn.Module:
    """The model trained by the pipeline's engine with the default recipe for `epochs`."""
    torch.manual_seed(0)
    model = create_model(name, data.num_classes, data.in_channels, data.image_size, **options)
    cfg = parse_params({"device": "cpu", "train": {"epochs": epochs}}).train
    result = fit(model, data, cfg, seed=0, progress=False, description=name)
    if result.status != "ok":
        raise SystemExit(f"training {name} failed: {result.message}")
    return model.cpu().eval()


def cifar_variants(name: str, model: torch.nn.Module, folder: Path, data: DeviceData) -> dict:
    """engine -> ONNX path (or a TorchSession), written as the compress stage writes them."""
    files = {v: folder / f"{name}_{v}.onnx" for v in ("fp32", "int8", "fp16")}
    onnx_variants.export_fp32(model, files["fp32"], data, {"variant": "fp32"})
    calibration = onnx_variants.calibration_images(data, 256, seed=0)
    onnx_tools.quantize_int8(files["fp32"], files["int8"], calibration)
    onnx_tools.convert_fp16(files["fp32"], files["fp16"])
    files["int8 per-channel mean/std"] = per_channel_preprocessing(files["int8"])
    torch_session = TorchSession(model, data.info["mean"], data.info["std"])
    return {"torch eager fp32": torch_session} | {f"onnxruntime {v}": p for v, p in files.items()}


def per_channel_preprocessing(int8: Path) -> Path:
    """The int8 model as `quantize_int8` wrote it before `expand_preprocessing_constants`:
    the normalisation's mean / std one value per channel (for the comparison only)."""
    import onnx

    proto = onnx.load(str(int8))
    graph = proto.graph
    expands = [n for n in graph.node if n.op_type == "Expand" and n.name.startswith("preprocess/")]
    renamed = {n.output[0]: n.input[0] for n in expands}
    for node in expands:
        graph.node.remove(node)
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    path = int8.with_name(f"{int8.stem}_per_channel.onnx")
    onnx_tools.save_model(proto, path)
    return path


def val_scores(variants: dict, model: torch.nn.Module, data: DeviceData) -> dict:
    """engine -> (val accuracy, paired difference to ONNX Runtime fp32 in points, or None)."""
    fp32, predictions = onnx_variants.measure(FP32, variants[FP32], data, (0, 0))
    reference = predictions == data.y["val"].cpu().numpy()
    scores = {
        "torch eager fp32": (float(correct_per_image(model, data).mean()), None),
        FP32: (fp32.val_accuracy, None),
    }
    for engine, path in variants.items():
        if isinstance(path, Path) and engine != FP32:
            variant, _ = onnx_variants.measure(engine, path, data, (0, 0), reference, predictions)
            scores[engine] = (variant.val_accuracy, 100 * variant.val_difference.difference)
    return scores


def all_digits_check(variants: dict) -> str:
    """int8 against fp32 on every image of digits, CIFAR-shaped (the training images this
    task leaves out, val and test: a larger sample than val, where one image is 0.37 points)."""
    full = cifar_shaped_digits(None)
    pixels = np.concatenate([onnx_tools.pixels_nhwc(x) for x, _ in full.splits.values()])
    labels = np.concatenate([y.numpy() for _, y in full.splits.values()])
    top1 = {}
    for engine in (FP32, "onnxruntime int8"):
        session, _ = onnx_tools.session_for(variants[engine], threads=1)
        top1[engine] = onnx_tools.run_logits(session, pixels).argmax(1)
    fp32, int8 = top1[FP32], top1["onnxruntime int8"]
    points = 100 * ((int8 == labels).mean() - (fp32 == labels).mean())
    return (
        f"{len(labels)} images ({len(labels) - HARD_TRAIN_IMAGES} not trained on): "
        f"{int((int8 != fp32).sum())} disagree, accuracy {points:+.2f} points"
    )


def optimized_ops(path: Path, folder: Path) -> str:
    """Node types of the graph ONNX Runtime runs (`SessionOptions.optimized_model_filepath`,
    its default optimisations), most frequent first."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not its note that the saved graph suits this CPU only
    options.optimized_model_filepath = str(folder / f"{path.stem}_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    return ", ".join(f"{op} {n}" for op, n in counts.most_common())


def exported_variants() -> dict:
    manifest = Path("exported_models/manifest.json")
    if not manifest.is_file():
        return {}
    entries = json.loads(manifest.read_text())["variants"]
    return {
        f"onnxruntime {e['name']}": Path(e["path"]) for e in entries if Path(e["path"]).is_file()
    }


def timings(variants: dict, images: np.ndarray, rounds: int, runs: int, threads: int) -> dict:
    """engine -> {"p50": [per round ms], "p95": ..., "tput": [per round img/s]}, interleaved."""
    sessions = {
        engine: model
        if isinstance(model, TorchSession)
        else onnx_tools.session_for(model, threads=threads)[0]
        for engine, model in variants.items()
    }
    latency = onnx_tools.interleaved_latency(sessions, images, rounds, runs, warmup_runs=10)
    out = {
        e: {
            "p50": [float(np.percentile(r, 50)) for r in latency[e]],
            "p95": [float(np.percentile(r, 95)) for r in latency[e]],
            "tput": [],
        }
        for e in sessions
    }
    # batch 64: many short rounds (8 batches of each engine per round, the order rotated), so
    # that a slow spell of a shared machine hits every engine alike; img/s per round's median
    batches = onnx_tools.interleaved_latency(sessions, images, 4 * rounds, 8, 3, batch=BATCH)
    for e in sessions:
        out[e]["tput"] = [BATCH * 1e3 / float(np.median(r)) for r in batches[e]]
    return out


def _spread(values: list[float], digits: int) -> str:
    """The median over rounds and, in brackets, the middle half of the rounds (p25-p75)."""
    low, mid, high = np.percentile(values, [25, 50, 75])
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def rows_for(label: str, variants: dict, times: dict, scores: dict) -> list[dict]:
    rows = []
    base = times.get(FP32)
    for engine, model in variants.items():
        t = times[engine]
        row = {
            "model": label,
            "engine": engine,
            "MB": model.stat().st_size / 1e6 if isinstance(model, Path) else None,
            "p50 ms b1": _spread(t["p50"], 4),
            "p95 ms b1": float(np.median(t["p95"])),
            f"img/s b{BATCH}": _spread(t["tput"], 0),
        }
        if base:
            row["x fp32 b64"] = f"{np.median(t['tput']) / np.median(base['tput']):.2f}"
            row["x fp32 b1"] = f"{np.median(base['p50']) / np.median(t['p50']):.2f}"
        if engine in scores:
            accuracy, points = scores[engine]
            row["val acc"] = f"{accuracy:.4f}"
            row["vs fp32 pts"] = "" if points is None else f"{points:+.2f}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cnn only, fewer runs and epochs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = 30 if args.quick else 200
    rounds = 3 if args.quick else args.rounds
    epochs = 5 if args.quick else args.epochs
    start = time.perf_counter()
    data = DeviceData(cifar_shaped_digits(HARD_TRAIN_IMAGES), torch.device("cpu"))
    images = onnx_tools.pixels_nhwc(data.images["val"])
    rows, speedups, graphs, checks = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, options) in MODELS.items():
            if args.quick and name != "cnn":
                continue
            model = trained_model(name, options, data, epochs)
            variants = cifar_variants(name, model, Path(tmp), data)
            scores = val_scores(variants, model, data)
            graphs[label] = optimized_ops(variants["onnxruntime int8"], Path(tmp))
            checks[label] = all_digits_check(variants)
            times = timings(variants, images, rounds, runs, args.threads)
            rows += rows_for(f"{label} 3x32x32", variants, times, scores)
            tput = {e: np.median(t["tput"]) for e, t in times.items()}
            p50 = {e: np.median(t["p50"]) for e, t in times.items()}
            speedups[label] = (
                tput["onnxruntime int8"] / tput[FP32],
                p50[FP32] / p50["onnxruntime int8"],
                scores["onnxruntime int8"][1],
            )
    exported = exported_variants()
    if exported:
        import onnxruntime as ort

        first = next(iter(exported.values()))
        shape = [
            d if isinstance(d, int) else 1
            for d in ort.InferenceSession(str(first)).get_inputs()[0].shape[1:]
        ]
        digits = np.random.default_rng(0).integers(0, 256, (256, *shape), dtype=np.uint8)
        times = timings(exported, digits, rounds, runs, args.threads)
        rows += rows_for("exported (default run)", exported, times, {})
    print(f"machine: {machine()}, onnxruntime threads {args.threads}")
    print(f"task: {data.info['name']}, {data.info['counts']} images, {epochs} epochs")
    columns = ["model", "engine", "MB", "val acc", "vs fp32 pts", "p50 ms b1", "p95 ms b1"]
    columns += [f"img/s b{BATCH}", "x fp32 b64", "x fp32 b1"]
    print_table(rows, columns)
    for label, (b64, b1, points) in speedups.items():
        print(
            f"int8 / fp32 ({label}): {b64:.2f}x throughput at batch {BATCH}, {b1:.2f}x lower "
            f"batch-1 p50, val {points:+.2f} points"
        )
    for label, check in checks.items():
        print(f"int8 / fp32 ({label}) on all of digits, CIFAR-shaped, {check}")
    for label, ops in graphs.items():
        print(f"int8 {label} as ONNX Runtime runs it: {ops}")
    print(f"inference wall {time.perf_counter() - start:.1f} s")
    print(f"speedup: {min(b64 for b64, _, _ in speedups.values()):.2f}x")


if __name__ == "__main__":
    main()
