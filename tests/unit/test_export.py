"""The export stage on stand-in compress outputs: files, metadata, manifest, parity, MLflow."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess

import mlflow
import numpy as np
import onnx
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from onnx import numpy_helper

from pipeline import champion, export, export_variant, onnx_tools, paths
from pipeline.config import ExportConfig, load_params
from pipeline.errors import DataError, StageFailed
from pipeline.export_checks import check_parity, gpu_status
from pipeline.files import sha256_file
from pipeline.variants import VARIANTS, VariantSpec
from tests.conftest import run_module, write_params
from tests.export_helpers import VARIANT_NAMES, exported_project

MANIFEST_KEYS = {
    "name", "path", "sha256", "size_bytes", "params", "macs", "val_accuracy", "val_difference",
    "test_accuracy", "latency_ms_p50_b1", "latency_ms_p95_b1", "throughput_b64", "provider",
    "parity", "accepted", "recommended",
}  # fmt: skip


@pytest.fixture
def in_project(project, monkeypatch):
    monkeypatch.chdir(project)
    return project


def _manifest(project) -> dict:
    return json.loads((project / paths.EXPORT_MANIFEST).read_text())


def _perturbed(proto: onnx.ModelProto, shape_len: int, change) -> onnx.ModelProto:
    """A copy of `proto` whose first float initializer of rank `shape_len` is changed."""
    proto = copy.deepcopy(proto)
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim == shape_len and array.dtype in (np.float32, np.float16):
            init.CopyFrom(numpy_helper.from_array(change(array).astype(array.dtype), init.name))
            return proto
    raise AssertionError("no initializer to perturb")


def test_stage_writes_four_checked_models_with_dynamic_batch_and_metadata(project):
    info = json.loads((project / paths.DATASET_JSON).read_text())
    manifest = _manifest(project)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True
    ).stdout.strip()
    params_hash = load_params(project / "params.yaml").hash()
    for name in VARIANT_NAMES:
        path = project / paths.exported_model(name)
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["variant"] == name and meta["format"] == "pipeline.onnx/2"
        assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
        assert json.loads(meta["mean"]) == info["mean"] and json.loads(meta["std"]) == info["std"]
        assert json.loads(meta["input_shape"]) == [1, 8, 8] and meta["input_layout"] == "NHWC"
        # uint8 pixels in, batch x H x W x C: the graph scales and normalises them itself
        pixels = proto.graph.input[0].type.tensor_type
        assert pixels.elem_type == onnx.TensorProto.UINT8 and meta["input_dtype"] == "uint8"
        assert [d.dim_value for d in pixels.shape.dim[1:]] == [8, 8, 1]
        entry = next(e for e in manifest["variants"] if e["name"] == name)
        assert float(meta["val_accuracy"]) == entry["val_accuracy"] > 0.8
        assert meta["test_accuracy"] == f"{entry['test_accuracy']:.6f}"  # fixed width
        assert (meta["val_images"], meta["test_images"]) == ("270", "360")
        assert meta["params_hash"] == params_hash
        assert meta["git_commit"] == head + "-dirty"  # the test rewrote params.yaml
        assert meta["dataset_sha256"] == info["sha256"]["all"]
        assert "source_run" not in meta  # no run id: identical runs write identical bytes
    for name, dtype in (("int8", onnx.TensorProto.INT8), ("fp16", onnx.TensorProto.FLOAT16)):
        graph = onnx.load(str(project / paths.exported_model(name))).graph
        assert dtype in {init.data_type for init in graph.initializer}


def test_manifest_lists_every_variant_with_hash_latency_and_one_recommendation(project):
    manifest = _manifest(project)
    assert [e["name"] for e in manifest["variants"]] == VARIANT_NAMES
    for e in manifest["variants"]:
        assert MANIFEST_KEYS <= set(e)
        path = project / e["path"]
        assert e["path"] == f"exported_models/model_{e['name']}.onnx"
        assert e["sha256"] == sha256_file(path) and e["size_bytes"] == path.stat().st_size
        assert 0 < e["latency_ms_p50_b1"] <= e["latency_ms_p95_b1"] and e["throughput_b64"] > 0
        assert e["provider"] == "CPUExecutionProvider" and e["accepted"] is True
        assert e["parity"]["passed"] is True and e["params"] > 0 and e["macs"] > 0
    by_name = {e["name"]: e for e in manifest["variants"]}
    assert by_name["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    assert by_name["int8"]["parity"]["top1_agreement"] >= 0.99
    assert by_name["int8"]["size_bytes"] < by_name["pruned_fp32"]["size_bytes"]
    assert by_name["pruned_fp32"]["params"] < by_name["fp32"]["params"]
    recommended = [e for e in manifest["variants"] if e["recommended"]]
    assert [e["name"] for e in recommended] == [manifest["recommended"]]
    # the rule, checked on the written numbers: accepted, no accepted variant faster beyond the
    # noise, and the smallest file among the accepted ones that none is faster than (the test
    # accuracy, written last at a fixed width, grew every file by the same bytes, so the sizes
    # compare as `recommend` saw them)
    (best,) = recommended
    accepted = [e for e in manifest["variants"] if e["accepted"]]
    assert best["accepted"] and not any(champion.faster(e, best) for e in accepted)
    unbeaten = [e for e in accepted if not any(champion.faster(x, e) for x in accepted)]
    assert best["size_bytes"] == min(e["size_bytes"] for e in unbeaten)
    for e in manifest["variants"]:  # interleaved rounds: p50 is the median of round medians
        rounds = e["latency"][e["provider"]]["latency_rounds_ms"]
        assert len(rounds) == manifest["benchmark"]["rounds"] == 5
        assert e["latency_ms_p50_b1"] == pytest.approx(float(np.median(rounds)), abs=1e-4)
        middle = sorted(rounds)[1:-1]  # the highest and the lowest round left out
        assert e["latency_spread_ms"] == pytest.approx(max(middle) - min(middle), abs=2e-4)
    assert manifest["benchmark"]["cpu_threads"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_metrics_plot_and_a_quiet_cpu_run(project):
    metrics = json.loads((project / paths.report_file("export")).read_text())
    assert metrics["gpu"] == "not available" and metrics["gpu_checks"] == []
    manifest = _manifest(project)
    assert metrics["recommended"] == manifest["recommended"]
    chosen = next(e for e in manifest["variants"] if e["name"] == manifest["recommended"])
    lean = json.loads((project / paths.EXPORT_METRICS).read_text())  # numbers only
    assert lean == {k: chosen[k] for k in ("test_accuracy", "latency_ms_p50_b1", "size_bytes")}
    assert metrics["recommended_val_accuracy"] == chosen["val_accuracy"]
    int8 = manifest["variants"][2]
    assert metrics["int8_val_accuracy"] == int8["val_accuracy"]
    assert metrics["int8_test_accuracy"] == int8["test_accuracy"]
    assert metrics["int8_val_difference"] == int8["val_difference"]["difference"]
    assert metrics["int8_val_n_disagree"] == int8["val_difference"]["n_disagree"]
    assert "fp32_val_difference" not in metrics  # fp32 is the reference
    assert metrics["fp16_throughput_b64"] == manifest["variants"][3]["throughput_b64"]
    assert (project / paths.EXPORT_PLOT).read_bytes()[:4] == b"\x89PNG"
    _, process = exported_project()
    assert "onnxruntime" not in process.stderr.lower(), process.stderr  # no ORT log lines
    assert "Traceback" not in process.stderr
    assert "| pruned_fp32 |" in process.stderr and "GPU: not available" in process.stderr


def test_mlflow_export_run_logs_models_and_registers_the_champion(project):
    manifest = _manifest(project)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    name = "tune-compress-classifier"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["name"] == manifest["recommended"]
    recommended = next(e for e in manifest["variants"] if e["recommended"])
    assert champion.tags["sha256"] == recommended["sha256"]
    run = client.get_run(champion.run_id)
    assert (
        run.data.tags["stage"] == "export" and run.data.tags["recommended"] == recommended["name"]
    )
    int8 = manifest["variants"][2]
    assert run.data.metrics["int8_val_accuracy"] == pytest.approx(int8["val_accuracy"])
    assert run.data.metrics["int8_test_accuracy"] == pytest.approx(int8["test_accuracy"])
    assert champion.tags["test_accuracy"] == str(recommended["test_accuracy"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "export")] == [
        "export/MODEL_CARD.md",
        "export/manifest.json",
    ]
    # MlflowClient only: mlflow.set_tracking_uri would leak MLFLOW_TRACKING_URI to later tests
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in logged) == sorted(f"model_{n}" for n in VARIANT_NAMES)
    location = client.get_model_version_download_uri(name, champion.version)
    model = mlflow.onnx.load_model(location)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["variant"] == recommended["name"]
    # the model card is the version's description; one export run, one version
    assert champion.description == (project / paths.MODEL_CARD).read_text()
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [
        champion.version
    ]
    assert run.data.tags["champion_why"] == "no champion yet"


def _card_table(card: str) -> dict[str, dict]:
    """The card's variants table: name -> {column: cell}."""
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]  # after ---
    return {r[0]: dict(zip(head, r, strict=True)) for r in cells}


