"""Every failure is clean: bad params, an unreachable tracking server, a model that cannot take
the images, damaged checkpoints and prepared data, bad model metadata and bad images each stop
the command with exit code 2 and one line naming the key or file, the value and what is
allowed; a stage killed with kill -9 leaves no MLflow run RUNNING once the stage runs again.

The stages run in-process (their `main`, in a temporary project folder) with real MLflow,
ONNX Runtime and torch files; nothing is mocked.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import compress, predict, prepare, train
from pipeline.checkpoint import arch_spec, load_checkpoint, save_checkpoint
from pipeline.config import parse_params
from pipeline.data import load_image_folder, load_prepared, save_prepared
from pipeline.data import prepare as prepare_data
from pipeline.errors import DataError, UserError
from pipeline.inference import InvalidImage, OnnxClassifier
from pipeline.models import _dry_forward, create_model
from pipeline.tracking import (
    HOST_TAG,
    PID_TAG,
    _process_alive,
    check_tracking_server,
    end_dead_stage_runs,
    stage_run,
)
from tests.conftest import TINY_PARAMS
from tests.tiny_onnx import linear_classifier


def _project(tmp_path, monkeypatch, **sections) -> dict:
    """Write params.yaml (TINY_PARAMS with `sections` replaced) in tmp_path and cd there."""
    raw = {**TINY_PARAMS, **sections}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    return raw


def _fails(main, capsys, argv=()) -> tuple[int, str]:
    """(exit code, the one stderr line) of `main(argv)`; fails unless stderr is one line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return exit_.value.code, err.rstrip("\n")


# ---- params checked before any work: exit 2, one line naming the key, the value, the rule

BAD_PARAMS = [
    (
        {"tracking": {"uri": "foo://bar"}},
        "error: tracking.uri: got 'foo://bar'; expected sqlite:///PATH, a folder, or a URI of "
        "scheme file, sqlite, postgresql, mysql, mssql, http, https, databricks",
    ),
    (
        {"tracking": {"uri": "sqlite:/mlflow.db"}},
        "error: tracking.uri: got 'sqlite:/mlflow.db'; expected sqlite:///PATH (three slashes)",
    ),
    (
        {"tracking": {"uri": "sqlite:///no/such/folder/mlflow.db"}},
        "error: tracking.uri: got 'sqlite:///no/such/folder/mlflow.db'; folder "
        "'no/such/folder' does not exist",
    ),
    (
        {"tracking": {"uri": "mlruns"}},
        "error: tracking.uri: got 'mlruns'; MLflow 3 opens a folder store only with "
        "MLFLOW_ALLOW_FILE_STORE=true; expected sqlite:///PATH or a server URI",
    ),
    (
        {"tracking": {"uri": "http://"}},
        "error: tracking.uri: got 'http://'; expected a host after http://",
    ),
    (
        {"tracking": {"experiment": ""}},
        "error: tracking.experiment: got ''; expected a name of 1..500 characters",
    ),
    (
        {"tracking": {"experiment": "   "}},
        "error: tracking.experiment: got '   '; expected a name of 1..500 characters",
    ),
    (
        {"export": {"registered_model": ""}},
        "error: export.registered_model: got ''; expected a non-empty name without '/' or ':'",
    ),
    (
        {"export": {"registered_model": "team/model"}},
        "error: export.registered_model: got 'team/model'; expected a non-empty name without "
        "'/' or ':'",
    ),
    *[
        (
            {"export": {"opset": opset}},
            f"error: export.opset: got {opset}; expected 18..26 (the opsets the exporter and "
            f"ONNX Runtime honour) or null",
        )
        for opset in (7, 13, 17, 27)
    ],
    (
        {"model": {"name": "torchvision:vit_b_16"}, "data": {"name": "cifar10"}},
        "error: model.name: got 'torchvision:vit_b_16'; it cannot take 3x32x32 images (Wrong "
        "image height! Expected 224 but got 32!); choose another model or image size",
    ),
    (
        {"model": {"name": "torchvision:alexnet"}, "data": {"name": "digits"}},
        "error: model.name: got 'torchvision:alexnet'; it cannot take 1x8x8 images (Given "
        "input size: (64x1x1). Calculated output size: (64x0x0). Output size is too small); "
        "choose another model or image size",
    ),
]


