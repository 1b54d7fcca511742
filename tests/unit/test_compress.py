"""compress stage: real Torch-Pruning, real ONNX Runtime sessions, a real MLflow sqlite store."""

import copy
import json

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline import compress, onnx_tools, onnx_variants, paths, ratio_search
from pipeline.checkpoint import (
    arch_spec,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.config import parse_params
from pipeline.data import DeviceData, prepare, save_prepared
from pipeline.engine import correct_per_image, fit, predict_logits
from pipeline.errors import ConfigError
from pipeline.stats import paired_difference
from pipeline.variants import NAMES, VARIANTS
from tests.conftest import write_params


@pytest.fixture(scope="module")
def digits():
    return prepare(parse_params({}).data, seed=0)


@pytest.fixture(scope="module")
def data(digits):
    return DeviceData(digits, torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """(params, model, checkpoint path): the tiny cnn trained 4 epochs, as the tuned model."""
    from tests.conftest import TINY_PARAMS

    params = parse_params(copy.deepcopy(TINY_PARAMS))
    torch.manual_seed(0)
    arch = arch_spec(params, data.info)
    model = build_model(arch)
    fit(model, data, params.train, seed=0, progress=False)
    path = tmp_path_factory.mktemp("tuned") / "tuned.pt"
    save_checkpoint(path, model, arch, params, data.info, {"test_accuracy": 0.9})
    return params, model.eval(), path


def _difference(candidate_only: int, reference_only: int, n: int = 270):
    """A paired val comparison on `n` images where the two models differ on the given counts."""
    candidate = np.ones(n, bool)
    reference = np.ones(n, bool)
    candidate[:reference_only] = False
    reference[reference_only : reference_only + candidate_only] = False
    return paired_difference(candidate, reference)


def _attempt(ok_up_to: float):
    """Stands in for prune-and-score: within budget up to `ok_up_to`, accuracy falls with ratio."""

    def attempt(ratio):
        diff = _difference(0, round(100 * ratio))
        return ratio_search.PruneAttempt(ratio, 1 - ratio, diff, 100, 10, ratio <= ok_up_to, "ok")

    return attempt


def test_backoff_bisects_to_the_largest_ratio_within_budget():
    chosen, tried = ratio_search.search_ratio(0.8, 4, _attempt(0.3))
    assert [a.ratio for a in tried] == [0.8, 0.4, 0.2, 0.3, 0.35]
    assert chosen.ratio == 0.3 and chosen.within_budget
    chosen, tried = ratio_search.search_ratio(0.5, 4, _attempt(0.9))
    assert [a.ratio for a in tried] == [0.5] and chosen.ratio == 0.5
    chosen, tried = ratio_search.search_ratio(0.8, 2, _attempt(0.01))
    assert [a.ratio for a in tried] == [0.8, 0.4, 0.2]
    assert not chosen.within_budget and chosen.ratio == 0.2  # the most accurate tried
    chosen, tried = ratio_search.search_ratio(0.8, 0, _attempt(0.01))
    assert len(tried) == 1 and not chosen.within_budget


def test_with_no_ratio_within_budget_the_most_accurate_on_val_is_kept():
    val_accuracy = {0.8: 0.5, 0.4: 0.9, 0.2: 0.7}  # neither the last nor the smallest ratio

    def attempt(ratio):
        diff = _difference(0, 50)
        return ratio_search.PruneAttempt(ratio, val_accuracy[ratio], diff, 100, 10, False, "ok")

    chosen, tried = ratio_search.search_ratio(0.8, 2, attempt)
    assert [a.ratio for a in tried] == [0.8, 0.4, 0.2]
    assert chosen.ratio == 0.4 and not chosen.within_budget


def test_ratios_that_round_to_the_same_widths_are_fine_tuned_once():
    widths = {0.5: "8-16", 0.3: "8-16", 0.25: "8-24"}.get  # as pipeline.pruning.pruned_widths
    calls = []

    def attempt(ratio):
        calls.append(ratio)
        diff = _difference(0, 0)
        return ratio_search.PruneAttempt(ratio, 0.9, diff, 100, 10, False, "ok", 3.0)

    cached = ratio_search.reuse_equal_widths(attempt, widths)
    first, again, other = cached(0.5), cached(0.3), cached(0.25)
    assert calls == [0.5, 0.25]
    assert again.ratio == 0.3 and again.same_widths_as == 0.5 and again.finetune_seconds == 0
    assert first.same_widths_as is None and other.same_widths_as is None


def test_judge_allows_exactly_the_budget_on_the_point_estimate():
    # 270 val images: one image is 0.37 points; a 1-point budget allows 2 images lost, not 3
    assert ratio_search.judge(_difference(0, 2), 0.01)[0]
    accepted, reason = ratio_search.judge(_difference(0, 3), 0.01)
    assert not accepted
    assert "loses 1.11 points" in reason and "max_accuracy_drop allows 1.00" in reason
    assert "3 of 270 images disagree" in reason
    assert ratio_search.judge(_difference(4, 4), 0.0)[0]  # no loss: within a zero budget too
    assert not ratio_search.judge(_difference(4, 5), 0.0)[0]
    assert ratio_search.judge(_difference(5, 0), 0.0)[0]


def test_judge_reads_the_point_estimate_not_the_interval_bound():
    """Two equally good models that disagree on 8 of 270 images: the 95 % interval reaches
    beyond a 1-point budget, yet nothing is lost; the guard keeps the candidate."""
    tie = _difference(4, 4)
    assert tie.difference == 0 and tie.low < -0.01
    accepted, reason = ratio_search.judge(tie, 0.01)
    assert accepted and "within budget" in reason and "8 of 270 images disagree" in reason
    better_on_average = _difference(6, 5)  # +1 image, interval far below -1 point
    assert better_on_average.low < -0.01 and ratio_search.judge(better_on_average, 0.01)[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, "got 0; expected 0 < lr <= 10, or null"), ("low", "got 'low'; expected a number")],
)
def test_a_bad_finetune_lr_names_the_key_the_value_and_what_is_allowed(value, expected):
    with pytest.raises(ConfigError, match=rf"^compress.finetune_lr: {expected}"):
        parse_params({"compress": {"finetune_lr": value}})
    assert parse_params({"compress": {"finetune_lr": 0.01}}).compress.finetune_lr == 0.01
    assert parse_params({}).compress.finetune_lr is None