def test_model_card_states_the_manifests_numbers(project):
    manifest = _manifest(project)
    card = (project / paths.MODEL_CARD).read_text()
    table = _card_table(card)
    assert list(table) == VARIANT_NAMES
    for e in manifest["variants"]:
        row, d = table[e["name"]], e["val_difference"]
        assert float(row["val acc"]) == pytest.approx(e["val_accuracy"], abs=5e-5)
        assert float(row["test acc"]) == pytest.approx(e["test_accuracy"], abs=5e-5)
        assert row[next(k for k in row if k.startswith("val vs fp32"))] == (
            f"{100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] "
            f"({d['n_disagree']} differ)"
        )
        assert int(row["size (bytes)"]) == e["size_bytes"] == (project / e["path"]).stat().st_size
        assert (int(row["params"]), int(row["MACs"])) == (e["params"], e["macs"])
        for column, key in (
            ("p50 b1 (ms)", "latency_ms_p50_b1"),
            ("spread (ms)", "latency_spread_ms"),
        ):
            assert float(row[column]) == pytest.approx(e[key], abs=5e-5)
        assert row["provider"] == e["provider"]
        assert row["accepted"] == "yes" and (row["recommended"] == "**yes**") == e["recommended"]
    data, bench, c = manifest["data"], manifest["benchmark"], manifest["compression"]
    assert sum(data["counts"].values()) == 1797 and data["counts"]["test"] == 360  # digits
    assert (
        f"train {data['counts']['train']} images, val 270 (every check and choice), test 360"
        in card
    )
    assert f"10 classes: {', '.join(data['classes'])}." in card
    assert f"Preprocessing: {data['preprocess']}; mean {data['mean']}, std {data['std']}" in card
    assert f"Machine: {bench['cpu']} ({bench['cpu_count']} logical CPUs)" in card
    assert f"pinned to {bench['cpu_threads']} intra-op thread(s)" in card
    assert f"{c['params_before']} parameters, {c['macs_before']} MACs per image" in card
    assert f"Recommended variant: **{manifest['recommended']}**" in card
    for section in ("## Intended use", "## Limitations", "## Compression path"):
        assert section in card


