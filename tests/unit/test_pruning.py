"""pipeline.pruning: real Torch-Pruning on every registry family, rebuilt from plain data."""

import dataclasses
import json

import pytest
import torch

from pipeline import pruning
from pipeline.checkpoint import (
    arch_spec,
    build_model,
    load_checkpoint,
    pruned_spec,
    save_checkpoint,
)
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare
from pipeline.engine import predict_logits

# resnet18 takes ~10 s to prune on 2 cores: the integration tier, not the fast one
PRUNABLE = [
    "cnn",
    "resnet",
    "lenet",
    pytest.param("torchvision:resnet18", marks=pytest.mark.integration),
]


@pytest.fixture(scope="module")
def data():
    return DeviceData(prepare(parse_params({}).data, seed=0), torch.device("cpu"))


def _plain(value) -> bool:
    """True when `value` holds only tensors and plain Python data (no module, no callable)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))


@pytest.mark.parametrize("name", PRUNABLE)
def test_pruning_reduces_macs_and_the_checkpoint_rebuilds_exactly(name, data, tmp_path):
    params = parse_params(
        {"model": {"name": name, "widths": [32, 64]}, "compress": {"finetune_epochs": 0}}
    )
    arch = arch_spec(params, data.info)
    torch.manual_seed(0)
    model = build_model(arch)
    with torch.no_grad():  # non-trivial batch-norm statistics, so the rebuild has to carry them
        model.train()(data.x["train"][:256])
    example = data.x["train"][:1]
    macs_before, params_before = pruning.count_macs_params(model, example)
    pruning.prune_and_finetune(model, data, 0.5, params.compress, params.train)
    macs_after, params_after = pruning.count_macs_params(model, example)
    assert macs_after < 0.8 * macs_before and params_after < 0.8 * params_before

    dense = build_model(arch)
    spec = pruned_spec(dense, model)
    assert spec["layers"] and spec["shapes"]
    for layer in spec["layers"].values():  # pruned widths are multiples of round_to (8)
        for attr in ("out_channels", "out_features"):
            assert layer.get(attr, 8) % 8 == 0
    head = pruning.protected_layers(model, example)[0]  # the classifier keeps every class
    assert getattr(head, "out_features", None) == 10 and head.in_features % 8 == 0

    path = tmp_path / "pruned.pt"
    save_checkpoint(path, model, arch | {"pruned": spec}, params, data.info, {})
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert _plain(blob)
    rebuilt, _ = load_checkpoint(path)
    assert pruning.count_macs_params(rebuilt, example) == (macs_after, params_after)
    x = data.x["test"]
    assert torch.equal(predict_logits(model.eval(), x), predict_logits(rebuilt, x))


@pytest.mark.integration  # a full-width resnet18 (3 s)
def test_torchvision_adapter_keeps_three_channels(data):
    params = parse_params({"model": {"name": "torchvision:resnet18"}})
    model = build_model(arch_spec(params, data.info))
    pruning.prune_and_finetune(
        model, data, 0.5, dataclasses.replace(params.compress, finetune_epochs=0), params.train
    )
    assert model.adapt.out_channels == 3 and model.body.conv1.in_channels == 3
    assert model.body.conv1.out_channels == 32 and model.body.fc.out_features == 10


def test_finetune_schedule_splits_epochs_between_steps():
    cfg = parse_params({}).compress
    schedule = pruning.finetune_schedule
    assert schedule(dataclasses.replace(cfg, prune_steps=1, finetune_epochs=8)) == [8]
    assert schedule(dataclasses.replace(cfg, prune_steps=3, finetune_epochs=8)) == [2, 2, 8]
    assert schedule(dataclasses.replace(cfg, prune_steps=4, finetune_epochs=2)) == [1, 1, 1, 2]
    assert schedule(dataclasses.replace(cfg, prune_steps=2, finetune_epochs=0)) == [0, 0]


def test_ratios_that_round_alike_give_the_same_widths(data):
    params = parse_params({"model": {"name": "cnn", "widths": [16, 32]}})
    model = build_model(arch_spec(params, data.info))
    cfg = dataclasses.replace(params.compress, prune_steps=1)

    def widths(ratio):
        return pruning.pruned_widths(model, data, ratio, cfg, params.train)

    assert json.loads(widths(0.5))["features.0.0"] == {"out_channels": 8}
    assert json.loads(widths(0.25))["features.2.0"]["out_channels"] == 24
    assert widths(0.3) == widths(0.5) != widths(0.25)
    assert model.features[0][0].out_channels == 16  # probing leaves the model alone


def test_finetune_config_is_a_low_cosine_without_warm_up():
    params = parse_params({"train": {"lr": 0.3, "scheduler": "onecycle", "batch_size": 32}})
    tuned = params.train
    finetune = pruning.finetune_config(tuned, params.compress)  # finetune_lr: null
    assert (finetune.lr, finetune.scheduler) == (pytest.approx(0.15), "cosine")
    assert dataclasses.replace(finetune, lr=tuned.lr, scheduler=tuned.scheduler) == tuned
    explicit = dataclasses.replace(params.compress, finetune_lr=0.004)
    assert pruning.finetune_config(tuned, explicit).lr == 0.004


@pytest.mark.integration
def test_fine_tuning_never_climbs_above_the_fine_tuning_lr(data):
    """The tuned OneCycle schedule would warm up to the tuned peak lr; fine-tuning decays from
    half of it (the engine records each epoch's final lr)."""
    params = parse_params(
        {"model": {"widths": [16, 32]}, "train": {"lr": 0.05, "scheduler": "onecycle"}}
    )
    model = build_model(arch_spec(params, data.info))
    cfg = dataclasses.replace(params.compress, prune_steps=1, finetune_epochs=3)
    lrs = []
    results = pruning.prune_and_finetune(
        model, data, 0.5, cfg, params.train, on_epoch=lambda epoch, m: lrs.append(m["lr"])
    )
    assert [r.epochs_run for r in results] == [3] and len(lrs) == 3
    assert all(lr < 0.025 for lr in lrs) and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)  # cosine to zero over the fine-tune
