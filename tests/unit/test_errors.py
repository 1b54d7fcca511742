"""Exit codes: a user error exits 2, a stage whose result is not acceptable exits 1, each with
one line on stderr and no traceback; anything else is a bug: one line naming the log that holds
its traceback, exit 1."""

import importlib
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import parse_params
from pipeline.data import prepare, save_prepared
from pipeline.errors import ConfigError, DataError, StageFailed, UserError, cli_entry
from tests.conftest import REPO_ROOT, TINY_PARAMS, run_module

STAGES = ["prepare", "train", "search", "compress", "export", "predict"]


def _exit(func, capsys):
    """(exit code, stdout, stderr) of calling `func`."""
    with pytest.raises(SystemExit) as exit_:
        func()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("error", [UserError, ConfigError, DataError])
def test_a_user_error_exits_2_with_one_line(capsys, error):
    @cli_entry
    def main():
        print("started")
        raise error("train.lr: got -1; expected a number > 0")

    code, out, err = _exit(main, capsys)
    assert (code, out, err) == (2, "started\n", "error: train.lr: got -1; expected a number > 0\n")


def test_a_failed_stage_exits_1_with_one_line(capsys):
    @cli_entry
    def main():
        raise StageFailed("train: training loss became nan in epoch 1; lower train.lr")

    code, out, err = _exit(main, capsys)
    assert code == 1 and out == ""
    assert err == "failed: train: training loss became nan in epoch 1; lower train.lr\n"


def test_the_exit_hides_the_error_it_replaces(capsys):
    """`raise SystemExit from None`: the interpreter prints no chained traceback."""

    @cli_entry
    def main():
        raise StageFailed("guard failed")

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.__cause__ is None and exit_.value.__suppress_context__
    capsys.readouterr()


def test_a_bug_exits_1_with_one_line_naming_the_log_that_holds_its_traceback(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")  # a project: the log goes to logs/
    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)

    @cli_entry
    def broken():
        print("started")
        raise KeyError("a\nbug")

    code, out, err = _exit(broken, capsys)
    log = tmp_path / "logs" / f"pipeline-{__name__.rsplit('.', 1)[-1]}.log"
    assert (code, out) == (1, "started\n")
    assert err == f"internal error: KeyError: 'a\\nbug' (traceback in {log})\n"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and 'raise KeyError("a\\nbug")' in text


def test_a_bug_outside_a_project_logs_to_the_temp_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR

    @cli_entry
    def broken():
        raise ZeroDivisionError("division by zero")

    code, _, err = _exit(broken, capsys)
    (log,) = (tmp_path / "tmp").iterdir()
    assert code == 1 and err.endswith(f"(traceback in {log})\n") and err.count("\n") == 1
    assert "ZeroDivisionError" in log.read_text() and not (tmp_path / "logs").exists()


def test_ctrl_c_exits_130_with_one_word(capsys):
    @cli_entry
    def interrupted():
        raise KeyboardInterrupt

    assert _exit(interrupted, capsys) == (130, "", "interrupted\n")


def test_pipeline_traceback_1_keeps_the_traceback_of_a_bug(monkeypatch):
    monkeypatch.setenv("PIPELINE_TRACEBACK", "1")

    @cli_entry
    def broken():
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        broken()


def test_normal_returns_pass_through(capsys):
    @cli_entry
    def main(a, b=0):
        """Adds."""
        return a + b

    assert main(1, b=2) == 3
    assert main.__name__ == "main" and main.__doc__ == "Adds."
    assert capsys.readouterr() == ("", "")


def test_user_errors_are_not_stage_failures():
    assert not issubclass(StageFailed, UserError)
    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_main_is_wrapped_by_cli_entry(stage):
    main = importlib.import_module(f"pipeline.{stage}").main
    assert main.__wrapped__.__name__ == "main"  # functools.wraps of cli_entry


# lr * weight_decay > 2 with heavy momentum: SGD blows the weights up within the first epoch
DIVERGING_TRAIN = {"lr": 10.0, "momentum": 0.99, "weight_decay": 0.9, "scheduler": "none"}
MLFLOW_LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow")


@pytest.mark.integration
def test_a_diverging_train_stage_exits_1_and_writes_nothing(tmp_path):
    raw = dict(TINY_PARAMS, train=dict(TINY_PARAMS["train"], epochs=2, **DIVERGING_TRAIN))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    save_prepared(prepare(parse_params(raw).data, seed=0), tmp_path / "data" / "prepared")
    proc = run_module(tmp_path, "pipeline.train", env={"PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    ours = [line for line in proc.stderr.splitlines() if not MLFLOW_LOG_LINE.match(line)]
    assert ours == ["failed: train: training loss became nan in epoch 1 (lr=10); lower train.lr"]
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()
    # the stage's MLflow run is closed as FAILED, tagged with why
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["status"] == "diverged"
