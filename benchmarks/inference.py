"""Inference speed: PyTorch eager fp32 against ONNX Runtime fp32, int8 and fp16, side by side.

Models: the exported variants of the default run (exported_models/manifest.json, when present)
and a CIFAR-size `cnn` and `resnet` (3x32x32, 10 classes) that this script exports through the
pipeline's own ONNX helper (`pipeline.onnx_tools`: export_onnx, quantize_int8, convert_fp16).
Every engine is timed by the same function (`onnx_tools.benchmark`: batch-1 latency p50/p95,
batch-64 throughput from the median run). The last line is int8 over ONNX Runtime fp32
throughput on the CIFAR-size cnn.

    python benchmarks/inference.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, print_table, synthetic_prepared  # noqa: E402

from pipeline import onnx_tools  # noqa: E402
from pipeline.models import create_model  # noqa: E402

BATCH = 64


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


def pixel_images(n: int) -> tuple[np.ndarray, dict]:
    """(n synthetic CIFAR-shaped images as the models take them, uint8 NHWC; dataset info)."""
    prepared = synthetic_prepared(n)
    return onnx_tools.pixels_nhwc(prepared.splits["train"][0]), prepared.info


def cifar_variants(name: str, options: dict, folder: Path, images: np.ndarray, info) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 10, 3, 32, **options).eval()
    fp32 = folder / f"{name}_fp32.onnx"
    stats = {"mean": info["mean"], "std": info["std"]}
    onnx_tools.export_onnx(model, fp32, (3, 32, 32), **stats)
    onnx_tools.quantize_int8(fp32, folder / f"{name}_int8.onnx", images[:128])
    onnx_tools.convert_fp16(fp32, folder / f"{name}_fp16.onnx")
    return {
        "torch eager fp32": TorchSession(model, **stats),
        "onnxruntime fp32": fp32,
        "onnxruntime int8": folder / f"{name}_int8.onnx",
        "onnxruntime fp16": folder / f"{name}_fp16.onnx",
    }


def exported_variants() -> dict:
    manifest = Path("exported_models/manifest.json")
    if not manifest.is_file():
        return {}
    entries = json.loads(manifest.read_text())["variants"]
    return {
        f"onnxruntime {e['name']}": Path(e["path"]) for e in entries if Path(e["path"]).is_file()
    }


def measure(label: str, variants: dict, images: np.ndarray, runs: int) -> list[dict]:
    rows = []
    for engine, model in variants.items():
        session = model if isinstance(model, TorchSession) else onnx_tools.session_for(model)[0]
        result = onnx_tools.benchmark(session, images, BATCH, warmup_runs=10, runs=runs)
        size = model.stat().st_size / 1e6 if isinstance(model, Path) else None
        rows.append(
            {
                "model": label,
                "engine": engine,
                "MB": size,
                "p50 ms b1": result["latency_ms_p50_b1"],
                "p95 ms b1": result["latency_ms_p95_b1"],
                f"img/s b{BATCH}": result[f"throughput_b{BATCH}"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = 50 if args.quick else 300
    images, info = pixel_images(256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cnn = cifar_variants("cnn", {}, Path(tmp), images, info)
        rows += measure("cnn 3x32x32", cnn, images, runs)
        if not args.quick:
            resnet = cifar_variants("resnet", {"depth": 20}, Path(tmp), images, info)
            rows += measure("resnet20 3x32x32", resnet, images, runs)
    exported = exported_variants()
    if exported:
        import onnxruntime as ort

        first = next(iter(exported.values()))
        shape = [
            d if isinstance(d, int) else 1
            for d in ort.InferenceSession(str(first)).get_inputs()[0].shape[1:]
        ]
        digits = np.random.default_rng(0).integers(0, 256, (256, *shape), dtype=np.uint8)
        rows += measure("exported (default run)", exported, digits, runs)
    print(f"machine: {machine()}")
    print_table(rows, ["model", "engine", "MB", "p50 ms b1", "p95 ms b1", f"img/s b{BATCH}"])
    cnn_rows = {r["engine"]: r[f"img/s b{BATCH}"] for r in rows if r["model"] == "cnn 3x32x32"}
    print(
        f"ort fp32 / torch eager (cnn b{BATCH}): "
        f"{cnn_rows['onnxruntime fp32'] / cnn_rows['torch eager fp32']:.2f}x"
    )
    print(f"speedup: {cnn_rows['onnxruntime int8'] / cnn_rows['onnxruntime fp32']:.2f}x")


if __name__ == "__main__":
    main()
