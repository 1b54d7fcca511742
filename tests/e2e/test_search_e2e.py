"""The search stage inside the real `dvc repro` of the shared e2e project."""

import csv
import json

import optuna
import pytest
import torch

from pipeline.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def test_search_outputs_agree_with_the_study(e2e_project):
    project, output = e2e_project
    assert "Running stage 'search'" in output
    metrics = json.loads((project / "reports" / "search.json").read_text())
    assert metrics["n_complete"] + metrics["n_pruned"] == 6
    storage = f"sqlite:///{project / 'studies' / 'optuna.db'}"
    study = optuna.load_study(study_name=metrics["study_name"], storage=storage)
    assert metrics["best_trial_val_accuracy"] == pytest.approx(study.best_value, abs=1e-6)
    # the stage trained the winning trial itself: that model is shipped, with its score
    assert metrics["winner_retrained"] is False
    assert metrics["winner_val_accuracy"] == pytest.approx(study.best_value, abs=1e-6)
    assert metrics["tuned_source"] in ("search", "baseline")
    baseline_won = metrics["search_minus_baseline_val_high"] < 0
    assert metrics["tuned_source"] == ("baseline" if baseline_won else "search")
    best = json.loads((project / "studies" / "best_params.json").read_text())
    assert best["params"] == study.best_params and best["trial"] == study.best_trial.number
    rows = list(csv.DictReader((project / "studies" / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    assert [r["state"] for r in rows] == [t.state.name for t in study.trials]
    baseline = json.loads((project / "reports" / "train.json").read_text())
    assert metrics["baseline_test_accuracy"] == baseline["test_accuracy"]
    assert metrics["baseline_val_accuracy"] == baseline["val_accuracy"]
    blob = torch.load(project / "models" / "tuned.pt", weights_only=True)
    assert blob["metrics"]["tuned_source"] == metrics["tuned_source"]
    if metrics["tuned_source"] == "search":
        assert blob["config"]["train"]["lr"] == pytest.approx(best["params"]["lr"])
        assert blob["config"]["train"]["batch_size"] == best["params"]["batch_size"]
        assert blob["config"]["train"]["epochs"] == blob["config"]["search"]["epochs"]
    model, _ = load_checkpoint(project / "models" / "tuned.pt")
    assert sum(p.numel() for p in model.parameters()) == blob["metrics"]["params"]
    assert blob["metrics"]["test_accuracy"] == metrics["tuned_test_accuracy"]
    for name in ("search_history", "search_importance", "search_lr_wd"):
        assert (project / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
