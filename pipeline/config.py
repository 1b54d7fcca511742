"""Typed, validated parameters: `params.yaml` -> frozen dataclasses.

`load_params(path)` reads the YAML file and returns a `Params`. Every section is a frozen
dataclass; an unknown key, a wrong type or an out-of-range value raises `ConfigError` whose
message names the key path, the value and what is allowed (for example
``train.lr: got -1; expected a number > 0``). Stage entry points turn that error into one line
on stderr and exit code 2 (see `pipeline.errors.cli_entry`).

Hyperparameters are never CLI flags: change params.yaml or use `dvc exp run -S key=value`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError

DATASETS = ("digits", "cifar10", "mnist", "fashion_mnist", "imagefolder")
# (channels, pixels) of the fixed-size datasets; imagefolder images are data.image_size
PREPARED_SHAPES = {
    "digits": (1, 8),
    "mnist": (1, 28),
    "fashion_mnist": (1, 28),
    "cifar10": (3, 32),
}


def _check(predicate, allowed: str) -> dict:
    """Field metadata: a value predicate and the human description of what is allowed."""
    return {"check": predicate, "allowed": allowed}


def _positive(x) -> bool:
    return x > 0


def _fraction(x) -> bool:
    return 0 < x < 1


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "cifar10", "mnist", "fashion_mnist", "imagefolder"] = "digits"
    root: str | None = None  # imagefolder: a folder of class sub-folders of images
    image_size: int = field(default=32, metadata=_check(lambda x: 4 <= x <= 1024, "4..1024"))
    val_fraction: float = field(default=0.15, metadata=_check(_fraction, "0 < x < 1"))
    test_fraction: float = field(default=0.2, metadata=_check(_fraction, "0 < x < 1"))
    raw_dir: str = "data/raw"  # where torchvision datasets are downloaded / placed by hand
    download: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"  # cnn | resnet | lenet | mlp | torchvision:<name>
    widths: tuple[int, ...] = field(
        default=(32, 64, 128), metadata=_check(lambda t: len(t) > 0 and min(t) > 0, "non-empty")
    )
    depth: int = field(default=8, metadata=_check(lambda d: d >= 8 and (d - 2) % 6 == 0, "6n+2"))
    hidden: tuple[int, ...] = field(
        default=(256, 128), metadata=_check(lambda t: len(t) > 0 and min(t) > 0, "non-empty")
    )
    dropout: float = field(default=0.0, metadata=_check(lambda x: 0 <= x < 1, "0 <= x < 1"))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=30, metadata=_check(lambda x: 1 <= x <= 10_000, "1..10000"))
    lr: float = field(default=0.05, metadata=_check(lambda x: 0 < x <= 10, "0 < lr <= 10"))
    batch_size: int = field(default=64, metadata=_check(lambda x: 1 <= x <= 65536, "1..65536"))
    weight_decay: float = field(default=5e-4, metadata=_check(lambda x: 0 <= x < 1, "0..1"))
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = field(default=0.9, metadata=_check(lambda x: 0 <= x < 1, "0 <= x < 1"))
    scheduler: Literal["cosine", "onecycle", "none"] = "onecycle"
    label_smoothing: float = field(default=0.0, metadata=_check(lambda x: 0 <= x < 1, "0..1"))
    augment: Literal["auto", "none", "crop", "crop_flip"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    # bf16 autocast of the training step on CPUs with native bf16 (AVX512-BF16 / AMX)
    amp_cpu: bool = False
    channels_last: bool = True  # NHWC memory format for model and batches (CPU and CUDA)
    compile: bool = False  # torch.compile the model (CUDA)
    # train stage: >1 launches it under torchrun with this many processes (one per GPU);
    # batch_size stays the global batch (see pipeline.distributed)
    nproc: int = field(default=1, metadata=_check(lambda x: 1 <= x <= 1024, "1..1024"))
    # data-parallel collectives fail after this many seconds without an answer (a dead rank)
    ddp_timeout_s: float = field(default=300.0, metadata=_check(_positive, "> 0"))

    def validate(self) -> None:
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"train.batch_size: got {self.batch_size}; expected a multiple of train.nproc "
                f"({self.nproc}): it is the global batch, split evenly over the processes"
            )


# Tracking URI schemes MLflow's tracking store registry knows (mlflow 3); no scheme: a local path
TRACKING_SCHEMES = (
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
)


def check_tracking_uri(uri: str, key: str) -> None:
    """Raise ConfigError naming `key` for a tracking URI MLflow cannot open (checked before any
    work: MLflow itself fails with a traceback, or mid-stage)."""
    from urllib.parse import urlsplit

    allowed = f"sqlite:///PATH, a folder, or a URI of scheme {', '.join(TRACKING_SCHEMES)}"
    scheme = urlsplit(uri).scheme if "://" in uri or uri.startswith("sqlite:") else ""
    if uri == "databricks":  # MLflow's name for the default Databricks profile
        scheme = "databricks"
    if not uri.strip() or (scheme and scheme.split("+")[0] not in TRACKING_SCHEMES):
        raise ConfigError(f"{key}: got {uri!r}; expected {allowed}")
    file_store_allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1")
    if scheme in ("", "file") and not file_store_allowed:  # MLflow 3 refuses folder stores
        raise ConfigError(
            f"{key}: got {uri!r}; MLflow 3 opens a folder store only with "
            f"MLFLOW_ALLOW_FILE_STORE=true; expected sqlite:///PATH or a server URI"
        )
    if scheme.startswith(("http", "postgresql", "mysql", "mssql")) and not urlsplit(uri).netloc:
        raise ConfigError(f"{key}: got {uri!r}; expected a host after {scheme}://")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise ConfigError(f"{key}: got {uri!r}; expected sqlite:///PATH (three slashes)")
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(f"{key}: got {uri!r}; folder {str(folder)!r} does not exist")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # default sqlite:///mlflow.db in the project root
    experiment: str = field(
        default="tune-compress",
        metadata=_check(
            lambda s: 0 < len(s.strip()) and len(s) <= 500, "a name of 1..500 characters"
        ),
    )

    def validate(self) -> None:
        if self.uri is not None:
            check_tracking_uri(self.uri, "tracking.uri")


def _bounds(t) -> bool:
    return len(t) == 2 and 0 < t[0] < t[1]


@dataclass(frozen=True)
class SpaceConfig:
    lr: tuple[float, ...] = field(
        default=(1e-3, 1.0),
        metadata=_check(_bounds, "[low, high] with 0 < low < high (log-uniform)"),
    )
    batch_size: tuple[int, ...] = field(
        default=(32, 64, 128),
        metadata=_check(lambda t: len(t) > 0 and min(t) >= 1, "a non-empty list of integers >= 1"),
    )
    weight_decay: tuple[float, ...] = field(
        default=(1e-6, 1e-2),
        metadata=_check(_bounds, "[low, high] with 0 < low < high (log-uniform)"),
    )
    # architecture (null: not searched): a multiplier of model.widths (cnn, resnet) or
    # model.hidden (mlp), drawn in steps of WIDTH_STEP; resnet depths to choose from
    width: tuple[float, ...] | None = field(
        default=None,
        metadata=_check(
            lambda t: _bounds(t) and all(_on_width_grid(x) for x in t),
            "[low, high] with 0 < low < high, both multiples of 0.125 (or null)",
        ),
    )
    depth: tuple[int, ...] | None = field(
        default=None,
        metadata=_check(
            lambda t: len(t) > 0 and all(d >= 8 and (d - 2) % 6 == 0 for d in t),
            "a non-empty list of resnet depths 6n+2 >= 8 (or null)",
        ),
    )


WIDTH_MODELS = ("cnn", "resnet", "mlp")  # the models search.space.width scales
WIDTH_STEP = 0.125  # search.space.width is drawn on this grid: few architectures, each timed once
OBJECTIVES = ("latency", "size", "macs")  # the second objective's choices (minimised)


def _on_width_grid(x: float) -> bool:
    return abs(x / WIDTH_STEP - round(x / WIDTH_STEP)) < 1e-9


@dataclass(frozen=True)
class SelectConfig:
    """search.select as a budget: exactly one key."""

    latency_budget_ms: float | None = field(default=None, metadata=_check(_positive, "> 0"))
    size_budget_mb: float | None = field(default=None, metadata=_check(_positive, "> 0"))
    macs_budget_m: float | None = field(default=None, metadata=_check(_positive, "> 0"))
    min_accuracy: float | None = field(
        default=None, metadata=_check(lambda x: 0 < x <= 1, "0 < x <= 1")
    )

    def chosen(self) -> tuple[str, float]:
        """(key, value) of the one budget set."""
        return next((k, v) for k, v in dataclasses.asdict(self).items() if v is not None)

    def validate(self) -> None:
        given = [k for k, v in dataclasses.asdict(self).items() if v is not None]
        if len(given) != 1:
            raise ConfigError(
                f"search.select: got {given or 'no budget'}; expected max_accuracy or exactly "
                f"one of {', '.join(f.name for f in dataclasses.fields(self))}"
            )


# search.select budget key -> the objective it bounds
BUDGET_OBJECTIVE = {
    "latency_budget_ms": "latency",
    "size_budget_mb": "size",
    "macs_budget_m": "macs",
}


@dataclass(frozen=True)
class SearchConfig:
    n_trials: int = field(default=24, metadata=_check(lambda x: 1 <= x <= 100_000, "1..100000"))
    timeout_s: float | None = field(default=None, metadata=_check(_positive, "> 0 or null"))
    epochs: int = field(default=12, metadata=_check(lambda x: 1 <= x <= 10_000, "1..10000"))
    min_epochs: int = field(default=1, metadata=_check(lambda x: x >= 1, ">= 1"))
    sampler: Literal["tpe", "nsga2", "random", "cmaes", "qmc"] = "tpe"
    pruner: Literal["successive_halving", "hyperband", "median", "none"] = "successive_halving"
    # successive_halving / hyperband: 1 in reduction_factor trials goes on per rung
    # (2 and successive halving: benchmarks/search_efficiency.py)
    reduction_factor: int = field(default=2, metadata=_check(lambda x: 2 <= x <= 100, "2..100"))
    storage: str = "sqlite:///studies/optuna.db"
    study_name: str | None = None  # default: derived from dataset, model and search space
    workers: int = field(default=1, metadata=_check(lambda x: 1 <= x <= 256, "1..256"))
    space: SpaceConfig = SpaceConfig()
    # [accuracy] or [accuracy, latency | size | macs]: a Pareto search (accuracy up, cost down)
    objectives: tuple[str, ...] = field(
        default=("accuracy",),
        metadata=_check(
            lambda t: t[:1] == ("accuracy",) and len(t) <= 2 and set(t[1:]) <= set(OBJECTIVES),
            "[accuracy] or [accuracy, X] with X one of latency, size, macs",
        ),
    )
    latency_batch: int = field(default=1, metadata=_check(lambda x: 1 <= x <= 4096, "1..4096"))
    # which trial ships: max_accuracy, or a budget ({latency_budget_ms: X}, {min_accuracy: Y})
    select: Literal["max_accuracy"] | SelectConfig = "max_accuracy"

    @property
    def cost(self) -> str | None:
        """The second objective (None: accuracy alone)."""
        return self.objectives[1] if len(self.objectives) > 1 else None

    def validate(self) -> None:
        if isinstance(self.select, SelectConfig):
            key, _ = self.select.chosen()
            if key in BUDGET_OBJECTIVE and BUDGET_OBJECTIVE[key] != self.cost:
                raise ConfigError(
                    f"search.select.{key}: needs search.objectives [accuracy, "
                    f"{BUDGET_OBJECTIVE[key]}]; got {list(self.objectives)}"
                )
            if key == "min_accuracy" and self.cost is None:
                raise ConfigError(
                    f"search.select.min_accuracy: needs a second objective in "
                    f"search.objectives; got {list(self.objectives)}"
                )
        if self.cost is not None and self.sampler == "cmaes":
            raise ConfigError(
                "search.sampler: got 'cmaes'; with two objectives expected tpe, nsga2, random "
                "or qmc"
            )
        if self.cost is not None and self.pruner not in ("successive_halving", "none"):
            raise ConfigError(
                f"search.pruner: got {self.pruner!r}; with two objectives expected "
                f"successive_halving (multi-objective) or none"
            )
        if self.min_epochs > self.epochs:
            raise ConfigError(
                f"search.min_epochs: got {self.min_epochs}; expected <= search.epochs "
                f"({self.epochs})"
            )


@dataclass(frozen=True)
class CompressConfig:
    prune_ratio: float = field(default=0.5, metadata=_check(lambda x: 0 <= x < 1, "0 <= x < 1"))
    prune_steps: int = field(default=2, metadata=_check(lambda x: 1 <= x <= 100, "1..100"))
    finetune_epochs: int = field(default=8, metadata=_check(lambda x: x >= 0, ">= 0"))
    # peak of the fine-tuning cosine (no warm-up); null: the tuned model's train.lr / 2
    finetune_lr: float | None = field(
        default=None, metadata=_check(lambda x: 0 < x <= 10, "0 < lr <= 10, or null")
    )
    round_to: int = field(default=8, metadata=_check(lambda x: x >= 1, ">= 1"))
    calibration_images: int = field(default=256, metadata=_check(lambda x: x >= 1, ">= 1"))
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    max_accuracy_drop: float = field(default=0.01, metadata=_check(lambda x: 0 <= x <= 1, "0..1"))
    backoff_steps: int = field(default=4, metadata=_check(lambda x: 0 <= x <= 20, "0..20"))


def _model_registry_name(name: str) -> bool:
    """MLflow's rule for registered model names (mlflow.utils.validation._validate_model_name)."""
    return bool(name.strip()) and not set(name) & {"/", ":"} and name not in (".", "..")


