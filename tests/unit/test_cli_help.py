"""`--help` prints a stage's description and runs nothing; bad arguments exit 2; --version."""

import importlib

import pytest

from pipeline import cli
from tests.conftest import REPO_ROOT, run_module

STAGES = ["prepare", "train", "search", "compress", "export"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_prints_its_docstring_and_runs_nothing(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: running the stage would exit 2
    module = importlib.import_module(f"pipeline.{stage}")
    for argv in (["--help"], ["-h"]):
        with pytest.raises(SystemExit) as info:
            module.main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: pipeline {stage} [-h]")
        assert module.__doc__.splitlines()[0] in out
        assert "params.yaml" in out
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("stage", STAGES)
def test_stage_rejects_arguments_with_exit_2(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        importlib.import_module(f"pipeline.{stage}").main(["--lr", "0.1"])
    assert info.value.code == 2
    assert "unrecognized arguments: --lr 0.1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_pipeline_command_routes_help_to_the_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: pipeline compress [-h]")


def test_pipeline_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    version = capsys.readouterr().out.strip()
    assert version.startswith("pipeline ") and version.split()[1][0].isdigit()


def test_predict_keeps_its_own_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", "--help"])
    assert info.value.code == 0
    assert "--top-k" in capsys.readouterr().out


@pytest.mark.integration
def test_python_m_stage_help_in_an_empty_folder(tmp_path):
    proc = run_module(tmp_path, "pipeline.prepare", "--help", env={"PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pipeline prepare [-h]")
    assert list(tmp_path.iterdir()) == []