def test_check_parity_flags_fp32_drift_and_int8_disagreement():
    cfg = ExportConfig()  # parity_atol 1e-4, min_top1_agreement 0.99
    reference = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
    assert check_parity("fp32", reference + 5e-5, reference, cfg, "tuned.pt")["passed"]
    drift = reference.copy()
    drift[7, 3] += 1e-3
    result = check_parity("fp32", drift, reference, cfg, "tuned.pt")
    assert not result["passed"] and result["disagreeing_images"] == [7]
    assert result["reference"] == "PyTorch tuned.pt"
    flipped = reference.copy()
    flipped[0] = -flipped[0]  # one image of 50 changes its top-1: 98% < 99%
    result = check_parity("int8", flipped, reference, cfg, "pruned.pt")
    assert not result["passed"] and result["top1_agreement"] == 0.98
    assert result["disagreeing_images"] == [0]
    assert check_parity("int8", reference + 0.3, reference, cfg, "pruned.pt")["passed"]


def test_a_perturbed_weight_fails_the_stage_with_a_table_and_writes_nothing(in_project):
    params = load_params(paths.PARAMS)
    inputs = export.load_inputs()
    before = sha256_file(paths.exported_model("pruned_fp32"))
    source = paths.PRUNED_FP32_ONNX
    inputs.compressed[source] = _perturbed(inputs.compressed[source], 4, lambda w: w * 1.01)
    with pytest.raises(StageFailed) as err:
        export.run(params, inputs)
    message = str(err.value)
    assert message.startswith("parity check failed")
    row = next(line for line in message.splitlines() if line.startswith("pruned_fp32"))
    assert "ONNX Runtime CPU vs PyTorch" in row and "max |logit diff| <= 0.0001" in row
    assert not any(line.startswith(("fp32 ", "int8", "fp16")) for line in message.splitlines())
    assert sha256_file(paths.exported_model("pruned_fp32")) == before