# ONNX opsets the export honours: torch's dynamo exporter writes opset 18 at least (a lower
# request is silently exported at 18 when its version converter fails, which it does for
# BatchNorm), and ONNX Runtime 1.31 loads up to 26 (checked with torch 2.14, onnx 1.23).
OPSETS = (18, 26)


@dataclass(frozen=True)
class ExportConfig:
    opset: int | None = field(
        default=None,
        metadata=_check(
            lambda x: OPSETS[0] <= x <= OPSETS[1],
            f"{OPSETS[0]}..{OPSETS[1]} (the opsets the exporter and ONNX Runtime honour) or null",
        ),
    )
    parity_atol: float = field(default=1e-4, metadata=_check(_positive, "> 0"))
    min_top1_agreement: float = field(
        default=0.99, metadata=_check(lambda x: 0 < x <= 1, "0 < x <= 1")
    )
    require_gpu: bool = False
    warmup_runs: int = field(default=10, metadata=_check(lambda x: x >= 0, ">= 0"))
    latency_runs: int = field(default=100, metadata=_check(lambda x: x >= 1, ">= 1"))
    benchmark_batch: int = field(default=64, metadata=_check(lambda x: x >= 1, ">= 1"))
    registered_model: str = field(
        default="tune-compress-classifier",
        metadata=_check(_model_registry_name, "a non-empty name without '/' or ':'"),
    )