def test_resolve_params_takes_the_tuned_training_and_this_runs_compress():
    here = parse_params({"seed": 3, "device": "cpu", "compress": {"prune_ratio": 0.25}})
    tuned = parse_params({"seed": 0, "train": {"lr": 0.2, "epochs": 7, "batch_size": 32}})
    resolved = compress.resolve_params({"config": tuned.to_dict()}, here)
    assert (resolved.train.lr, resolved.train.epochs, resolved.train.batch_size) == (0.2, 7, 32)
    assert (resolved.seed, resolved.device) == (3, "cpu")
    assert resolved.compress.prune_ratio == 0.25 and resolved.tracking == here.tracking


def test_resolve_params_takes_the_processes_from_this_run_not_the_checkpoint():
    here = parse_params({"train": {"nproc": 2, "ddp_timeout_s": 60}})
    tuned = parse_params({"train": {"lr": 0.2, "batch_size": 32, "nproc": 1}})
    resolved = compress.resolve_params({"config": tuned.to_dict()}, here)
    assert (resolved.train.nproc, resolved.train.ddp_timeout_s) == (2, 60)
    assert (resolved.train.lr, resolved.train.batch_size) == (0.2, 32)


@pytest.mark.parametrize(
    "config",
    [{"train": {"lr": -1}}, {"train": {"optimiser": "sgd"}}, {"model": {"name": "vit"}}],
)
def test_resolve_params_falls_back_to_params_yaml_when_the_checkpoint_config_is_unusable(
    config,
):
    here = parse_params({"seed": 3, "train": {"lr": 0.07}})
    with pytest.warns(UserWarning, match="tuned checkpoint config unusable .*using params.yaml"):
        resolved = compress.resolve_params({"config": config}, here)
    assert resolved == here and resolved.train.lr == 0.07