@pytest.mark.parametrize(("sections", "message"), BAD_PARAMS)
def test_bad_params_exit_2_with_one_line_before_any_work(
    tmp_path, monkeypatch, capsys, sections, message
):
    _project(tmp_path, monkeypatch, **sections)
    assert _fails(train.main, capsys) == (2, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@pytest.mark.parametrize("opset", [18, 26, None])
def test_opsets_the_exporter_honours_are_accepted(opset):
    assert parse_params({"export": {"opset": opset}}).export.opset == opset


def test_torchvision_models_that_take_the_images_are_accepted_and_train():
    """googlenet / inception_v3 return aux logits when training unless built without them."""
    params = parse_params(
        {"model": {"name": "torchvision:googlenet"}, "data": {"name": "cifar10"}}
    )
    model = create_model(params.model.name, 10, 3, 32).train()
    logits = model(torch.zeros(2, 3, 32, 32))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_the_fit_check_leaves_the_random_state_alone(device):
    """Seeded weights do not depend on whether the params were checked in this process (the
    check runs on the CPU for models the meta device cannot run)."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _dry_forward("resnet18", 3, 17, device)
    assert torch.equal(torch.rand(3), expected)


def test_a_bad_mlflow_tracking_uri_variable_is_named(tmp_path, monkeypatch, capsys):
    _project(tmp_path, monkeypatch)
    save_prepared(
        prepare_data(parse_params(TINY_PARAMS).data, seed=0), tmp_path / "data" / "prepared"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://somewhere")
    code, line = _fails(train.main, capsys)
    assert code == 2 and line.startswith("error: MLFLOW_TRACKING_URI: got 'ftp://somewhere';")


# ---- an unreachable tracking server: one line within seconds, not minutes of retries


def test_an_unreachable_tracking_server_fails_in_seconds(tmp_path, monkeypatch, capsys):
    _project(tmp_path, monkeypatch)
    save_prepared(
        prepare_data(parse_params(TINY_PARAMS).data, seed=0), tmp_path / "data" / "prepared"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.monotonic()
    code, line = _fails(train.main, capsys)
    assert time.monotonic() - start < 15
    assert code == 2
    assert line.startswith(
        "error: MLFLOW_TRACKING_URI: got 'http://127.0.0.1:9'; no tracking server answers there"
    )
    assert not (tmp_path / "models").exists()


def test_prepare_probes_the_server_before_writing_the_data(tmp_path, monkeypatch, capsys):
    _project(tmp_path, monkeypatch, tracking={"uri": "http://127.0.0.1:9", "experiment": "e"})
    code, line = _fails(prepare.main, capsys)
    assert code == 2 and line.startswith("error: tracking.uri: got 'http://127.0.0.1:9'; no ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_server_that_accepts_but_never_answers_times_out():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # accepts the TCP connection, never sends an HTTP response
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(UserError, match=r"^tracking.uri: got 'http://127\.0\.0\.1:\d+'; no "):
            check_tracking_server(uri, "tracking.uri", timeout_s=0.5)
        assert time.monotonic() - start < 5


def test_a_server_answering_http_passes_the_probe():
    """Any HTTP answer (here a 404 from a bare HTTP server) means someone listens."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_port}", "tracking.uri", 2.0)
    finally:
        server.shutdown()
        server.server_close()


# ---- runs of killed stages are ended FAILED by the next run of the stage


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is free (a zombie would still count as alive)
    return proc.pid


