import dataclasses
import subprocess
import sys

import pytest
import yaml

from pipeline.config import Params, load_params, parse_params
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT, subprocess_env


def test_defaults_match_params_yaml():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.name == "digits"
    assert params.model.name == "cnn"
    assert params.train.lr > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "key", "allowed"),
    [
        ({"train": {"lr": -1}}, "train.lr", "0 < lr"),
        ({"train": {"lr": "fast"}}, "train.lr", "a number"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "an integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size", "1..65536"),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer", "sgd | adam | adamw"),
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate", "allowed keys"),
        ({"data": {"name": "imagenet"}}, "data.name", "digits | cifar10"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction", "0 < x < 1"),
        (
            {"data": {"val_fraction": 0.5, "test_fraction": 0.45}},
            "data.val_fraction + data.test_fraction",
            "< 0.9",
        ),
        ({"data": {"name": "imagefolder"}}, "data.root", "folder"),
        ({"model": {"name": "transformer"}}, "model.name", "cnn"),
        ({"model": {"name": "torchvision:nope"}}, "model.name", "torchvision"),
        ({"model": {"widths": [32, "x"]}}, "model.widths[1]", "an integer"),
        ({"model": {"depth": 9}}, "model.depth", "6n+2"),
        ({"device": "tpu"}, "device", "auto | cpu | cuda"),
        ({"search": {"reduction_factor": 1}}, "search.reduction_factor", "2..100"),
        ({"seed": True}, "seed", "an integer"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled", "true or false"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"train": [1, 2]}, "train", "mapping"),
    ],
)
def test_every_error_names_the_key_value_and_allowed(raw, key, allowed):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert allowed in message
    assert "\n" not in message


def test_values_are_typed_and_int_promotes_to_float():
    params = parse_params({"train": {"lr": 1, "weight_decay": 0}, "model": {"widths": [8, 16]}})
    assert isinstance(params.train.lr, float) and params.train.lr == 1.0
    assert params.model.widths == (8, 16)
    assert params == parse_params(params.to_dict())
    assert params.hash() == parse_params(params.to_dict()).hash()
    assert params.hash() != Params().hash()


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(path)


@pytest.mark.parametrize("stage", ["prepare", "train"])
def test_stage_exits_2_with_one_line_and_no_traceback(tmp_path, stage):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["train"]["lr"] = -1
    raw["data"]["val_fraction"] = 2 if stage == "prepare" else raw["data"]["val_fraction"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=subprocess_env({"PYTHONPATH": str(REPO_ROOT)}),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    expected = "data.val_fraction: got 2" if stage == "prepare" else "train.lr: got -1"
    assert lines[0].startswith(f"error: {expected}")
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
