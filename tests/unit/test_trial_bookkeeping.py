"""What a search trial writes per epoch: the pruner is asked only where it can stop a trial,
and a trial's per-epoch MLflow metrics are written in batches, complete at its end."""

import random

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import study
from pipeline.config import parse_params
from pipeline.tracking import ChildRun, stage_run


@pytest.mark.parametrize(
    ("pruner", "min_epochs", "factor", "expected"),
    [
        ("successive_halving", 1, 2, [1, 2, 4, 8]),
        ("hyperband", 1, 2, [1, 2, 4, 8]),
        ("successive_halving", 2, 3, [2, 6]),
        ("median", 1, 2, list(range(1, 13))),
        ("none", 1, 2, []),
    ],
)
def test_the_pruner_is_asked_at_its_decision_epochs_only(pruner, min_epochs, factor, expected):
    search = {"pruner": pruner, "epochs": 12, "min_epochs": min_epochs}
    params = parse_params({"search": {**search, "reduction_factor": factor}})
    decides = study.pruner_decides_at(params)
    assert [e for e in range(1, 13) if decides(e)] == expected


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
def test_optunas_rung_pruners_stop_trials_only_at_those_epochs(pruner):
    """The real pruners, asked after every epoch, never stop a trial elsewhere: skipping the
    other epochs changes no decision."""
    params = parse_params({"search": {"pruner": pruner, "epochs": 12, "min_epochs": 1}})
    rungs = {e for e in range(1, 13) if study.pruner_decides_at(params)(e)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opt = optuna.create_study(direction="maximize", pruner=study.make_pruner(params))
    rng, stopped = random.Random(0), []
    for _ in range(40):
        trial, level = opt.ask(), rng.random()
        for epoch in range(1, 13):
            trial.report(level + 0.01 * epoch * rng.random(), epoch)
            if trial.should_prune():
                stopped.append(epoch)
                opt.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            opt.tell(trial, level)
    assert len(stopped) >= 10 and set(stopped) <= rungs
    assert len(set(stopped)) >= 2  # it did stop trials at more than the first rung


@pytest.mark.integration  # a real MLflow store
def test_a_trials_metrics_are_written_in_batches_and_all_arrive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = parse_params(
        {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"}}
    )
    client = MlflowClient(params.tracking.uri)
    with stage_run("search", params, "sha") as parent:
        run = ChildRun(params, parent.run_id, "trial-000", {"state": "RUNNING"})
        for step in range(1, 601):  # 1,200 values: more than one MLflow batch (1,000)
            run.log_metrics({"train_loss": 1.0 / step, "val_accuracy": step / 700}, step)
        assert client.get_metric_history(run.run_id, "val_accuracy") == []  # queued
        run.finish("FINISHED", {"state": "COMPLETE"})
        history = client.get_metric_history(run.run_id, "val_accuracy")
        assert [h.step for h in history] == list(range(1, 601))
        assert history[-1].value == pytest.approx(600 / 700)
        assert client.get_run(run.run_id).info.status == "FINISHED"
        assert client.get_run(run.run_id).data.tags["state"] == "COMPLETE"  # with the metrics
        live = ChildRun(params, parent.run_id, "trial-001", {"state": "RUNNING"})
        live.FLUSH_S = 0.0  # a slow trial: each epoch's metrics are out before the next
        live.log_metrics({"val_accuracy": 0.5}, 1)
        assert [h.value for h in client.get_metric_history(live.run_id, "val_accuracy")] == [0.5]
        live.finish("KILLED", {"state": "PRUNED"})  # nothing queued: the tags alone
        assert client.get_run(live.run_id).data.tags["state"] == "PRUNED"
        assert client.get_run(live.run_id).info.status == "KILLED"


def test_the_trial_trainer_keeps_the_most_accurate_models_within_its_byte_budget():
    """What the search stage may ship without retraining: complete trials' weights, on the CPU,
    the most accurate first when they do not all fit in KEEP_BYTES."""
    from pipeline.engine import FitResult
    from pipeline.search_study import TrialTrainer

    def trained(val_accuracy):
        torch.manual_seed(0)
        model = torch.nn.Linear(100, 10)  # 1,010 float32 parameters: 4,040 bytes
        return model, FitResult("ok", "", history=[{"val_accuracy": val_accuracy}])

    trainer = TrialTrainer(parse_params({}), data=None)
    trainer.KEEP_BYTES = 2 * 4040  # room for two
    for key, accuracy in [("a", 0.5), ("b", 0.9), ("c", 0.7), ("d", 0.6)]:
        trainer._keep(key, {}, *trained(accuracy))
    assert sorted(trainer.kept) == ["b", "c"]
    model, _ = trained(0.0)
    arch, state, result, size = trainer.kept["b"]
    assert size == 4040 and result.val_accuracy == 0.9
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(v.device.type == "cpu" for v in state.values())