@pytest.mark.parametrize("blob", [{}, {"config": None}, {"config": {}}])
def test_a_checkpoint_without_a_config_falls_back_to_params_yaml_too(blob):
    here = parse_params({"seed": 5, "train": {"lr": 0.07}})
    with pytest.warns(UserWarning, match=r"config unusable \(it has none\); using params.yaml"):
        assert compress.resolve_params(blob, here) == here  # not the dataclass defaults


@pytest.fixture(scope="module")
def fp32_model(trained, data, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "fp32.onnx"
    info = data.info
    onnx_tools.export_onnx(
        trained[1],
        path,
        (1, 8, 8),
        {"classes": list("0123456789")},
        mean=info["mean"],
        std=info["std"],
    )
    return path


def _top1(path, x):
    session, _ = onnx_tools.make_session(path, "cpu")
    return onnx_tools.run_logits(session, x).argmax(1)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_is_qdq_quint8_per_channel_and_agrees_with_fp32(method, fp32_model, data, tmp_path):
    x = onnx_tools.pixels_nhwc(data.images["test"])
    calibration = onnx_variants.calibration_images(data, 64, seed=0)
    assert calibration.shape == (64, 8, 8, 1) and calibration.dtype == np.uint8  # pixels
    int8_path = tmp_path / "int8.onnx"
    proto = onnx_tools.quantize_int8(fp32_model, int8_path, calibration, method, metadata={"v": 1})
    agreement = (_top1(int8_path, x) == _top1(fp32_model, x)).mean()
    assert agreement >= 0.99
    # graph overhead dominates this 8.6k-parameter model; the weights themselves are 4x smaller
    assert int8_path.stat().st_size < 0.7 * fp32_model.stat().st_size
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    inits = {i.name: i for i in proto.graph.initializer}
    quantize_zero_points = [
        inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"
    ]
    assert quantize_zero_points and all(
        z.data_type == onnx.TensorProto.UINT8 for z in quantize_zero_points
    )  # QUInt8 activations
    weight_scales = [
        onnx.numpy_helper.to_array(inits[n.input[1]])
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
        and inits.get(n.input[0]) is not None
        and inits[n.input[0]].data_type == onnx.TensorProto.INT8
    ]
    assert len(weight_scales) == 3  # both convs and the classifier hold int8 weights
    assert any(s.size > 1 for s in weight_scales)  # per-channel weight scales
    meta = onnx_tools.read_metadata(int8_path)
    assert json.loads(meta["classes"]) == list("0123456789") and meta["v"] == "1"
    # the uint8 input and the float preprocessing in front of the first QDQ are kept
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    preprocessing = [n for n in proto.graph.node if n.name.startswith("preprocess/")]
    ops = ["Expand", "Expand", "Transpose", "Cast", "Div", "Sub", "Div"]  # mean / std expanded
    assert [n.op_type for n in preprocessing] == ops
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert not any(set(n.input) & dequantized for n in preprocessing)


def _weight_bytes(proto) -> int:
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer)


@pytest.mark.integration
def test_fp16_keeps_uint8_input_float32_logits_and_agrees_with_fp32(fp32_model, data, tmp_path):
    x = onnx_tools.pixels_nhwc(data.images["test"])
    path = tmp_path / "fp16.onnx"
    proto = onnx_tools.convert_fp16(fp32_model, path, metadata={"variant": "fp16"})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert (_top1(path, x) == _top1(fp32_model, x)).mean() >= 0.99
    fp32_bytes = _weight_bytes(onnx.load(str(fp32_model)))
    assert _weight_bytes(proto) == pytest.approx(fp32_bytes / 2, rel=0.02)
    assert onnx_tools.read_metadata(path)["variant"] == "fp16"


