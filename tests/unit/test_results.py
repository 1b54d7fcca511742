"""The conventions of DVC and MLflow: lean metrics files, the project's own stores from a DVC
copy, the experiment's kind, and plots whose points and labels can be read back."""

from __future__ import annotations

import json

import optuna
import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Text
from mlflow.tracking import MlflowClient

from pipeline import compress, export, paths, plots, results, search, search_study, train
from pipeline.config import parse_params
from pipeline.tracking import EXPERIMENT_KIND, stage_run, tracking_uri


def test_metrics_file_holds_the_listed_numbers_and_the_report_holds_everything(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    record = {"status": "ok", "val_accuracy": 0.9, "epochs": 3, "seconds": 1.5, "gpu": None}
    lean = results.write_results("train", record, ("val_accuracy", "gpu", "epochs"))
    assert lean == {"val_accuracy": 0.9, "epochs": 3}  # None: not measured, left out
    assert list(lean) == ["val_accuracy", "epochs"]  # the order given: the columns' order
    renamed = results.comparable(record, {"accuracy": "val_accuracy"})
    assert renamed == {"accuracy": 0.9}
    with pytest.raises(KeyError):  # a key the record lacks (renamed?) never vanishes silently
        results.comparable(record, ("test_accuracy",))
    assert json.loads((tmp_path / "metrics" / "train.json").read_text()) == lean
    assert json.loads((tmp_path / "reports" / "train.json").read_text()) == record


@pytest.mark.parametrize("value", ["cpu", True, [1, 2], {"a": 1}])
def test_a_metric_that_is_not_a_number_is_refused(value):
    with pytest.raises(TypeError, match="'device'"):
        results.comparable({"device": value}, ("device",))


@pytest.mark.parametrize("module", [train, search, compress, export])
def test_each_stage_keeps_a_handful_of_metrics_named_once_across_stages(module):
    # `dvc exp show` prefixes a key found in two metrics files with the file's path (a wide
    # column): every stage's keys are its own, and few
    others = {
        k for m in (train, search, compress, export) if m is not module for k in m.METRIC_KEYS
    }
    assert 1 <= len(module.METRIC_KEYS) <= 3
    assert not set(module.METRIC_KEYS) & others
    # a Pareto search adds three (null, so left out, in a single-objective search)
    extra = getattr(module, "PARETO_METRIC_KEYS", ())
    assert len(extra) <= 3 and not set(extra) & (others | set(module.METRIC_KEYS))
    assert not any(word in k for k in module.METRIC_KEYS for word in ("seconds", "per_second"))


def test_stores_resolve_in_the_project_when_dvc_runs_a_copy(tmp_path, monkeypatch):
    project, copy = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert paths.store(paths.MLFLOW_DB) == copy / "mlflow.db"  # outside DVC: the working dir
    monkeypatch.setenv("DVC_ROOT", str(project))  # what DVC sets for a queued / --temp run
    assert paths.store(paths.MLFLOW_DB) == project / "mlflow.db"
    assert paths.storage_url("sqlite:///studies/optuna.db") == (
        f"sqlite:///{project / 'studies' / 'optuna.db'}"
    )
    for unchanged in ("sqlite:////abs/o.db", "sqlite:///:memory:", "postgresql://h/db"):
        assert paths.storage_url(unchanged) == unchanged
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(parse_params({})) == f"sqlite:///{project / 'mlflow.db'}"


@pytest.mark.integration  # a fresh MLflow store takes seconds to create
def test_a_stage_run_from_a_dvc_copy_lands_in_the_projects_store_as_model_training(
    tmp_path, monkeypatch
):
    project, copy = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({"tracking": {"experiment": "kinds"}})
    with stage_run("prepare", params, "sha") as run:
        run.log_artifact(_note(copy), "notes")
    assert not (copy / "mlflow.db").exists() and not (copy / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kinds")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith((project / "mlruns").as_uri())
    assert [a.path for a in client.list_artifacts(run.run_id, "notes")] == ["notes/note.txt"]
    # an experiment made before (no kind tag) gets the tag on its next run
    client.delete_experiment_tag(experiment.experiment_id, "mlflow.experimentKind")
    with stage_run("train", params, "sha"):
        pass
    assert client.get_experiment(experiment.experiment_id).tags.items() >= EXPERIMENT_KIND.items()


def _note(folder):
    (folder / "note.txt").write_text("hello")
    return folder / "note.txt"


def _manifest(entries):
    return {
        "variants": [
            {
                "name": name,
                "accepted": accepted,
                "recommended": recommended,
                "provider": "CPUExecutionProvider",
                "val_accuracy": accuracy,
                "latency": {"CPUExecutionProvider": {"latency_ms_p50_b1": latency}},
            }
            for name, accepted, recommended, accuracy, latency in entries
        ]
    }


def test_export_plot_labels_never_overlap_and_every_marker_stays_inside(tmp_path):
    # the usual case: pruned / int8 / fp16 tie on accuracy at nearly the same latency
    manifest = _manifest(
        [
            ("fp32", True, True, 0.97037, 0.0100),
            ("pruned_fp32", False, False, 0.948148, 0.01040),
            ("int8", False, False, 0.948148, 0.01038),
            ("fp16", False, False, 0.948148, 0.01042),
        ]
    )
    fig, ax, points = plots.export_latency_figure(manifest)
    assert [(p["name"], p["x"], p["y"]) for p in points] == [
        (e["name"], e["latency"]["CPUExecutionProvider"]["latency_ms_p50_b1"], e["val_accuracy"])
        for e in manifest["variants"]
    ]
    renderer = fig.canvas.get_renderer()
    for t in ax.texts:
        t.get_window_extent(renderer)  # places the annotation
    boxes = [Text.get_window_extent(t) for t in ax.texts]  # the text, not its line
    assert sorted(t.get_text() for t in ax.texts) == sorted(p["label"] for p in points)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "two labels overlap"
    # the recommended ring (the widest marker) lies wholly inside the axes: not clipped
    box = ax.get_window_extent(renderer)
    for collection in ax.collections:  # marker size s is in points squared; 3 pt clear of
        radius = collection.get_sizes()[0] ** 0.5 / 2 + collection.get_linewidths()[0] + 3
        radius *= fig.dpi / 72  # the frame (a ring touching the frame reads as clipped)
        for x, y in ax.transData.transform(collection.get_offsets()):
            assert box.x0 <= x - radius and x + radius <= box.x1
            assert box.y0 <= y - radius and y + radius <= box.y1, "a marker is clipped"
    plots.plt.close(fig)
    points = plots.export_latency_plot(manifest, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and len(points) == 4


def test_search_history_shows_pruned_trials_at_their_last_reported_value():
    study = optuna.create_study(direction="maximize", study_name="history")
    for reports, prune in [
        ([0.5, 0.7, 0.9], False),
        ([0.4, 0.45], True),
        ([0.2], True),
        ([0.6, 0.8, 0.95], False),
    ]:
        trial = study.ask()
        for step, value in enumerate(reports, start=1):
            trial.report(value, step)
        if prune:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, reports[-1])
    fig, ax, points = plots.search_history_figure(study)
    assert [(p["number"], p["state"], p["value"], p["epochs"]) for p in points] == [
        (0, "COMPLETE", 0.9, 3),
        (1, "PRUNED", 0.45, 2),
        (2, "PRUNED", 0.2, 1),
        (3, "COMPLETE", 0.95, 3),
    ]
    drawn = {}
    for collection in ax.collections:  # one scatter per state, each its own colour
        color = tuple(collection.get_facecolor()[0]) if len(collection.get_facecolor()) else None
        drawn[color] = sorted(map(tuple, collection.get_offsets().tolist()))
    assert drawn[to_rgba("tab:orange")] == [(1.0, 0.45), (2.0, 0.2)]
    assert drawn[to_rgba("tab:blue")] == [(0.0, 0.9), (3.0, 0.95)]
    (best,) = ax.lines
    assert list(best.get_ydata()) == [0.9, 0.95]
    plots.plt.close(fig)


def test_a_study_in_the_project_is_copied_into_the_dvc_copy_for_its_output(tmp_path, monkeypatch):
    import sqlite3

    project, copy = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmpabc"
    (project / "studies").mkdir(parents=True)
    copy.mkdir(parents=True)
    with sqlite3.connect(project / "studies" / "optuna.db") as db:
        db.execute("create table trials (number integer)")
        db.executemany("insert into trials values (?)", [(0,), (1,), (2,)])
    db.close()
    monkeypatch.chdir(copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert search_study.snapshot_study("sqlite:///studies/optuna.db") is None  # not in a copy
    monkeypatch.setenv("DVC_ROOT", str(project))
    local = search_study.snapshot_study("sqlite:///studies/optuna.db")
    assert local == paths.Path("studies/optuna.db")
    with sqlite3.connect(copy / "studies" / "optuna.db") as db:
        assert db.execute("select count(*) from trials").fetchone() == (3,)
    db.close()
    assert search_study.snapshot_study("postgresql://h/db") is None


def test_a_study_stored_elsewhere_is_snapshotted_into_the_dvc_output(tmp_path, monkeypatch):
    """PostgreSQL on several machines, or an SQLite file outside the project: DVC's
    `studies/optuna.db` output is a copy of the study as the run left it (not a missing file),
    replaced whole by the next run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'server' / 'optuna.db'}"
    (tmp_path / "server").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    study = optuna.create_study(study_name="s", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert search_study.snapshot_study(url) is None  # no study name: nothing to copy

    local = search_study.snapshot_study(url, "s")
    assert local == paths.Path("studies/optuna.db")
    copy = optuna.load_study(study_name="s", storage="sqlite:///studies/optuna.db")
    assert [t.params for t in copy.trials] == [t.params for t in study.trials]
    assert [t.value for t in copy.trials] == [t.value for t in study.trials]

    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # the next run
    search_study.snapshot_study(url, "s")
    copy = optuna.load_study(study_name="s", storage="sqlite:///studies/optuna.db")
    assert len(copy.trials) == 5  # replaced, not a second study appended
    assert optuna.get_all_study_names("sqlite:///studies/optuna.db") == ["s"]
    assert [p.name for p in (project / "studies").iterdir()] == ["optuna.db"]  # no temp left

    # the default: the study is the output file itself
    assert search_study.snapshot_study("sqlite:///studies/optuna.db", "s") is None
