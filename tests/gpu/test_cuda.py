"""CUDA paths (marked `gpu`: skipped without a GPU; run by benchmarks/gpu_check.sh)."""

import dataclasses

import pytest
import torch

from pipeline.checkpoint import arch_spec, build_model
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare
from pipeline.engine import autocast_context, fit, predict_logits, resolve_device

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def digits():
    return prepare(parse_params({}).data, seed=0)


def test_auto_device_is_cuda():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda").type == "cuda"


def test_engine_trains_on_cuda_with_bf16_and_channels_last(digits):
    params = parse_params({"train": {"epochs": 8}})
    data = DeviceData(digits, torch.device("cuda"), channels_last=True)
    assert data.x["train"].is_cuda
    assert data.x["train"].is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = build_model(arch_spec(params, data.info))
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1][0]
    layouts = []

    def on_epoch(epoch, metrics):
        layouts.append(conv.weight.is_contiguous(memory_format=torch.channels_last))

    result = fit(model, data, params.train, on_epoch=on_epoch, progress=False)
    assert result.status == "ok" and result.device.startswith("cuda")
    assert result.val_accuracy > 0.9
    assert next(model.parameters()).is_cuda
    assert layouts == [True] * 8  # NHWC while training, the default layout afterwards
    assert conv.weight.is_contiguous()
    with autocast_context(torch.device("cuda"), True):
        assert model(data.x["val"][:4]).dtype == torch.bfloat16
    logits = predict_logits(model, data.x["val"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_fp32_eager_switch_keeps_float32_and_contiguous(digits):
    params = parse_params({"train": {"epochs": 2, "amp": False, "channels_last": False}})
    data = DeviceData(digits, torch.device("cuda"), channels_last=False)
    model = build_model(arch_spec(params, data.info))
    result = fit(model, data, params.train, progress=False)
    assert result.status == "ok"
    with autocast_context(torch.device("cuda"), params.train.amp):
        assert model(data.x["val"][:4]).dtype == torch.float32


def test_cuda_and_cpu_reach_similar_accuracy(digits):
    params = parse_params({"train": {"epochs": 10}})
    accuracies = {}
    for device in ("cpu", "cuda"):
        data = DeviceData(digits, torch.device(device), channels_last=device == "cuda")
        torch.manual_seed(0)
        model = build_model(arch_spec(params, data.info))
        accuracies[device] = fit(model, data, params.train, progress=False).val_accuracy
    assert abs(accuracies["cpu"] - accuracies["cuda"]) < 0.03, accuracies


def test_onnx_providers_follow_what_really_runs(tmp_path, digits):
    import onnxruntime as ort

    from pipeline.onnx_tools import export_onnx, make_session, pixels_nhwc, providers, run_logits

    params = parse_params({"train": {"epochs": 1}})
    data = DeviceData(digits, torch.device("cuda"), channels_last=True)
    model = build_model(arch_spec(params, data.info))
    fit(model, data, dataclasses.replace(params.train, epochs=1), progress=False)
    path = tmp_path / "m.onnx"
    info = data.info
    export_onnx(model, path, tuple(info["shape"]), mean=info["mean"], std=info["std"])
    session, provider = make_session(path, "auto")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers("auto")[0] == "CUDAExecutionProvider"
        assert provider == "CUDAExecutionProvider"
    else:  # a CPU build of ONNX Runtime on a GPU machine: CPU, and said so
        assert providers("auto") == ["CPUExecutionProvider"]
        assert provider == "CPUExecutionProvider"
    x = data.x["test"][:64].float().cpu().contiguous()  # normalised: what the model reads
    ort_top1 = run_logits(session, pixels_nhwc(data.images["test"][:64])).argmax(1)
    torch_top1 = predict_logits(model.cpu().float(), x, amp=False).argmax(1)
    assert (ort_top1 == torch_top1.numpy()).mean() >= 0.99


def test_search_trials_run_on_the_gpu(tmp_path, digits):
    optuna = pytest.importorskip("optuna")
    from pipeline import search_study

    params = parse_params(
        {
            "tracking": {"enabled": False},
            "search": {"n_trials": 4, "epochs": 3, "storage": f"sqlite:///{tmp_path / 'o.db'}"},
        }
    )
    data = DeviceData(digits, torch.device("cuda"), channels_last=True)
    study = search_study.run_study(params, data, "gpu", None, progress=False)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4
    assert all(t.user_attrs["device"].startswith("cuda") for t in study.trials)
    assert max(t.value or 0 for t in study.trials) > 0.5
    assert optuna.__version__