def _params(trained, **compress_options):
    raw = copy.deepcopy(trained[0].to_dict())
    raw["compress"].update(compress_options)
    return parse_params(raw)


@pytest.mark.integration
def test_guard_rejects_every_over_budget_variant_and_says_why(trained, data, tmp_path):
    params = _params(
        trained,
        prune_ratio=0.95,
        prune_steps=1,
        finetune_epochs=0,
        round_to=1,
        max_accuracy_drop=0.0,
        backoff_steps=1,
        calibration_images=64,
    )
    outcome = compress.run(params, trained[2], tmp_path, data=data)
    m = outcome.metrics
    assert [a["ratio"] for a in m["attempts"]] == [0.95, 0.475]
    assert not any(a["within_budget"] for a in m["attempts"])
    variants = {v["name"]: v for v in m["variants"]}
    assert list(variants) == list(NAMES)
    assert variants["fp32"]["accepted"] is True
    for name in ("pruned_fp32", "int8", "fp16"):  # 95 % of channels, no fine-tune
        v = variants[name]
        assert v["accepted"] is False and v["val_accuracy"] < 0.5, v
        assert v["val_difference"]["difference"] < -0.4 and v["val_difference"]["n_images"] == 270
        assert "loses" in v["reason"] and "max_accuracy_drop allows 0.00" in v["reason"]
    assert (m["pruned_fp32_accepted"], m["int8_accepted"], m["fp32_accepted"]) == (
        False,
        False,
        True,
    )
    assert (
        "no pruning ratio tried was within budget (0.95 -> val "
        in (variants["pruned_fp32"]["reason"])
    )
    # none within budget: the stage keeps the more accurate ratio on val, and says so
    kept, other = sorted(m["attempts"], key=lambda a: a["ratio"] != m["prune_ratio"])
    assert kept["val_accuracy"] > other["val_accuracy"]
    assert m["macs_after"] < m["macs_before"]


@pytest.mark.integration
def test_an_over_budget_pruned_model_makes_the_stage_bisect_the_ratio(trained, data, tmp_path):
    """A real pruned model (no fine-tuning, round_to 1: accuracy falls steeply with the ratio)
    over budget on val: bisection goes down to a ratio within budget, up once, keeps it."""
    params = _params(
        trained,
        prune_ratio=0.9,
        prune_steps=1,
        finetune_epochs=0,
        round_to=1,
        max_accuracy_drop=0.4,
        backoff_steps=3,
        calibration_images=64,
    )
    outcome = compress.run(params, trained[2], tmp_path, data=data)
    m = outcome.metrics
    tried = [(a["ratio"], a["within_budget"]) for a in m["attempts"]]
    assert tried == [(0.9, False), (0.45, False), (0.225, True), (0.3375, False)]
    assert m["prune_ratio"] == 0.225 and m["pruned_fp32_accepted"] is True
    reference = correct_per_image(trained[1], data).mean()  # PyTorch fp32, like attempts
    for a in m["attempts"]:
        diff = a["val_difference"]
        assert diff["n_images"] == 270 and -1 <= diff["low"] <= diff["difference"] <= diff["high"]
        assert a["val_accuracy"] - diff["difference"] == pytest.approx(reference)
        assert a["within_budget"] == (diff["difference"] >= -0.4)
    assert "backed off to ratio 0.225" in m["variants"][1]["reason"]
    assert m["tuned_pytorch_val_accuracy"] == pytest.approx(reference, abs=1e-6)
    assert outcome.model.features[0][0].out_channels < 16  # the kept network is the pruned one