@dataclass(frozen=True)
class Params:
    seed: int = field(  # numpy / scikit-learn take 32-bit seeds
        default=0, metadata=_check(lambda x: 0 <= x < 2**32, "an integer 0..4294967295")
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    search: SearchConfig = SearchConfig()
    compress: CompressConfig = CompressConfig()
    export: ExportConfig = ExportConfig()

    def __post_init__(self):
        # the search's retrain (and compress's fine-tuning) split the chosen batch over the
        # train.nproc processes
        nproc = self.train.nproc
        odd = [b for b in self.search.space.batch_size if b % nproc]
        if nproc > 1 and odd:
            raise ConfigError(
                f"search.space.batch_size: got {list(self.search.space.batch_size)}; with "
                f"train.nproc {nproc} every choice must be a multiple of {nproc} ({odd} is not): "
                f"the chosen batch is the global batch of the data-parallel retrain"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """sha256 of the resolved params (canonical JSON), first 16 hex digits."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {' / '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, dict):  # a mapping can only be the dataclass: its own error
            for arg in typing.get_args(tp):
                if dataclasses.is_dataclass(arg):
                    return build(arg, value, key)
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise TypeError(f"unsupported config type {tp} at {key}")


def build(cls, raw: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping, validating every key (recursively)."""
    where = prefix or "params"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: got {raw!r}; expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"{key}: unknown key; allowed keys: {', '.join(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = _coerce(raw[f.name], hints[f.name], key)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"{key}: got {raw[f.name]!r}; expected {f.metadata['allowed']}")
        values[f.name] = value
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _validate_params(p: Params) -> None:
    if p.data.val_fraction + p.data.test_fraction >= 0.9:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction: got "
            f"{p.data.val_fraction + p.data.test_fraction:g}; expected < 0.9 (training needs data)"
        )
    if p.data.name == "imagefolder" and not p.data.root:
        raise ConfigError("data.root: got None; expected a folder of class sub-folders of images")
    from pipeline.models import check_model_fits, check_model_name

    check_model_name(p.model.name)
    channels, size = PREPARED_SHAPES.get(p.data.name, (3, p.data.image_size))
    check_model_fits(p.model.name, channels, size)
    space = p.search.space
    if space.width is not None and p.model.name not in WIDTH_MODELS:
        raise ConfigError(
            f"search.space.width: model.name {p.model.name!r} has no width option; expected "
            f"null, or a model.name of {', '.join(WIDTH_MODELS)}"
        )
    if space.depth is not None and p.model.name != "resnet":
        raise ConfigError(
            f"search.space.depth: model.name {p.model.name!r} has no depth option; expected "
            f"null, or model.name resnet"
        )


def parse_params(raw: Any) -> Params:
    params = build(Params, raw)
    _validate_params(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Raises ConfigError with the key path on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_params(raw)
