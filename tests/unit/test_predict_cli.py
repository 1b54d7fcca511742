"""`pipeline predict`: table and JSON output, every bad input -> exit 2 (fast, on a linear ONNX
graph with known probabilities), and on real digit PNGs with every exported variant
(integration)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import cli, paths
from pipeline.config import parse_params
from pipeline.data import load_prepared, prepare
from tests.conftest import REPO_ROOT, VENV_BIN, subprocess_env
from tests.export_helpers import VARIANT_NAMES
from tests.tiny_onnx import linear_classifier


@pytest.fixture(scope="module")
def pngs(project, tmp_path_factory):
    """(paths of 60 test digits written as PNG files, their labels)."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = load_prepared(project / paths.PREPARED_DIR).splits["test"]
    files = []
    for i in range(60):
        files.append(folder / f"test_{i:03d}.png")
        Image.fromarray(images[i, 0].numpy()).save(files[-1])
    return files, labels[:60].numpy()


def predict(capsys, *args: str):
    """(exit code, stdout, stderr) of `pipeline predict ARGS` run in this process."""
    try:
        cli.main(["predict", *args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.integration
def test_json_output_classifies_real_digits_with_each_variant(project, pngs, capsys):
    files, labels = pngs
    for name in VARIANT_NAMES:
        model = str(project / paths.exported_model(name))
        code, out, err = predict(capsys, model, *map(str, files), "--top-k", "3", "--json")
        assert code == 0 and err == ""
        results = json.loads(out)
        assert [r["image"] for r in results] == [str(f) for f in files]
        assert all(len(r["top"]) == 3 for r in results)
        first = results[0]["top"]
        assert set(first[0]) == {"label", "probability"}
        assert first[0]["probability"] >= first[1]["probability"] >= first[2]["probability"]
        top1 = np.array([int(r["top"][0]["label"]) for r in results])
        assert (top1 == labels).mean() >= 0.9, name


@pytest.fixture
def model(tmp_path):
    """A 1 x 4 x 4 model that says bird 62.5 %, dog 25 %, cat 12.5 % whatever the image."""
    path = tmp_path / "model.onnx"
    return linear_classifier(path, bias=np.log([1.0, 2.0, 5.0]), classes=["cat", "dog", "bird"])


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    return path


def test_table_output_has_a_row_per_image(model, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "long_name.png").write_bytes(image.read_bytes())
    code, out, err = predict(capsys, "model.onnx", "a.png", "long_name.png", "--top-k", "2")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "image          top-1         top-2",
        "a.png          bird (62.5%)  dog (25.0%)",
        "long_name.png  bird (62.5%)  dog (25.0%)",
        "(model.onnx on CPUExecutionProvider)",
    ]
    code, out, _ = predict(capsys, "model.onnx", "a.png")  # default: top 3
    assert out.splitlines()[0].split() == ["image", "top-1", "top-2", "top-3"]


def test_json_output_has_every_image_with_its_top_labels(model, image, capsys):
    code, out, err = predict(capsys, str(model), str(image), str(image), "--json", "--top-k", "2")
    assert (code, err) == (0, "")
    top = [{"label": "bird", "probability": 0.625}, {"label": "dog", "probability": 0.25}]
    assert json.loads(out) == [{"image": str(image), "top": top}] * 2


def test_cuda_without_a_gpu_warns_on_one_line_and_runs_on_the_cpu(
    model, image, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = predict(capsys, str(model), str(image), "--device", "cuda")
    assert code == 0
    assert err.splitlines() == [
        f"warning: {model}: device cuda requested but no CUDA GPU works here; using the CPU"
    ]
    assert out.splitlines()[-1] == f"({model} on CPUExecutionProvider)"


def _bad_inputs(good_model, folder):
    good_model = str(good_model)
    good_image = folder / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good_image)
    fake_png = folder / "fake.png"
    fake_png.write_text("not an image")
    two_channels = folder / "two_channels.npy"
    np.save(two_channels, np.zeros((8, 8, 2), np.uint8))
    text_model = folder / "text.onnx"
    text_model.write_text("not a model")
    bare_model = linear_classifier(folder / "bare.onnx", drop=("classes",))
    old_model = linear_classifier(folder / "old.onnx", preprocess=False)  # float NCHW input
    missing = folder / "missing.png"
    return {
        "missing image": ([good_model, str(good_image), str(missing)], missing),
        "unreadable image": ([good_model, str(fake_png)], fake_png),
        "folder as image": ([good_model, str(folder)], folder),
        "wrong channel count": ([good_model, str(two_channels)], two_channels),
        "not an ONNX model": ([str(text_model), str(good_image)], text_model),
        "ONNX without metadata": ([str(bare_model), str(good_image)], bare_model),
        "older model format": ([str(old_model), str(good_image)], old_model),
        "missing model": ([str(folder / "none.onnx"), str(good_image)], folder / "none.onnx"),
    }


def test_every_bad_input_exits_2_with_one_line_naming_the_file(model, tmp_path, capsys):
    problems = {
        "missing image": "image file not found",
        "unreadable image": "not an image file Pillow can read",
        "folder as image": "a folder, not an image file",
        "wrong channel count": "array of shape (8, 8, 2); expected HxW or HxWxC",
        "not an ONNX model": "not an ONNX model",
        "ONNX without metadata": "ONNX model without the pipeline's metadata",
        "older model format": "metadata format 'pipeline.onnx/1'; this version reads",
        "missing model": "model file not found",
    }
    for case, (args, culprit) in _bad_inputs(model, tmp_path).items():
        code, out, err = predict(capsys, *args)
        assert code == 2, case
        assert out == "", case
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {culprit}: "), (case, err)
        assert problems[case] in lines[0], (case, err)


def test_argument_errors_exit_2(model, image, capsys):
    for top_k in ("0", "-2", "three"):
        code, _, err = predict(capsys, str(model), str(image), "--top-k", top_k)
        assert code == 2 and f"--top-k: got '{top_k}'; expected an integer >= 1" in err
    code, _, err = predict(capsys, str(model))
    assert code == 2 and "required: IMAGE" in err
    code, _, err = predict(capsys, str(model), str(image), "--device", "tpu")
    assert code == 2 and "--device: invalid choice: 'tpu'" in err


@pytest.mark.integration
def test_the_installed_command_is_quiet_and_fails_without_a_traceback(project, pngs, tmp_path):
    model = str(project / paths.exported_model("int8"))
    command = [str(VENV_BIN / "pipeline"), "predict", model, *map(str, pngs[0][:3]), "--json"]
    process = subprocess.run(command, capture_output=True, text=True, env=subprocess_env())
    assert process.returncode == 0 and process.stderr == ""  # no ONNX Runtime log lines
    assert len(json.loads(process.stdout)) == 3
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    command = [str(VENV_BIN / "pipeline"), "predict", model, str(bad)]
    process = subprocess.run(command, capture_output=True, text=True, env=subprocess_env())
    assert process.returncode == 2 and process.stdout == ""
    assert process.stderr.splitlines() == [f"error: {bad}: not an image file Pillow can read"]


SAMPLES = {"seven.png": (319, 7), "three.png": (290, 3)}  # test-split index, label


def test_the_sample_images_are_the_test_digits_samples_readme_names():
    """samples/*.png are digits of the default split's test set (no model of the default run
    saw them), each the prepared 8 x 8 image upscaled 4x with nearest-neighbour."""
    data = parse_params(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())).data
    images, labels = prepare(data, seed=0).splits["test"]
    folder = REPO_ROOT / "samples"
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(SAMPLES)
    for name, (index, label) in SAMPLES.items():
        with Image.open(folder / name) as img:
            assert img.mode == "L" and img.size == (32, 32)
            pixels = np.asarray(img)
        assert int(labels[index]) == label
        np.testing.assert_array_equal(pixels[::4, ::4], images[index, 0].numpy())
        np.testing.assert_array_equal(pixels, np.kron(pixels[::4, ::4], np.ones((4, 4), np.uint8)))