def test_a_killed_process_not_yet_reaped_counts_as_dead():
    """A stage killed under a parent that has not reaped it yet (a zombie) still has a pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _process_alive(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not _process_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not _process_alive(proc.pid)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite tracking store for the tests of this module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_a_deleted_experiment_is_named_with_the_store(mlflow_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri=mlflow_uri)
    client.delete_experiment(client.create_experiment("gone"))
    params = parse_params({"tracking": {"uri": mlflow_uri, "experiment": "gone"}})
    with pytest.raises(UserError) as err:
        with stage_run("train", params):
            pass
    message = str(err.value)
    assert message.startswith(f"tracking.experiment: 'gone' cannot be opened at '{mlflow_uri}' (")
    assert "deleted experiment" in message and "\n" not in message


def test_runs_of_dead_processes_of_the_stage_on_this_host_are_ended_failed(mlflow_uri):
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.create_experiment("e")
    host, dead = socket.gethostname(), _dead_pid()

    def run(stage, pid, run_host=host):
        tags = {"stage": stage, HOST_TAG: run_host}
        if pid is not None:
            tags[PID_TAG] = str(pid)
        return client.create_run(experiment, tags=tags).info.run_id

    killed = run("compress", dead)
    kept = {
        "live": run("compress", os.getpid()),
        "other_host": run("compress", dead, "another-machine"),
        "no_pid_tag": run("compress", None),
        "other_stage": run("export", dead),
        "resumed": run("compress", dead),
    }
    ended = end_dead_stage_runs(client, experiment, "compress", keep=kept["resumed"])
    assert ended == [killed]
    run_info = client.get_run(killed)
    assert run_info.info.status == "FAILED"
    assert run_info.data.tags["failure"].startswith(f"process {dead} on {host} ended without")
    assert {k: client.get_run(r).info.status for k, r in kept.items()} == dict.fromkeys(
        kept, "RUNNING"
    )
    assert end_dead_stage_runs(client, experiment, "compress") == [kept["resumed"]]


# ---- damaged checkpoints: refused with one line, never unpickled


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _good_checkpoint(path):
    params = parse_params({"model": {"name": "cnn", "widths": [8]}})
    info = {"classes": ["a", "b"], "shape": [1, 8, 8], "mean": [0.5], "std": [0.2]}
    info["sha256"] = {"all": "x"}
    model = create_model("cnn", 2, 1, 8, widths=(8,))
    save_checkpoint(path, model, arch_spec(params, info), params, info, {})
    return path.read_bytes()


def _bad_checkpoints(tmp_path) -> dict:
    good = _good_checkpoint(tmp_path / "good.pt")
    blob = torch.load(tmp_path / "good.pt", weights_only=True)
    files = {
        "truncated.pt": good[: len(good) // 2],
        "empty.pt": b"",
        "garbage.pt": bytes(range(256)) * 8,
        "evil.pt": pickle.dumps({"format": "x", "payload": _Evil()}),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save(create_model("cnn", 2, 1, 8, widths=(8,)), tmp_path / "module.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    blob["state_dict"]["head.weight"] = torch.zeros(5, 5)
    torch.save(blob, tmp_path / "mismatch.pt")
    blob["arch"] = {"name": "cnn"}
    torch.save(blob, tmp_path / "no_arch.pt")
    return {
        "truncated.pt": "not a readable checkpoint (truncated or empty file)",
        "empty.pt": "not a readable checkpoint (truncated or empty file)",
        "garbage.pt": "not a readable checkpoint (corrupt file: ",
        "evil.pt": "not a readable checkpoint (corrupt file: ",
        "module.pt": "not a readable checkpoint (it holds pickled Python objects (GLOBAL "
        "pipeline.models.CNN), which are never loaded: only tensors and plain data are)",
        "tensor.pt": "not a pipeline checkpoint (format 'Tensor')",
        "mismatch.pt": "damaged checkpoint, its tensors do not match its architecture (",
        "no_arch.pt": "damaged checkpoint, its tensors do not match its architecture (KeyError",
    }


def test_damaged_checkpoints_raise_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, problem in _bad_checkpoints(tmp_path).items():
        with pytest.raises(DataError) as err:
            load_checkpoint(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: {problem}"), message
        assert "\n" not in message and len(message) < len(str(tmp_path)) + 250
    assert not (tmp_path / "pwned").exists()  # the pickle was never run


def test_a_stage_given_a_pickled_checkpoint_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    tracking = {"enabled": False, "experiment": "tests"}
    _project(tmp_path, monkeypatch, tracking=tracking)
    save_prepared(
        prepare_data(parse_params(TINY_PARAMS).data, seed=0), tmp_path / "data" / "prepared"
    )
    (tmp_path / "models").mkdir()
    torch.save(create_model("cnn", 10, 1, 8, widths=(8,)), tmp_path / "models" / "tuned.pt")
    code, line = _fails(compress.main, capsys)
    assert code == 2
    assert line.startswith("error: models/tuned.pt: not a readable checkpoint (it holds pickled ")


# ---- damaged prepared data and dataset folders


def test_damaged_prepared_data_is_refused_with_one_line(tmp_path):
    prepared = tmp_path / "prepared"
    save_prepared(prepare_data(parse_params(TINY_PARAMS).data, seed=0), prepared)
    val = prepared / "val.pt"
    val.write_bytes(val.read_bytes()[:100])
    with pytest.raises(DataError, match=r"val\.pt: not a readable prepared split \(truncated or "):
        load_prepared(prepared)
    torch.save({"images": torch.zeros(3, 1, 8, 8), "labels": torch.zeros(3)}, val)  # float
    with pytest.raises(DataError, match=r"val\.pt: not a prepared split \(uint8 N x C x H x W"):
        load_prepared(prepared)
    val.unlink()
    with pytest.raises(DataError, match=r"val\.pt: not found; run the prepare stage again"):
        load_prepared(prepared)
    save_prepared(prepare_data(parse_params(TINY_PARAMS).data, seed=0), prepared)
    info = prepared / "dataset.json"
    info.write_text('{"name": "digits"')
    with pytest.raises(DataError, match=r"dataset\.json: unreadable \(Expecting"):
        load_prepared(prepared)
    info.write_text('{"name": "digits"}')
    with pytest.raises(DataError, match=r"dataset\.json: not a dataset description \(no 'cla"):
        load_prepared(prepared)


def _image_folder(root, counts: dict) -> None:
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (6, 6), color=i * 20).save(root / label / f"{i}.png")


def test_a_class_folder_without_images_is_refused(tmp_path, monkeypatch, capsys):
    root = tmp_path / "images"
    _image_folder(root, {"cat": 6, "dog": 6, "empty": 0})
    (root / "empty" / "notes.txt").write_text("no images here")
    _project(tmp_path, monkeypatch, data={"name": "imagefolder", "root": str(root)})
    code, line = _fails(prepare.main, capsys)
    assert (code, line) == (
        2,
        f"error: data.root: class folder {str(root / 'empty')!r} has no images (.bmp, .gif, "
        f".jpeg, .jpg, .png, .tif, .tiff, .webp); add some or remove the folder",
    )


def test_a_truncated_image_in_a_dataset_folder_is_named(tmp_path, monkeypatch, capsys):
    root = tmp_path / "images"
    _image_folder(root, {"cat": 6, "dog": 6})
    bad = root / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:30])
    _project(tmp_path, monkeypatch, data={"name": "imagefolder", "root": str(root)})
    code, line = _fails(prepare.main, capsys)
    assert code == 2 and line.startswith(f"error: data.root: cannot read image {bad}: ")


# ---- model metadata of the wrong type, images that cannot be classified

BAD_METADATA = [
    ({"classes": '"abc"'}, 'metadata classes: got "abc"; expected a non-empty list of class'),
    ({"classes": []}, "metadata classes: got []; expected a non-empty list of class names"),
    ({"classes": [["a"], "b", "c"]}, 'metadata classes: got [["a"], "b", "c"]; expected'),
    ({"classes": {"a": 1}}, 'metadata classes: got {"a": 1}; expected'),
    ({"input_shape": 16}, "metadata input_shape: got 16; expected a list of integers >= 1"),
    ({"input_shape": [1, "4", 4]}, 'metadata input_shape: got [1, "4", 4]; expected'),
    ({"input_shape": [1.0, 4, 4]}, "metadata input_shape: got [1.0, 4, 4]; expected"),
    ({"input_shape": [True, 4, 4]}, "metadata input_shape: got [true, 4, 4]; expected"),
    ({"input_shape": [1, 0, 4]}, "metadata input_shape: got [1, 0, 4]; expected"),
    ({"mean": ["a"]}, 'metadata mean: got ["a"]; expected a list of numbers, one per channel'),
    ({"mean": 0.5}, "metadata mean: got 0.5; expected a list of numbers"),
    ({"std": [0]}, "metadata std: got [0]; expected a list of numbers > 0, one per channel"),
    ({"std": [None]}, "metadata std: got [null]; expected a list of numbers > 0"),
    ({"mean": "[NaN]"}, "metadata mean: got [NaN]; expected a list of numbers"),
]


@pytest.mark.parametrize(("metadata", "problem"), BAD_METADATA)
def test_metadata_of_the_wrong_type_exits_2_with_one_line(tmp_path, capsys, metadata, problem):
    path = linear_classifier(tmp_path / "m.onnx", metadata=metadata)
    image = tmp_path / "x.png"
    Image.new("L", (4, 4)).save(image)
    code, line = _fails(predict.main, capsys, [str(path), str(image)])
    assert code == 2 and line.startswith(f"error: {path}: {problem}"), line


def test_images_without_pixels_are_refused(tmp_path):
    clf = OnnxClassifier(linear_classifier(tmp_path / "m.onnx"))
    for image, problem in [
        (Image.new("L", (0, 0)), "image #0: image of 0x0 pixels; expected at least 1x1"),
        (Image.new("RGB", (5, 0)), "image #0: image of 5x0 pixels; expected at least 1x1"),
        (np.zeros((0, 4), np.uint8), "image #0: array of shape (0, 4) has no pixels"),
        (np.zeros((4, 0, 3), np.uint8), "image #0: array of shape (4, 0, 3) has no pixels"),
    ]:
        with pytest.raises(InvalidImage) as err:
            clf.predict(image)
        assert str(err.value) == problem


def test_16_bit_images_are_scaled_not_clipped_by_prepare_and_inference(tmp_path):
    """Pillow's own I;16 -> L conversion clips at 255: a 16-bit ramp would become nearly white."""
    ramp = (np.arange(16, dtype=np.uint32).reshape(4, 4) * 4369).astype(np.uint16)  # 0..65535
    expected = (np.arange(16).reshape(4, 4) * 17).astype(np.uint8)  # the same ramp, 0..255
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(ramp).save(root / label / f"{i}.png")  # a 16-bit grayscale PNG
    path = root / "a" / "0.png"
    assert Image.open(path).mode == "I;16"
    raw = load_image_folder(root, image_size=4)
    assert raw.images.shape == (6, 1, 4, 4)
    np.testing.assert_array_equal(raw.images[0, 0], expected)
    clf = OnnxClassifier(linear_classifier(tmp_path / "m.onnx", (1, 4, 4)))
    for image in (path, Image.open(path), Image.frombytes("I;16B", (4, 4), ramp.byteswap())):
        np.testing.assert_array_equal(clf.preprocess(image)[0, :, :, 0], expected)


PIL_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "I", "F"]


@pytest.mark.parametrize("channels", [1, 3])
def test_every_pillow_mode_is_classified_or_refused_with_one_line(tmp_path, channels):
    clf = OnnxClassifier(linear_classifier(tmp_path / "m.onnx", (channels, 4, 4)))
    for mode in [*PIL_MODES, "I;16", "I;16B", "La", "LAB"]:
        try:
            (top,) = clf.predict(Image.new(mode, (5, 7)), top_k=1)
        except InvalidImage as err:
            assert str(err).startswith(f"image #0: cannot convert mode {mode} (") and mode in (
                "La",
                "LAB",
            ), (mode, str(err))
        else:
            assert top[0][0] in clf.classes, mode
