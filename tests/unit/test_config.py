"""params.yaml -> typed, frozen dataclasses: defaults, types, ranges, one-line errors."""

import dataclasses
import hashlib
import json
import typing

import pytest
import yaml

from pipeline import prepare, train
from pipeline.config import (
    Params,
    SearchConfig,
    build,
    check_tracking_uri,
    load_params,
    parse_params,
)
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT, run_module


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every non-mapping value of a nested mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fields(cls, prefix: str = "") -> dict:
    """{"a.b": dataclasses.Field} for every leaf field of a dataclass tree (from the classes)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def test_params_yaml_lists_every_field_with_its_dataclass_default():
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    in_yaml, fields = _leaves(raw), _fields(Params)
    assert len(fields) > 50  # the walk reached every section
    assert sorted(set(fields) - set(in_yaml)) == [], "fields missing from params.yaml"
    assert sorted(set(in_yaml) - set(fields)) == [], "params.yaml keys without a field"
    differ = {}
    for key, f in fields.items():
        value, default = in_yaml[key], f.default
        plain = list(default) if isinstance(default, tuple) else default
        # bool is an int in Python: compare the kinds too, so `true` never equals 1
        if value != plain or isinstance(value, bool) != isinstance(plain, bool):
            differ[key] = {"params.yaml": value, "default": plain}
    assert differ == {}
    assert load_params(REPO_ROOT / "params.yaml") == Params()


def test_every_default_passes_its_own_range_check():
    checked = 0
    for key, f in _fields(Params).items():
        check = f.metadata.get("check")
        if check is not None and f.default is not None:
            assert check(f.default), (key, f.default)
            checked += 1
    assert checked > 30


def test_params_are_frozen():
    params = load_params(REPO_ROOT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"lr": -1}}, "train.lr: got -1; expected 0 < lr <= 10"),
        ({"train": {"lr": 0}}, "train.lr: got 0; expected 0 < lr <= 10"),
        ({"train": {"lr": "fast"}}, "train.lr: got 'fast'; expected a number"),
        ({"train": {"lr": True}}, "train.lr: got True; expected a number"),
        ({"train": {"epochs": 2.5}}, "train.epochs: got 2.5; expected an integer"),
        ({"train": {"epochs": True}}, "train.epochs: got True; expected an integer"),
        ({"train": {"epochs": "3"}}, "train.epochs: got '3'; expected an integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size: got 0; expected 1..65536"),
        (
            {"train": {"optimizer": "lbfgs"}},
            "train.optimizer: got 'lbfgs'; expected one of sgd | adam | adamw",
        ),
        ({"train": {"amp": 1}}, "train.amp: got 1; expected true or false"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled: got 'yes'; expected true or false"),
        ({"tracking": {"uri": 5}}, "tracking.uri: got 5; expected a string or null"),
        ({"tracking": {"experiment": 5}}, "tracking.experiment: got 5; expected a string"),
        ({"search": {"timeout_s": "1h"}}, "search.timeout_s: got '1h'; expected a number or null"),
        ({"search": {"timeout_s": 0}}, "search.timeout_s: got 0; expected > 0 or null"),
        ({"search": {"reduction_factor": 1}}, "search.reduction_factor: got 1; expected 2..100"),
        (
            {"search": {"epochs": 2, "min_epochs": 3}},
            "search.min_epochs: got 3; expected <= search.epochs (2)",
        ),
        (
            {"search": {"space": {"lr": [0.1, 0.01]}}},
            "search.space.lr: got [0.1, 0.01]; expected [low, high] with 0 < low < high",
        ),
        (
            {"search": {"space": {"weight_decay": [0.1, 0.1]}}},
            "search.space.weight_decay: got [0.1, 0.1]; expected [low, high] with 0 < low < high",
        ),
        (
            {"search": {"space": {"lr": [0, 0.01]}}},
            "search.space.lr: got [0, 0.01]; expected [low, high] with 0 < low < high",
        ),
        (
            {"search": {"space": {"lr": [0.01, 0.1, 1.0]}}},
            "search.space.lr: got [0.01, 0.1, 1.0]; expected [low, high] with 0 < low < high",
        ),
        ({"search": {"space": "big"}}, "search.space: got 'big'; expected a mapping of keys"),
        ({"model": {"widths": 3}}, "model.widths: got 3; expected a list of an integer"),
        ({"model": {"widths": [32, "x"]}}, "model.widths[1]: got 'x'; expected an integer"),
        ({"model": {"widths": []}}, "model.widths: got []; expected non-empty"),
        ({"model": {"depth": 9}}, "model.depth: got 9; expected 6n+2"),
        ({"model": {"name": "transformer"}}, "model.name: got 'transformer'; expected one of"),
        ({"model": {"name": "torchvision:nope"}}, "model.name: got 'torchvision:nope'; 'nope'"),
        ({"data": {"name": "imagenet"}}, "data.name: got 'imagenet'; expected one of digits"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction: got 1.5; expected 0 < x < 1"),
        ({"data": {"val_fraction": 0}}, "data.val_fraction: got 0; expected 0 < x < 1"),
        ({"data": {"test_fraction": 1}}, "data.test_fraction: got 1; expected 0 < x < 1"),
        (
            {"data": {"val_fraction": 0.5, "test_fraction": 0.4}},
            "data.val_fraction + data.test_fraction: got 0.9; expected < 0.9 (training needs",
        ),
        (
            {"data": {"name": "imagefolder"}},
            "data.root: got None; expected a folder of class sub-folders of images",
        ),
        ({"device": "tpu"}, "device: got 'tpu'; expected one of auto | cpu | cuda"),
        ({"seed": True}, "seed: got True; expected an integer"),
        ({"seed": -1}, "seed: got -1; expected an integer 0..4294967295"),
        ({"seed": 2**32}, "seed: got 4294967296; expected an integer 0..4294967295"),
        ({"bogus": 1}, "bogus: unknown key; allowed keys: seed, device, data, model, train"),
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key; allowed keys: "),
        ({"train": {"zz": 1, "aa": 2}}, "train.aa: unknown key; allowed keys: epochs, lr, "),
        ({"train": [1, 2]}, "train: got [1, 2]; expected a mapping of keys"),
        ([1, 2], "params: got [1, 2]; expected a mapping of keys"),
    ],
)
def test_every_error_names_the_key_value_and_allowed(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize(
    "raw",
    [
        {"data": {"val_fraction": 0.45, "test_fraction": 0.44}},
        {"data": {"name": "imagefolder", "root": "photos"}},
        {"search": {"timeout_s": None, "epochs": 3, "min_epochs": 3}},
        {"search": {"space": {"lr": [1e-5, 2e-5]}}},
        {"train": {"lr": 10}},
        {"model": {"name": "torchvision:resnet18"}},
        {"model": {"name": "mlp", "hidden": [8]}},
    ],
)
def test_values_at_the_limits_are_accepted(raw):
    parsed = parse_params(raw).to_dict()
    for key, value in _leaves(raw).items():
        section, *rest = key.split(".")
        got = parsed[section]
        for part in rest:
            got = got[part]
        assert got == value, key


def test_values_are_typed_and_int_promotes_to_float():
    params = parse_params(
        {
            "train": {"lr": 1, "weight_decay": 0},
            "model": {"widths": [8, 16]},
            "search": {"timeout_s": 30, "space": {"lr": [1, 2]}},
        }
    )
    assert type(params.train.lr) is float and params.train.lr == 1.0
    assert type(params.train.weight_decay) is float
    assert type(params.search.timeout_s) is float and params.search.timeout_s == 30.0
    assert params.search.space.lr == (1.0, 2.0) and type(params.search.space.lr[0]) is float
    assert params.model.widths == (8, 16) and type(params.model.widths) is tuple
    assert parse_params({"search": {"timeout_s": None}}).search.timeout_s is None
    assert params.train.epochs == 30  # untouched keys keep their defaults


def test_a_missing_or_empty_section_means_its_defaults():
    assert parse_params({"train": None, "search": {"space": None}}) == Params()
    assert parse_params(None) == Params()
    assert parse_params({}) == Params()


def test_to_dict_is_plain_json_data_that_parses_back_to_the_same_params():
    params = parse_params({"model": {"widths": [8, 16]}, "search": {"timeout_s": 5}})
    plain = params.to_dict()
    assert plain["model"]["widths"] == [8, 16] and type(plain["model"]["widths"]) is list
    assert plain["search"]["space"]["batch_size"] == [32, 64, 128]
    assert plain["search"]["space"]["lr"] == [0.001, 1.0]
    assert plain["train"]["lr"] == 0.05 and plain["search"]["timeout_s"] == 5.0
    assert json.loads(json.dumps(plain)) == plain  # lists, not tuples: JSON keeps them
    assert parse_params(plain) == params


def test_hash_is_the_sha256_prefix_of_the_canonical_json():
    params = parse_params({"train": {"lr": 0.1}})
    plain = yaml.safe_load(yaml.safe_dump(params.to_dict()))  # another copy of the same values
    canonical = json.dumps(plain, sort_keys=True)
    assert params.hash() == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert len(params.hash()) == 16 and int(params.hash(), 16) >= 0
    assert params.hash() == parse_params(plain).hash()
    assert params.hash() != Params().hash()
    assert parse_params({"train": {"lr": 0.1000001}}).hash() != params.hash()


@dataclasses.dataclass(frozen=True)
class _Odd:
    values: set = dataclasses.field(default_factory=set)
    maybe: set | None = None


def test_an_unsupported_field_type_is_a_programming_error():
    with pytest.raises(TypeError, match="^unsupported config type <class 'set'> at odd.values$"):
        build(_Odd, {"values": [1]}, "odd")
    with pytest.raises(TypeError, match="^unsupported config type <class 'set'> at odd.maybe$"):
        build(_Odd, {"maybe": [1]}, "odd")
    assert build(_Odd, {}) == _Odd()


def test_search_validate_compares_min_epochs_with_epochs():
    SearchConfig(epochs=3, min_epochs=3).validate()
    with pytest.raises(ConfigError, match=r"search.min_epochs: got 4; expected <= search.epochs"):
        SearchConfig(epochs=3, min_epochs=4).validate()


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML (") and "\n" not in message
    assert "while parsing" in message


def test_a_params_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\n# \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: not UTF-8 text (invalid start byte at byte 10)"


def test_missing_and_empty_params_files(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'nope.yaml'}: params file not found$"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path)  # a folder is not a params file
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_params(empty) == Params()
    (tmp_path / "params.yaml").write_text("seed: 3\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert load_params().seed == 3  # the default path is ./params.yaml


def _bad_params(folder, stage: str) -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["train"]["lr"] = -1
    if stage == "prepare":
        raw["data"]["val_fraction"] = 2
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))


EXPECTED_ERROR = {"prepare": "error: data.val_fraction: got 2", "train": "error: train.lr: got -1"}


@pytest.mark.parametrize("stage", [prepare, train], ids=["prepare", "train"])
def test_stage_main_exits_2_with_one_line(tmp_path, monkeypatch, capsys, stage):
    name = stage.__name__.rsplit(".", 1)[1]
    _bad_params(tmp_path, name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        stage.main([])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(EXPECTED_ERROR[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # wrote nothing


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["prepare", "train"])
def test_stage_process_exits_2_with_one_line_and_no_traceback(tmp_path, stage):
    _bad_params(tmp_path, stage)
    proc = run_module(tmp_path, f"pipeline.{stage}", env={"PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(EXPECTED_ERROR[stage])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "https://mlflow.example.org/path",
        "postgresql://user@db.example.org/mlflow",
        "postgresql+psycopg2://user@db.example.org/mlflow",
        "mysql+pymysql://user@db/mlflow",
        "mssql://user@db/mlflow",
        "databricks",
        "databricks://profile",
    ],
)
def test_tracking_uris_mlflow_opens_are_accepted(uri):
    check_tracking_uri(uri, "tracking.uri")  # raises on refusal


def test_a_sqlite_tracking_uri_in_an_existing_folder_is_accepted(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db", "tracking.uri")
    check_tracking_uri("sqlite:///mlflow.db", "tracking.uri")  # the working directory


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "got ''; expected sqlite:///PATH, a folder, or a URI of scheme file, sqlite, "),
        ("   ", "got '   '; expected sqlite:///PATH"),
        ("ftp://host/x", "got 'ftp://host/x'; expected sqlite:///PATH, a folder, or a URI"),
        ("redis+http://h", "got 'redis+http://h'; expected sqlite:///PATH"),
        ("https://", "got 'https://'; expected a host after https://"),
        ("postgresql+psycopg2:///db", "expected a host after postgresql+psycopg2://"),
        ("mysql:///db", "got 'mysql:///db'; expected a host after mysql://"),
        ("mssql:///db", "expected a host after mssql://"),
        ("sqlite:mlflow.db", "got 'sqlite:mlflow.db'; expected sqlite:///PATH (three slashes)"),
        ("sqlite://mlflow.db", "expected sqlite:///PATH (three slashes)"),
        ("mlruns", "got 'mlruns'; MLflow 3 opens a folder store only with MLFLOW_ALLOW_FILE"),
        ("file:///tmp/mlruns", "MLflow 3 opens a folder store only with MLFLOW_ALLOW_FILE_STORE"),
    ],
)
def test_tracking_uris_mlflow_cannot_open_are_refused_naming_key_value_and_allowed(
    uri, message, monkeypatch
):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError) as err:
        check_tracking_uri(uri, "tracking.uri")
    assert str(err.value).startswith("tracking.uri: got ") and message in str(err.value)


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_a_folder_store_is_accepted_when_mlflow_is_told_to_allow_it(value, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", value)
    check_tracking_uri("mlruns", "tracking.uri")
    check_tracking_uri("file:///tmp/mlruns", "tracking.uri")
    check_tracking_uri("C:/mlruns", "tracking.uri")  # a Windows folder, not a scheme "c"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "no")
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE"):
        check_tracking_uri("mlruns", "tracking.uri")


def test_a_sqlite_uri_in_a_missing_folder_names_the_folder(tmp_path):
    uri = f"sqlite:///{tmp_path}/missing/m.db"
    with pytest.raises(ConfigError) as err:
        check_tracking_uri(uri, "export.x")
    assert str(err.value) == (
        f"export.x: got {uri!r}; folder {str(tmp_path / 'missing')!r} does not exist"
    )