def test_a_variant_that_disagrees_is_reported_and_rejected_not_shipped(in_project):
    params = load_params(paths.PARAMS)
    inputs = export.load_inputs()
    source = paths.PRUNED_FP16_ONNX
    rng = np.random.default_rng(0)
    inputs.compressed[source] = _perturbed(
        inputs.compressed[source], 1, lambda b: 50 * rng.normal(size=b.shape)
    )
    inputs.compress_variants[source.name] |= {"accepted": False, "reason": "loses 3 points"}
    result = export.run(params, inputs)  # no exception: the guard had already rejected it
    fp16 = next(v.entry for v in result.variants if v.spec.name == "fp16")
    assert fp16["parity"]["passed"] is False and fp16["parity"]["top1_agreement"] < 0.5
    assert fp16["accepted"] is False and fp16["reason"] == "loses 3 points"
    assert result.manifest["recommended"] != "fp16"
    meta = {p.key: p.value for p in result.recommended.proto.metadata_props}
    assert meta["accepted"] == "true"

    # accepted by compress, but below export.min_top1_agreement: rejected here, not fatal
    inputs.compress_variants[source.name]["accepted"] = True
    result = export.run(params, inputs)
    fp16 = next(v.entry for v in result.variants if v.spec.name == "fp16")
    assert fp16["accepted"] is False and result.manifest["recommended"] != "fp16"
    assert fp16["reason"].startswith("failed the parity check: top-1 agreement >= 0.99 with ")
    assert f"val images disagreeing: {fp16['parity']['disagreeing']})" in fp16["reason"]


def test_checks_read_the_val_split_and_the_test_split_is_only_reported(in_project):
    params = load_params(paths.PARAMS)
    inputs = export.load_inputs()
    before = export.run(params, inputs)
    rng = np.random.default_rng(0)  # the test split replaced: noise images, every label 0
    inputs.x["test"] = rng.normal(size=inputs.x["test"].shape).astype(np.float32)
    shape = inputs.pixels["test"].shape  # what the ONNX models read
    inputs.pixels["test"] = rng.integers(0, 256, shape, dtype=np.uint8)
    inputs.y["test"] = np.zeros_like(inputs.y["test"])
    after = export.run(params, inputs)
    for old, new in zip(before.variants, after.variants, strict=True):
        for key in ("val_accuracy", "val_difference", "parity", "accepted", "reason", "params"):
            assert new.entry[key] == old.entry[key], (new.spec.name, key)
        assert old.entry["test_accuracy"] > 0.8 and new.entry["test_accuracy"] < 0.5
    int8 = before.manifest["variants"][2]["val_difference"]
    assert int8["n_images"] == 270 and int8["low"] <= int8["difference"] <= int8["high"]
    assert before.manifest["variants"][0]["val_difference"]["n_disagree"] == 0  # the reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_require_gpu_without_a_gpu_fails_with_a_clear_message(in_project):
    params = load_params(paths.PARAMS)
    strict = dataclasses.replace(
        params, export=dataclasses.replace(params.export, require_gpu=True)
    )
    assert gpu_status(params) == ("not available", [])
    with pytest.raises(StageFailed, match="export.require_gpu is true but no GPU inference"):
        export.run(strict, export.load_inputs())


