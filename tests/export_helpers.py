"""Stand-ins for the compress stage's outputs, so export and inference are tested on their own.

`write_compress_outputs(params)` (run in a project folder) trains two tiny models on the
prepared digits, a "tuned" one and a narrower "pruned" one, saves them as pipeline checkpoints
and writes the four ONNX files (fp32 with `onnx_tools.export_onnx`, int8 and fp16 with the
compress stage's `onnx_tools.quantize_int8` / `convert_fp16`) and `reports/compress.json`, under
the names `pipeline.paths` fixes. `exported_project()` is such a project after one real
`python -m pipeline.export`, built once per test session and shared by the test modules.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path

from pipeline import onnx_tools, paths
from pipeline.checkpoint import arch_spec, save_checkpoint
from pipeline.config import Params, parse_params
from pipeline.data import DeviceData, load_prepared, prepare, save_prepared
from pipeline.files import write_json
from pipeline.train import train_and_evaluate
from pipeline.variants import NAMES, VARIANTS
from tests.conftest import TINY_PARAMS, copy_project, run_module, write_params

SOURCES = {v.name: v.source for v in VARIANTS}


def _with_widths(params: Params, widths: tuple[int, ...], epochs: int) -> Params:
    model = dataclasses.replace(params.model, widths=widths)
    train = dataclasses.replace(params.train, epochs=epochs)
    return dataclasses.replace(params, model=model, train=train)


def _variant(name: str, accuracies: dict, n_params: int) -> dict:
    path = SOURCES[name]
    return {
        "name": name,
        "path": str(path),
        "val_accuracy": accuracies["val"],
        "test_accuracy": accuracies["test"],
        "size_bytes": path.stat().st_size,
        "params": n_params,
        "macs": 1000 * n_params,  # a stand-in number, copied through to the manifest
        "accepted": True,
        "reason": "within budget",
    }


def write_compress_outputs(
    params: Params,
    widths: tuple[int, ...] = (16, 32),
    pruned_widths: tuple[int, ...] = (8, 16),
    epochs: int = 8,
) -> dict:
    """In the current folder (a project): prepared data, checkpoints, ONNX files, compress.json."""
    if not paths.DATASET_JSON.is_file():
        save_prepared(prepare(params.data, params.seed))
    prepared = load_prepared()
    data = DeviceData(prepared, "cpu")
    info, shape = prepared.info, tuple(prepared.info["shape"])
    variants = []
    for name, ckpt, w in (
        ("fp32", paths.TUNED_CKPT, widths),
        ("pruned_fp32", paths.PRUNED_CKPT, pruned_widths),
    ):
        p = _with_widths(params, w, epochs)
        outcome = train_and_evaluate(p, data, description=name)
        save_checkpoint(ckpt, outcome.model, arch_spec(p, info), p, info, outcome.metrics)
        onnx_tools.export_onnx(
            outcome.model, SOURCES[name], shape, mean=info["mean"], std=info["std"]
        )
        n_params = sum(t.numel() for t in outcome.model.parameters())
        accuracies = {s: outcome.metrics[f"{s}_accuracy"] for s in ("val", "test")}
        variants.append(_variant(name, accuracies, n_params))
    calibration = onnx_tools.pixels_nhwc(data.images["train"][:128])  # what the models take
    onnx_tools.quantize_int8(paths.PRUNED_FP32_ONNX, paths.PRUNED_INT8_ONNX, calibration)
    onnx_tools.convert_fp16(paths.PRUNED_FP32_ONNX, paths.PRUNED_FP16_ONNX)
    for name in ("int8", "fp16"):
        session, _ = onnx_tools.make_session(SOURCES[name], "cpu")
        accuracies = {
            s: float(
                (
                    onnx_tools.run_logits(session, onnx_tools.pixels_nhwc(data.images[s])).argmax(
                        1
                    )
                    == data.y[s].numpy()
                ).mean()
            )
            for s in ("val", "test")
        }
        variants.append(_variant(name, accuracies, variants[1]["params"]))
    metrics = {f"{v['name']}_val_accuracy": v["val_accuracy"] for v in variants}
    dense, pruned = variants[0], variants[1]
    metrics |= {
        "prune_ratio": 0.5,
        "prune_ratio_requested": 0.5,
        "max_accuracy_drop": 0.01,
        "macs_before": dense["macs"],
        "macs_after": pruned["macs"],
        "params_before": dense["params"],
        "params_after": pruned["params"],
    }
    metrics["variants"] = variants
    write_json(paths.report_file("compress"), metrics)  # what export reads
    return metrics


VARIANT_NAMES = list(NAMES)
_PROJECT: dict[str, object] = {}


def exported_project():
    """(project folder, completed `python -m pipeline.export` process), built once.

    A copy of the project with TINY_PARAMS (MLflow tracking into its own mlflow.db), stand-in
    compress outputs, and one real export run in a subprocess.
    """
    if "path" not in _PROJECT:
        root = Path(tempfile.mkdtemp(prefix="export-tests-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        project = copy_project(root / "project")
        write_params(project, TINY_PARAMS)
        with contextlib.chdir(project):
            write_compress_outputs(parse_params(TINY_PARAMS))
        _PROJECT["process"] = run_module(project, "pipeline.export")
        _PROJECT["path"] = project
    return _PROJECT["path"], _PROJECT["process"]
