"""`pipeline search-worker`: joining the stage's study (real sqlite Optuna storage); the
multi-machine runs themselves are in tests/e2e/test_machines.py."""

import optuna
import pytest

from pipeline import cli, search_worker
from pipeline.config import parse_params
from pipeline.errors import UserError
from pipeline.study import load_study


def _params(tmp_path, tiny_params, tracking=True):
    raw = dict(tiny_params)
    raw["tracking"] = {"enabled": tracking, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    raw["search"] = {"storage": f"sqlite:///{tmp_path / 'optuna.db'}"}
    return parse_params(raw)


def test_wait_for_study_gives_up_naming_the_study_and_the_first_machine(
    tmp_path, tiny_params, capsys
):
    params = _params(tmp_path, tiny_params)
    with pytest.raises(UserError) as info:
        search_worker.wait_for_study(params, "s-1", wait_s=0.3, poll_s=0.1)
    message = str(info.value)
    assert message.startswith("search.storage: no study 's-1' in sqlite:///")
    assert "after 0.3 s" in message and "`dvc repro`) on the first machine" in message
    assert capsys.readouterr().err.count("search-worker: waiting up to 0.3 s for study") == 1


def test_wait_for_study_waits_for_the_search_run_when_tracking_is_on(tmp_path, tiny_params):
    params = _params(tmp_path, tiny_params)
    study = load_study(params, "s-2")  # created, but the stage has not started its run yet
    with pytest.raises(UserError, match="no search run recorded in study 's-2'"):
        search_worker.wait_for_study(params, "s-2", wait_s=0.1, poll_s=0.05)
    study.set_user_attr("mlflow_parent_run_id", "abc123")
    assert search_worker.wait_for_study(params, "s-2", wait_s=0) == "abc123"


def test_wait_for_study_needs_only_the_study_when_tracking_is_off(tmp_path, tiny_params):
    params = _params(tmp_path, tiny_params, tracking=False)
    load_study(params, "s-3")
    assert search_worker.wait_for_study(params, "s-3", wait_s=0) is None
    assert optuna.get_all_study_names(params.search.storage) == ["s-3"]  # none created


def test_shown_url_hides_the_password():
    url = "postgresql://optuna:s3cret@db.example:5432/studies"
    assert search_worker.shown_url(url) == "postgresql://optuna:***@db.example:5432/studies"
    assert search_worker.shown_url("sqlite:///studies/optuna.db") == "sqlite:///studies/optuna.db"


def test_pipeline_search_worker_help_prints_its_description(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml: running it would exit 2
    with pytest.raises(SystemExit) as info:
        cli.main(["search-worker", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pipeline search-worker [-h] [--wait-s WAIT_S]")
    assert search_worker.__doc__.splitlines()[0] in out
    assert list(tmp_path.iterdir()) == []


def test_pipeline_search_worker_without_params_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["search-worker", "--wait-s", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: params.yaml") and err.count("\n") == 1
