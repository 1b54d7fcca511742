"""The export stage's GPU path and CUDA inference (marked `gpu`: skipped without a GPU).

Self-contained (no MLflow, no files from other stages): a small model trained on digits, its
fp32 / int8 / fp16 ONNX files, then `export.run` with the GPU check, and `OnnxClassifier` on
CUDA against the CPU. Run by benchmarks/gpu_check.sh with the other `tests/gpu` tests.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import onnx_tools, paths
from pipeline.checkpoint import arch_spec, build_model
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare
from pipeline.engine import fit
from pipeline.export_checks import gpu_check, gpu_status
from pipeline.inference import METADATA_FORMAT, OnnxClassifier

pytestmark = pytest.mark.gpu
CUDA = "CUDAExecutionProvider"


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


# A GPU machine may carry the CPU build of ONNX Runtime (no CUDA provider compiled in): then
# the CUDA-provider tests skip and the fallback test below runs instead.
needs_ort_cuda = pytest.mark.skipif(not _ort_has_cuda(), reason="ONNX Runtime has no CUDA EP")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(folder with fp32 / int8 / fp16 ONNX files carrying pipeline metadata, model, data)."""
    params = parse_params({"model": {"widths": [16, 32]}, "train": {"epochs": 8}})
    data = DeviceData(prepare(params.data, seed=0), torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(arch_spec(params, data.info))
    assert fit(model, data, params.train, progress=False).status == "ok"
    model.eval()
    info = data.info
    metadata = {
        "classes": info["classes"],
        "mean": info["mean"],
        "std": info["std"],
        "input_shape": info["shape"],
        "input_layout": "NHWC",
        "format": METADATA_FORMAT,
    }
    folder = tmp_path_factory.mktemp("gpu_export")
    fp32 = folder / "model_fp32.onnx"
    stats = {"mean": info["mean"], "std": info["std"]}
    onnx_tools.export_onnx(model, fp32, tuple(info["shape"]), metadata, **stats)
    calibration = onnx_tools.pixels_nhwc(data.images["train"][:128])
    onnx_tools.quantize_int8(fp32, folder / "model_int8.onnx", calibration)
    onnx_tools.convert_fp16(fp32, folder / "model_fp16.onnx")
    return folder, model, data


def test_cpu_onnxruntime_on_a_gpu_machine_falls_back_and_says_why(exported):
    if _ort_has_cuda():
        pytest.skip("this ONNX Runtime has a CUDA provider")
    status, providers = gpu_status(parse_params({"device": "auto"}))
    assert providers == [] and status == "no GPU provider in this ONNX Runtime build"
    folder, _, data = exported
    with pytest.warns(UserWarning, match="using the CPU"):
        clf = OnnxClassifier(folder / "model_fp32.onnx", device="cuda")
    assert clf.provider == "CPUExecutionProvider"
    logits = onnx_tools.run_logits(clf.session, onnx_tools.pixels_nhwc(data.images["test"]))
    assert (logits.argmax(1) == data.y["test"].numpy()).mean() >= 0.9
    with pytest.raises(Exception, match="require_gpu"):
        gpu_status(parse_params({"device": "auto", "export": {"require_gpu": True}}))


@needs_ort_cuda
def test_cuda_is_offered_only_because_a_gpu_works():
    assert CUDA in onnx_tools.gpu_providers()
    status, providers = gpu_status(parse_params({"device": "auto"}))
    assert status == "pending" and CUDA in providers
    assert gpu_status(parse_params({"device": "cpu"})) == ("not requested (device: cpu)", [])


@needs_ort_cuda
@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
def test_classifier_runs_on_cuda_and_agrees_with_the_cpu(exported, variant):
    folder, _, data = exported
    path = folder / f"model_{variant}.onnx"
    gpu = OnnxClassifier(path, device="cuda")
    cpu = OnnxClassifier(path, device="cpu")
    assert gpu.provider == CUDA and cpu.provider == "CPUExecutionProvider"
    x = onnx_tools.pixels_nhwc(data.images["test"])  # uint8 pixels: the graph normalises
    gpu_logits = onnx_tools.run_logits(gpu.session, x)
    cpu_logits = onnx_tools.run_logits(cpu.session, x)
    agreement = (gpu_logits.argmax(1) == cpu_logits.argmax(1)).mean()
    assert agreement >= 0.99, agreement
    accuracy = (gpu_logits.argmax(1) == data.y["test"].numpy()).mean()
    assert accuracy >= 0.9
    records, sessions = gpu_check(
        variant, path.read_bytes(), x, cpu_logits, parse_params({}).export, [CUDA]
    )
    assert records[0]["ran"] and records[0]["passed"], records
    timing = onnx_tools.benchmark(sessions[CUDA], x, 64, 2, 10)
    assert timing["latency_ms_p50_b1"] > 0 and timing["throughput_b64"] > 0


@needs_ort_cuda
def test_export_run_checks_every_variant_on_the_gpu_and_times_it_there(exported):
    pytest.importorskip("matplotlib")  # pipeline.export draws the latency plot
    import onnx

    from pipeline import export

    folder, model, data = exported
    fp32 = onnx.load(str(folder / "model_fp32.onnx"))
    sources = {
        paths.DENSE_FP32_ONNX: fp32,
        paths.PRUNED_FP32_ONNX: fp32,
        paths.PRUNED_INT8_ONNX: onnx.load(str(folder / "model_int8.onnx")),
        paths.PRUNED_FP16_ONNX: onnx.load(str(folder / "model_fp16.onnx")),
    }
    entries = {
        p.name: {"path": str(p), "accepted": True, "reason": "", "params": 1, "macs": 1}
        for p in sources
    }
    inputs = export.ExportInputs(
        data.info,
        {split: data.x[split].numpy() for split in ("val", "test")},
        {split: data.y[split].numpy() for split in ("val", "test")},
        {paths.TUNED_CKPT: model, paths.PRUNED_CKPT: model},
        sources,
        entries,
        {split: onnx_tools.pixels_nhwc(data.images[split]) for split in ("val", "test")},
    )
    params = parse_params({"device": "auto", "export": {"latency_runs": 10, "warmup_runs": 2}})
    result = export.run(params, inputs)
    assert result.manifest["gpu"].startswith("ok: ") and CUDA in result.manifest["gpu"]
    checks = [c for c in result.manifest["gpu_checks"] if c["provider"] == CUDA]
    assert len(checks) == 4 and all(c["ran"] and c["passed"] for c in checks)
    for entry in result.manifest["variants"]:
        assert entry["provider"] in (CUDA, "TensorrtExecutionProvider")
        assert set(entry["latency"]) >= {CUDA, "CPUExecutionProvider"}
    assert sum(e["recommended"] for e in result.manifest["variants"]) == 1