def test_opset_set_reexports_the_fp32_models_at_that_opset(in_project):
    params = load_params(paths.PARAMS)
    pinned = dataclasses.replace(params, export=dataclasses.replace(params.export, opset=18))
    inputs = export.load_inputs()
    fp32 = export_variant.build_proto(VARIANTS[0], inputs, 18)
    assert {o.version for o in fp32.opset_import if o.domain == ""} == {18}
    result = export.run(pinned, inputs)
    by_name = {v.spec.name: v for v in result.variants}
    assert all(v.entry["parity"]["passed"] for v in result.variants)
    assert {o.version for o in by_name["pruned_fp32"].proto.opset_import if o.domain == ""} == {18}
    assert 18 not in {o.version for o in by_name["int8"].proto.opset_import if o.domain == ""}


def test_missing_compress_outputs_name_the_file(project, tmp_path, monkeypatch):
    shutil.copytree(project / "data", tmp_path / "data")
    shutil.copytree(project / "models", tmp_path / "models")
    (tmp_path / paths.PRUNED_INT8_ONNX).unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="models/compressed/model_int8.onnx: not found"):
        export.load_inputs()
    shutil.copy(project / "params.yaml", tmp_path / "params.yaml")
    process = run_module(tmp_path, "pipeline.export")
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        "error: models/compressed/model_int8.onnx: not found; run the compress stage first"
    ]


