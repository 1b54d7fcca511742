"""`dvc metrics diff` after a params change shows that change, not noise: on a copy of the built
project, committed, a new `compress.round_to` re-runs compress and export only, and the diff
holds numbers only (no strings, flags or wall-clock seconds), changed only in the metrics of the
stages that re-ran."""

import json
import subprocess

import pytest
import yaml

from pipeline import compress, export, search, train
from tests.conftest import write_params
from tests.e2e.conftest import copy_built_project, dvc, stages_run

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "metrics/train.json": list(train.METRIC_KEYS),
    "metrics/search.json": list(search.METRIC_KEYS),
    "metrics/compress.json": list(compress.METRIC_KEYS),
    "metrics/export.json": list(export.METRIC_KEYS),
}
# what may change when compress and export re-run: the pruned network's MACs, the recommended
# model's test accuracy, latency (measured again) and file size
MAY_CHANGE = {
    ("metrics/compress.json", "macs_after"),
    ("metrics/export.json", "test_accuracy"),
    ("metrics/export.json", "latency_ms_p50_b1"),
    ("metrics/export.json", "size_bytes"),
}
NOT_METRICS = ("seconds", "time", "device", "status", "message", "name")  # records' keys


def _commit(project):
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["add", "-A"], ["commit", "-qm", "built"]):
        subprocess.run([*git, *args], cwd=project, check=True, capture_output=True)


def _metrics_diff(project, *args) -> dict:
    return json.loads(dvc(project, "metrics", "diff", "--json", *args, stdout_only=True))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_metrics_diff_after_a_compress_param_change_shows_it_in_compress_and_export_only(
    e2e_project, tmp_path
):
    project = copy_built_project(e2e_project[0], tmp_path / "project")
    _commit(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    # pruned widths in multiples of 3, never the default's multiples of 8 (whatever ratio the
    # accuracy guard settles on): the pruned network, so its MACs, must change
    params["compress"]["round_to"] = 3
    write_params(project, params)
    output = dvc(project, "repro")
    assert stages_run(output) == ["compress", "export"], output

    every = _metrics_diff(project, "--all")
    assert sorted(every) == sorted(METRIC_KEYS)
    for path, metrics in every.items():
        assert sorted(metrics) == sorted(METRIC_KEYS[path])
        for name, change in metrics.items():
            assert _is_number(change["old"]) and _is_number(change["new"]), (path, name, change)
            assert not any(word in name for word in NOT_METRICS), (path, name)
    changed = {
        (path, name)
        for path, metrics in every.items()
        for name, change in metrics.items()
        if change["old"] != change["new"]
    }
    assert ("metrics/compress.json", "macs_after") in changed  # the change shows
    assert changed <= MAY_CHANGE, changed - MAY_CHANGE  # and nothing else moved
    shown = _metrics_diff(project)  # the changed metrics only
    assert {(path, name) for path, metrics in shown.items() for name in metrics} == changed
