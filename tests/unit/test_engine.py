import dataclasses

import pytest
import torch

from pipeline import engine
from pipeline.checkpoint import arch_spec, build_model, load_checkpoint, save_checkpoint
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare
from pipeline.engine import augment_batch, fit, make_optimizer, predict_logits, resolve_device


@pytest.fixture(scope="module")
def digits():
    return prepare(parse_params({}).data, seed=0)


def _setup(digits, raw):
    params = parse_params(raw)
    data = DeviceData(digits, torch.device("cpu"))
    torch.manual_seed(params.seed)
    return params, data, build_model(arch_spec(params, data.info))


def test_fit_learns_and_is_deterministic_on_cpu(digits, tiny_params):
    runs = []
    for _ in range(2):
        params, data, model = _setup(digits, tiny_params)
        result = fit(model, data, params.train, seed=params.seed, progress=False)
        runs.append((result, model))
    (a, model_a), (b, model_b) = runs
    assert a.status == "ok" and a.epochs_run == tiny_params["train"]["epochs"]
    assert a.val_accuracy > 0.85  # 10 classes: chance is 0.1
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in b.history]
    for pa, pb in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert a.images_per_second > 0


def _wide_conv(model):
    """A conv with several input channels (a 1-channel weight is both NCHW and NHWC)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1][0]


def test_channels_last_trains_the_same_model_and_hands_back_the_default_layout(
    digits, tiny_params
):
    results, models = [], []
    for channels_last in (False, True):
        params, data, model = _setup(digits, tiny_params)
        cfg = dataclasses.replace(params.train, channels_last=channels_last)
        seen = []
        conv = _wide_conv(model)

        def on_epoch(epoch, metrics, conv=conv, seen=seen):
            seen.append(conv.weight.is_contiguous(memory_format=torch.channels_last))

        results.append(fit(model, data, cfg, seed=0, on_epoch=on_epoch, progress=False))
        models.append(model)
        assert seen == [channels_last] * len(seen)  # NHWC only while training
    dense, nhwc = results
    conv = _wide_conv(models[1]).weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    # the same maths in another layout: equal up to float rounding
    for a, b in zip(dense.history, nhwc.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=0.01)
    x = DeviceData(digits, torch.device("cpu")).x["test"]
    torch.testing.assert_close(
        predict_logits(models[0], x), predict_logits(models[1], x), atol=2e-3, rtol=1e-3
    )


def test_other_seed_gives_other_result(digits, tiny_params):
    params, data, model = _setup(digits, tiny_params)
    a = fit(model, data, params.train, seed=0, epochs=1, progress=False)
    params, data, model = _setup(digits, tiny_params)
    b = fit(model, data, params.train, seed=1, epochs=1, progress=False)
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]


def test_nan_loss_stops_with_a_clear_status(digits, tiny_params):
    params, data, model = _setup(digits, tiny_params)
    data.x["train"][5, 0, 3, 3] = float("nan")  # one corrupt pixel poisons loss and weights
    seen = []
    result = fit(model, data, params.train, progress=False, on_epoch=lambda e, m: seen.append(e))
    assert result.status == "diverged"
    assert "nan" in result.message or "inf" in result.message
    assert "epoch 1" in result.message
    assert seen == [] and result.epochs_run == 0


def test_on_epoch_called_each_epoch_and_may_stop_training(digits, tiny_params):
    params, data, model = _setup(digits, tiny_params)

    class Stop(Exception):
        pass

    calls = []

    def on_epoch(epoch, metrics):
        calls.append((epoch, metrics["val_accuracy"]))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(model, data, params.train, on_epoch=on_epoch, progress=False)
    assert [e for e, _ in calls] == [1, 2]
    assert all(0 <= acc <= 1 for _, acc in calls)


def test_checkpoint_round_trip_weights_only_identical_outputs(digits, tiny_params, tmp_path):
    params, data, model = _setup(digits, tiny_params)
    fit(model, data, dataclasses.replace(params.train, epochs=1), progress=False)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, arch_spec(params, data.info), params, data.info, {"x": 1.0})
    blob = torch.load(path, weights_only=True)  # plain data only: no pickled module
    assert blob["config"] == params.to_dict()
    assert blob["classes"] == data.info["classes"]
    assert blob["normalization"]["mean"] == data.info["mean"]
    rebuilt, _ = load_checkpoint(path)
    x = data.x["test"]
    assert torch.equal(predict_logits(model, x), predict_logits(rebuilt, x))


def test_augment_crop_shifts_content_and_flip_mirrors():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16) + 1
    assert augment_batch(x, "none", gen) is x
    out = augment_batch(x, "crop", gen)
    assert out.shape == x.shape
    # every output row/column is a shifted window of the input (or zero padding)
    for i in range(2):
        nonzero = out[i, 0][out[i, 0] != 0]
        assert set(nonzero.tolist()) <= set(x[i, 0].flatten().tolist())
    flips = augment_batch(x.repeat(50, 1, 1, 1), "crop_flip", gen)
    # with flips, some windows have decreasing values along the width
    decreasing = (flips[:, 0, 8, 3] > flips[:, 0, 8, 4]).float().mean().item()
    assert 0.2 < decreasing < 0.8


def test_resolve_device_without_a_gpu_falls_back_to_the_cpu(monkeypatch, recwarn):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, or a GPU one
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert len(recwarn) == 0
    with pytest.warns(UserWarning, match="^device: cuda requested but not available; using cpu$"):
        assert resolve_device("cuda") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")  # auto is the default


def test_resolve_device_with_a_gpu_picks_cuda_for_auto(monkeypatch, recwarn):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert len(recwarn) == 0


@pytest.mark.parametrize("mode", ["crop", "crop_flip"])
def test_augment_keeps_the_layout_it_is_given_and_the_same_values(mode):
    x = torch.randn(6, 3, 16, 16)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    a = augment_batch(x, mode, torch.Generator().manual_seed(1))
    b = augment_batch(nhwc, mode, torch.Generator().manual_seed(1))
    assert a.is_contiguous() and not a.is_contiguous(memory_format=torch.channels_last)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def _conv_dtypes(model, data, cfg):
    """(training forward dtypes, evaluation forward dtypes) of the first conv during `fit`."""
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, out: seen.append((m.training, out.dtype)))
    result = fit(model, data, cfg, seed=0, progress=False)
    hook.remove()
    assert result.status == "ok"
    return {d for training, d in seen if training}, {d for training, d in seen if not training}


def test_amp_cpu_trains_in_bf16_and_evaluates_in_fp32(digits, tiny_params, monkeypatch):
    # bf16 autocast runs on any CPU (emulated without AVX512-BF16), so this runs everywhere
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    params, data, model = _setup(digits, tiny_params)
    cfg = dataclasses.replace(params.train, epochs=1)
    assert _conv_dtypes(model, data, cfg) == ({torch.float32}, {torch.float32})
    params, data, model = _setup(digits, tiny_params)
    amp = dataclasses.replace(cfg, amp_cpu=True)
    assert _conv_dtypes(model, data, amp) == ({torch.bfloat16}, {torch.float32})
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_amp_cpu_without_native_bf16_warns_and_trains_in_fp32(digits, tiny_params, monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    params, data, model = _setup(digits, tiny_params)
    cfg = dataclasses.replace(params.train, epochs=1, amp_cpu=True)
    with pytest.warns(UserWarning, match=r"^train\.amp_cpu: this CPU has no native bf16"):
        assert _conv_dtypes(model, data, cfg)[0] == {torch.float32}


def test_amp_cpu_is_part_of_the_study_recipe_only_when_on(tiny_params):
    from pipeline.study import study_name

    params = parse_params(tiny_params)
    amp = dataclasses.replace(params, train=dataclasses.replace(params.train, amp_cpu=True))
    assert study_name(amp, "sha") != study_name(params, "sha")  # bf16 changes the results


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_update_with_multi_tensor_kernels(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    cfg = dataclasses.replace(parse_params({}).train, optimizer=name)
    optimizer = make_optimizer(model, cfg)
    assert optimizer.defaults["foreach"] is True  # PyTorch's CPU default: one tensor at a time
    assert len(optimizer.param_groups[0]["params"]) == 4