@pytest.fixture(scope="module")
def stage_run(trained, digits, tmp_path_factory):
    """`python -m pipeline.compress`'s main() in a project folder with a sqlite MLflow store."""
    project = tmp_path_factory.mktemp("project")
    raw = trained[0].to_dict()
    raw["compress"].update(prune_steps=2, finetune_epochs=2, calibration_images=64)
    write_params(project, raw)
    save_prepared(digits, project / "data" / "prepared")
    (project / "models").mkdir()
    (project / "models" / "tuned.pt").write_bytes(trained[2].read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: setenv restores it afterwards
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        patch.chdir(project)
        try:
            compress.main([])
        finally:
            mlflow.set_tracking_uri(None)  # a process-wide setting: later tests choose their own
    return project


@pytest.mark.integration
def test_stage_writes_checkpoint_onnx_metrics_and_plots(stage_run, trained, data):
    project = stage_run
    m = json.loads((project / "reports" / "compress.json").read_text())
    lean = json.loads((project / "metrics" / "compress.json").read_text())
    assert lean == {k: m[k] for k in compress.METRIC_KEYS}  # numbers worth comparing only
    for key in ("macs_before", "macs_after", "params_before", "params_after"):
        assert isinstance(m[key], int) and m[key] > 0
    assert m["macs_before"] / m["macs_after"] > 2  # ratio 0.5: about 4x fewer MACs
    assert (m["val_images"], m["test_images"]) == (270, 360)
    for short in NAMES:
        assert 0.8 < m[f"{short}_val_accuracy"] <= 1 and 0.8 < m[f"{short}_test_accuracy"] <= 1
        assert m[f"{short}_size_bytes"] > 0 and isinstance(m[f"{short}_accepted"], bool)
    for short in NAMES[1:]:  # the paired val difference to the tuned model
        low, high = m[f"{short}_val_difference_low"], m[f"{short}_val_difference_high"]
        assert low <= m[f"{short}_val_difference"] <= high and m[f"{short}_val_n_disagree"] >= 0
        assert m[f"{short}_accepted"] == (m[f"{short}_val_difference"] >= -0.01)  # the budget
    assert "fp32_val_difference" not in m
    assert m["int8_size_bytes"] < m["pruned_fp32_size_bytes"] < m["fp32_size_bytes"]
    assert m["int8_agreement"] >= 0.99 and m["fp16_agreement"] >= 0.99
    keys = {"name", "path", "val_accuracy", "val_difference", "test_accuracy", "size_bytes"}
    for v in m["variants"]:
        assert keys | {"params", "macs", "accepted", "reason"} <= set(v)
        assert (project / v["path"]).stat().st_size == v["size_bytes"]
        assert v["val_difference"]["n_images"] == 270
    assert m["variants"][2]["params"] == m["params_after"]

    rebuilt, blob = load_checkpoint(project / "models" / "compressed" / "pruned.pt")
    assert blob["arch"]["pruned"]["layers"]["features.0.0"] == {"out_channels": 8}
    assert blob["metrics"]["pruned_fp32_val_accuracy"] == m["pruned_fp32_val_accuracy"]
    session, _ = onnx_tools.make_session(project / paths.PRUNED_FP32_ONNX, "cpu")
    x = onnx_tools.pixels_nhwc(data.images["test"])  # the graph normalises them itself
    torch_logits = predict_logits(rebuilt, data.x["test"]).numpy()
    assert np.abs(onnx_tools.run_logits(session, x) - torch_logits).max() < 1e-4

    rows = (project / "plots" / "compression.csv").read_text().splitlines()
    assert rows[0] == "name,val_accuracy,test_accuracy,size_bytes,params,macs,accepted"
    assert len(rows) == 5
    assert (project / "plots" / "compression.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_stage_logs_one_mlflow_run_with_metrics_and_artifacts(stage_run, trained):
    client = MlflowClient(tracking_uri=f"sqlite:///{stage_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'compress'")
    m = json.loads((stage_run / "reports" / "compress.json").read_text())
    assert run.data.metrics["int8_val_accuracy"] == pytest.approx(m["int8_val_accuracy"])
    assert run.data.metrics["int8_test_accuracy"] == pytest.approx(m["int8_test_accuracy"])
    assert run.data.metrics["int8_val_n_disagree"] == m["int8_val_n_disagree"]
    assert run.data.metrics["macs_after"] == m["macs_after"]
    assert run.data.params["compress.prune_ratio"] == "0.5"
    # fine-tuning: the tuned settings at half the tuned lr, cosine without warm-up
    assert run.data.params["finetune.lr"] == str(trained[0].train.lr / 2)
    assert run.data.params["finetune.scheduler"] == "cosine"
    assert run.data.params["finetune.batch_size"] == str(trained[0].train.batch_size)
    assert run.data.tags["int8_accepted"] == str(m["int8_accepted"])
    curve = client.get_metric_history(run.info.run_id, "finetune_val_accuracy")
    # 1 epoch between the 2 steps, 2 after the last, for each attempt that was fine-tuned
    fine_tuned = [a for a in m["attempts"] if a["same_widths_as"] is None]
    assert sorted(p.step for p in curve) == list(range(1, 3 * len(fine_tuned) + 1))
    onnx_files = {a.path for a in client.list_artifacts(run.info.run_id, "onnx")}
    assert onnx_files == {f"onnx/{v.source.name}" for v in VARIANTS}
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert plots == ["plots/compression.png"]


@pytest.mark.integration
def test_unpruned_checkpoint_still_loads(trained, data):
    _, model, path = trained
    rebuilt, blob = load_checkpoint(path)
    assert "pruned" not in blob["arch"]
    assert isinstance(rebuilt.classifier, nn.Linear)
    assert torch.equal(
        predict_logits(model, data.x["val"]), predict_logits(rebuilt, data.x["val"])
    )


def test_missing_tuned_checkpoint_exits_2_naming_the_file(tmp_path, monkeypatch, capsys):
    write_params(tmp_path, {"tracking": {"enabled": False}})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        compress.main([])
    assert exit_info.value.code == 2
    assert "models/tuned.pt: not found; run the search stage" in capsys.readouterr().err


# ---- fast tests of the decisions: the guard, the ratio search, the attempts note


def test_judge_states_the_loss_and_the_budget_in_points():
    lost = _difference(0, 3)
    accepted, reason = ratio_search.judge(lost, 0.01)
    assert (accepted, reason) == (
        False,
        f"loses 1.11 points (val {lost.describe()} vs tuned); "
        "compress.max_accuracy_drop allows 1.00",
    )
    kept = _difference(0, 2)
    assert ratio_search.judge(kept, 0.015) == (
        True,
        f"within budget (val {kept.describe()} vs tuned; max drop 1.50 points)",
    )


def test_judge_rejects_only_beyond_the_budget_plus_its_float_tolerance():
    from types import SimpleNamespace

    edge = SimpleNamespace(difference=-0.01 - 1e-9, describe=lambda: "d")
    assert ratio_search.judge(edge, 0.01)[0] is True
    beyond = SimpleNamespace(difference=-0.01 - 2e-9, describe=lambda: "d")
    assert ratio_search.judge(beyond, 0.01)[0] is False


def test_resolve_params_warns_at_its_caller(recwarn):
    from pathlib import Path

    here = parse_params({})
    compress.resolve_params({}, here)
    (warning,) = recwarn.list
    # under mutmut (`make mutation`, pipeline/ copied into mutants/) every call goes through
    # mutmut's trampoline, one frame between this test and the function
    under_mutmut = Path(compress.__file__).parent.parent.name == "mutants"
    caller = "trampoline.py" if under_mutmut else Path(__file__).name
    assert Path(warning.filename).name == caller


def test_judge_allows_a_loss_of_exactly_the_budget_despite_rounding():
    exact = _difference(0, 1, n=100)  # one image of 100: -0.01, as floats make it
    assert ratio_search.judge(exact, 0.01)[0] is True
    assert ratio_search.judge(_difference(0, 2, n=100), 0.01)[0] is False
    assert ratio_search.judge(_difference(0, 1, n=100), 0.0099999)[0] is False


def _note_attempt(ratio, accuracy, within):
    return ratio_search.PruneAttempt(ratio, accuracy, _difference(0, 0), 100, 10, within, "ok")


def test_attempts_note_says_whether_the_ratio_backed_off_or_none_was_within_budget():
    first, second = _note_attempt(0.8, 0.5, False), _note_attempt(0.4, 0.91234, True)
    kept = _note_attempt(0.5, 0.9, True)
    assert ratio_search.attempts_note(kept, [kept]) == ""  # the requested ratio: nothing to say
    assert ratio_search.attempts_note(second, [first, second]) == (
        "; backed off to ratio 0.4 (0.8 -> val 0.5000, 0.4 -> val 0.9123)"
    )
    third = _note_attempt(0.2, 0.7, False)
    assert ratio_search.attempts_note(third, [first, third]) == (
        "; no pruning ratio tried was within budget (0.8 -> val 0.5000, 0.2 -> val 0.7000)"
    )
    only = _note_attempt(0.5, 0.6, False)
    assert ratio_search.attempts_note(only, [only]) == (
        "; no pruning ratio tried was within budget (0.5 -> val 0.6000)"
    )


def test_backoff_midpoints_are_rounded_to_6_digits_and_ties_keep_the_smaller_ratio():
    chosen, tried = ratio_search.search_ratio(0.3, 3, _attempt(0.0))
    assert [a.ratio for a in tried] == [0.3, 0.15, 0.075, 0.0375]
    chosen, tried = ratio_search.search_ratio(0.7, 2, _attempt(0.0))
    assert [a.ratio for a in tried] == [0.7, 0.35, 0.175]
    assert ratio_search.search_ratio(1 / 3, 1, _attempt(0.0))[1][1].ratio == 0.166667

    def flat(ratio):  # every ratio equally accurate, none within budget
        return ratio_search.PruneAttempt(ratio, 0.8, _difference(0, 0), 100, 10, False, "ok")

    chosen, tried = ratio_search.search_ratio(0.8, 2, flat)
    assert chosen.ratio == 0.2  # the least pruning among equals


def test_backoff_keeps_the_last_midpoint_within_budget_and_climbs_from_it():
    chosen, tried = ratio_search.search_ratio(0.8, 3, _attempt(0.65))
    assert [a.ratio for a in tried] == [0.8, 0.4, 0.6, 0.7]
    assert chosen.ratio == 0.6 and chosen is tried[2]


def test_reused_attempt_keeps_the_first_attempt_and_its_model():
    model = object()
    first = ratio_search.PruneAttempt(0.5, 0.9, _difference(0, 0), 100, 10, True, "ok", 3.0)
    first.model = model
    calls = []

    def attempt(ratio):
        calls.append(ratio)
        return first

    cached = ratio_search.reuse_equal_widths(attempt, {0.5: "8", 0.45: "8", 0.4: "8"}.get)
    assert cached(0.5) is first
    again = cached(0.45)
    third = cached(0.4)
    assert calls == [0.5]
    assert (again.ratio, again.same_widths_as, again.finetune_seconds) == (0.45, 0.5, 0.0)
    assert (third.ratio, third.same_widths_as) == (0.4, 0.5)  # the first one tried, not 0.45
    assert again.model is model and again.val_accuracy == 0.9 and again.within_budget
    assert first.ratio == 0.5 and first.finetune_seconds == 3.0  # the original is unchanged


def test_resolve_params_keeps_this_runs_seed_device_tracking_and_compress_only():
    here = parse_params(
        {
            "seed": 3,
            "device": "cpu",
            "tracking": {"enabled": False, "experiment": "here"},
            "compress": {"prune_ratio": 0.25},
            "export": {"latency_runs": 7},
            "model": {"widths": [8]},
        }
    )
    tuned = parse_params({"seed": 0, "device": "auto", "model": {"widths": [16, 32]}})
    resolved = compress.resolve_params({"config": tuned.to_dict()}, here)
    assert (resolved.seed, resolved.device, resolved.tracking) == (3, "cpu", here.tracking)
    assert resolved.compress == here.compress
    assert resolved.model == tuned.model and resolved.export == tuned.export
    assert resolved.data == tuned.data and resolved.search == tuned.search