def test_with_tracking_off_the_stage_exports_without_mlflow(project, tmp_path, monkeypatch):
    for folder in ("data", "models", "reports"):
        shutil.copytree(project / folder, tmp_path / folder)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    write_params(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    export.main([])
    manifest = json.loads(paths.EXPORT_MANIFEST.read_text())
    assert sum(e["recommended"] for e in manifest["variants"]) == 1
    for entry in manifest["variants"]:
        assert sha256_file(entry["path"]) == entry["sha256"]
        assert "source_run" not in onnx_tools.read_metadata(entry["path"])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


# ---- fast tests of the decisions: which parity failures stop the stage, accepted, recommended


def _variant(precision="int8", compress_accepted=True, passed=True, latency=None):
    spec = VariantSpec("v", paths.PRUNED_INT8_ONNX, paths.PRUNED_CKPT, precision, "a variant")
    keys = ("latency_ms_p50_b1", "latency_ms_p95_b1", "latency_spread_ms", "throughput_b8")
    numbers = dict(zip(keys, (1.5, 2.5, 0.25, 900.0), strict=True))
    latency = latency or {"CPUExecutionProvider": numbers}
    entry = {
        "name": "v",
        "val_accuracy": 0.9,
        "params": 1000,
        "macs": 20000,
        "compress_accepted": compress_accepted,
        "compress_reason": "within budget (val +0.00 points)",
        "parity": {
            "passed": passed,
            "max_abs_diff": 0.25,
            "top1_agreement": 0.995,
            "criterion": "top-1 agreement >= 0.99",
            "reference": "PyTorch pruned.pt",
            "disagreeing": 1,
        },
        "latency": latency,
    }
    return export_variant.ExportedVariant(
        spec, onnx.ModelProto(), entry, np.zeros((7, 10), np.float32)
    )


def test_must_agree_for_fp32_exports_only():
    assert export_variant.must_agree(_variant("fp32", compress_accepted=False)) is True
    assert export_variant.must_agree(_variant("fp32", compress_accepted=True)) is True
    assert export_variant.must_agree(_variant("int8", compress_accepted=True)) is False
    assert export_variant.must_agree(_variant("fp16", compress_accepted=False)) is False


def test_finish_variant_takes_the_cpu_numbers_without_a_gpu_and_writes_the_metadata():
    variant = _variant()
    export_variant.finish_variant(variant, [], 8)
    entry = variant.entry
    assert entry["provider"] == "CPUExecutionProvider"
    assert (entry["latency_ms_p50_b1"], entry["latency_ms_p95_b1"]) == (1.5, 2.5)
    assert entry["latency_spread_ms"] == 0.25  # what `recommend` reads as the noise
    assert entry["throughput_b8"] == 900.0
    assert entry["accepted"] is True
    assert entry["reason"] == "within budget (val +0.00 points)"
    meta = onnx_tools.read_metadata(variant.proto)
    assert json.loads(meta["accepted"]) is True
    assert {k: json.loads(meta[k]) for k in ("val_accuracy", "val_images", "params", "macs")} == {
        "val_accuracy": 0.9,
        "val_images": 7,
        "params": 1000,
        "macs": 20000,
    }
    assert json.loads(meta["parity"]) == {
        "passed": True,
        "max_abs_diff": 0.25,
        "top1_agreement": 0.995,
    }
    assert entry["size_bytes"] == variant.proto.ByteSize() > 0


def test_finish_variant_prefers_the_first_gpu_provider_that_ran_it():
    keys = ("latency_ms_p50_b1", "latency_ms_p95_b1", "latency_spread_ms", "throughput_b4")
    cpu = dict(zip(keys, (2.0, 3.0, 0.1, 100.0), strict=True))
    cuda = dict(zip(keys, (0.5, 0.7, 0.02, 5000.0), strict=True))
    trt = dict(zip(keys, (0.3, 0.4, 0.01, 9000.0), strict=True))
    latency = {"CPUExecutionProvider": cpu, "CUDAExecutionProvider": cuda}
    variant = _variant(latency=latency)
    export_variant.finish_variant(
        variant, ["TensorrtExecutionProvider", "CUDAExecutionProvider"], 4
    )
    assert variant.entry["provider"] == "CUDAExecutionProvider"  # TensorRT did not run it
    assert variant.entry["latency_ms_p50_b1"] == 0.5 and variant.entry["throughput_b4"] == 5000.0
    latency["TensorrtExecutionProvider"] = trt
    variant = _variant(latency=latency)
    export_variant.finish_variant(
        variant, ["TensorrtExecutionProvider", "CUDAExecutionProvider"], 4
    )
    assert variant.entry["provider"] == "TensorrtExecutionProvider"
    assert variant.entry["latency_ms_p95_b1"] == 0.4 and variant.entry["latency_spread_ms"] == 0.01


def test_finish_variant_rejects_an_accepted_variant_that_failed_parity():
    variant = _variant(compress_accepted=True, passed=False)
    export_variant.finish_variant(variant, [], 8)
    assert variant.entry["accepted"] is False
    assert variant.entry["reason"] == (
        "failed the parity check: top-1 agreement >= 0.99 with the PyTorch pruned.pt model, "
        "measured 0.9950 (val images disagreeing: 1)"
    )
    assert json.loads(onnx_tools.read_metadata(variant.proto)["accepted"]) is False
    rejected = _variant(compress_accepted=False, passed=False)  # keeps compress's reason
    rejected.entry["compress_reason"] = "loses 3.00 points"
    export_variant.finish_variant(rejected, [], 8)
    assert (rejected.entry["accepted"], rejected.entry["reason"]) == (False, "loses 3.00 points")
    passed = _variant(compress_accepted=False, passed=True)
    export_variant.finish_variant(passed, [], 8)
    assert passed.entry["accepted"] is False
    assert passed.entry["reason"] == "within budget (val +0.00 points)"


def test_check_parity_reports_the_criterion_and_the_disagreeing_images():
    cfg = ExportConfig(parity_atol=0.5, min_top1_agreement=0.75)
    reference = np.tile(np.array([[0.0, 1.0, 2.0]], np.float32), (12, 1))
    logits = reference.copy()
    logits[[2, 5, 9], 0] = 3.0  # top-1 flips to class 0 on three of twelve: agreement 0.75
    logits[4, 1] = 1.4  # within the tolerance
    result = check_parity("int8", logits, reference, cfg, "pruned.pt")
    assert result == {
        "passed": True,  # exactly the minimum agreement passes
        "reference": "PyTorch pruned.pt",
        "criterion": "top-1 agreement >= 0.75",
        "max_abs_diff": 3.0,
        "top1_agreement": 0.75,
        "disagreeing": 3,
        "disagreeing_images": [2, 5, 9],
    }
    result = check_parity("fp32", logits, reference, cfg, "tuned.pt")
    assert (result["passed"], result["criterion"]) == (False, "max |logit diff| <= 0.5")
    assert result["disagreeing"] == 3 and result["disagreeing_images"] == [2, 5, 9]
    exact = reference.copy()
    exact[:, 2] += 0.5  # every logit exactly at the tolerance: passes
    assert check_parity("fp32", exact, reference, cfg, "t")["passed"] is True
    assert check_parity("fp32", exact, reference, cfg, "t")["disagreeing"] == 0
    strict = ExportConfig(parity_atol=0.5, min_top1_agreement=0.76)
    assert check_parity("fp16", logits, reference, strict, "p")["passed"] is False


def test_check_parity_lists_the_first_ten_disagreeing_images_and_rounds_agreement():
    reference = np.tile(np.array([[0.0, 1.0]], np.float32), (30, 1))
    logits = reference.copy()
    logits[1::2, 0] = 2.0  # 15 of 30 flip
    logits[0, 0] = 0.1234567
    result = check_parity("int8", logits, reference, ExportConfig(), "p")
    assert result["disagreeing"] == 15 and result["disagreeing_images"] == list(range(1, 21, 2))
    assert result["top1_agreement"] == 0.5 and result["passed"] is False
    logits = reference.copy()
    logits[:1, 0] = 2.0  # 1 of 30 flips: 0.966666..., rounded to 6 digits
    assert check_parity("int8", logits, reference, ExportConfig(), "p")["top1_agreement"] == (
        0.966667
    )
    result = check_parity("fp32", reference + 1e-5, reference, ExportConfig(), "p")
    assert isinstance(result["max_abs_diff"], float) and result["max_abs_diff"] < 2e-5
    assert result["passed"] is True and type(result["passed"]) is bool


def _relu_session():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx_tools.session_for(model.SerializeToString(), threads=1)[0]


def test_interleaved_latency_times_each_round_for_at_least_min_round_s():
    """A model of microseconds is timed over many runs per round when `min_round_s` asks for
    it (the spread between round medians then repeats from run to run); `runs` alone when not."""
    import time

    sessions = {"a": _relu_session(), "b": _relu_session()}
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    plain = onnx_tools.interleaved_latency(sessions, x, rounds=3, runs=2, warmup_runs=1)
    assert {n: [len(r) for r in rounds] for n, rounds in plain.items()} == {
        "a": [2, 2, 2],
        "b": [2, 2, 2],
    }
    start = time.perf_counter()
    long = onnx_tools.interleaved_latency(
        sessions, x, rounds=3, runs=2, warmup_runs=1, min_round_s=0.02
    )
    # 2 warm-ups + 3 rounds x 2 sessions, each at least 20 ms
    assert time.perf_counter() - start >= 8 * 0.02
    for rounds in long.values():
        assert len(rounds) == 3
        assert all(len(r) > 20 for r in rounds)  # a Relu of 4 floats runs in microseconds
        assert all(min(r) > 0 for r in rounds)
