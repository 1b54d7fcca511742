"""Every exported variant in every runtime (pipeline.runtimes), on the models a real `dvc repro`
built: ONNX Runtime, onnx.reference, OpenCV 5.x and 4.x, at batch 1 and batch 64, each agreeing
with ONNX Runtime CPU on >= 99 % of the test images (no variant is listed as unsupported)."""

from __future__ import annotations

import pytest

from pipeline import paths, runtimes
from pipeline.data import load_prepared
from pipeline.variants import NAMES
from tests.conftest import run_module

pytestmark = pytest.mark.slow


def test_every_variant_agrees_with_onnxruntime_in_every_runtime(e2e_project):
    project, _ = e2e_project
    images, labels = load_prepared(project / paths.PREPARED_DIR).splits["test"]
    files = {name: project / paths.exported_model(name) for name in NAMES}
    matrix = runtimes.runtime_matrix(files, images.numpy(), labels.numpy())
    assert list(matrix) == list(NAMES) == ["fp32", "pruned_fp32", "int8", "fp16"]
    assert runtimes.matrix_failures(matrix) == [], runtimes.matrix_table(matrix)
    for row in matrix.values():
        assert list(row) == list(runtimes.RUNTIMES)
        for cell in row.values():
            assert set(cell) == {"agreement_b1", "accuracy_b1", "agreement_b64", "accuracy_b64"}
            assert cell["accuracy_b64"] > 0.5  # 10 classes: a model that learned


def test_runtimes_command_prints_the_matrix(e2e_project):
    project, _ = e2e_project
    done = run_module(project, "pipeline.runtimes")
    assert done.returncode == 0, done.stderr
    header = "| variant | " + " | ".join(runtimes.RUNTIMES) + " |"
    lines = done.stdout.splitlines()
    assert lines[0] == header
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {name}" for name in NAMES]
