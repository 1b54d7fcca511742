"""The README's "Use the exported models" section works verbatim on a built project.

Every ```bash and ```python block of that section is taken from README.md as it is and run in
the project that one real `dvc repro` built (the shared `e2e_project`, with the repository's
`samples/` copied in like every tracked file): the shell lines through bash, the Python blocks
with this virtual environment's interpreter. The printed top-1 labels must be the samples'
true digits (samples/README.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, subprocess_env

SECTION = "## Use the exported models"
TRUE_LABELS = {"samples/seven.png": "7", "samples/three.png": "3"}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced bash / python block in the section, in order."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end > 0 else len(text)]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.M | re.S)
    return [(lang, code) for lang, code in blocks if lang in ("bash", "python")]


@pytest.fixture(scope="module")
def project(e2e_project):
    """The built project, with the `.venv/bin/...` the README's commands name (a link)."""
    folder, _ = e2e_project
    venv = folder / ".venv"
    if not venv.exists():
        venv.symlink_to(REPO_ROOT / ".venv", target_is_directory=True)
    yield folder
    venv.unlink()


def run(project, command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=project, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )


def test_the_section_has_the_commands_and_snippets_this_test_runs():
    languages = [lang for lang, _ in readme_blocks()]
    assert languages == ["bash", "python", "python", "python"], languages


def test_readme_predict_commands_print_the_true_digits(project):
    (commands,) = [code for lang, code in readme_blocks() if lang == "bash"]
    lines = [line for line in commands.splitlines() if line.strip()]
    assert len(lines) == 3
    table, as_json, on_cuda = (run(project, ["bash", "-c", line]) for line in lines)
    for process in (table, as_json, on_cuda):
        assert process.returncode == 0, process.stdout + process.stderr
    rows = {line.split()[0]: line.split()[1] for line in table.stdout.splitlines()[1:3]}
    assert rows == TRUE_LABELS, table.stdout
    assert table.stderr == ""
    (seven,) = json.loads(as_json.stdout)
    assert seven["image"] == "samples/seven.png" and seven["top"][0]["label"] == "7"
    assert on_cuda.stdout.splitlines()[1].split()[:2] == ["samples/seven.png", "7"]


def test_readme_python_snippets_print_the_true_digits(project):
    classifier, plain, champion = (code for lang, code in readme_blocks() if lang == "python")
    outputs = []
    for code in (classifier, plain, champion):
        process = run(project, [sys.executable, "-c", code])
        assert process.returncode == 0, process.stderr
        outputs.append(process.stdout.splitlines())
    both, three, info = outputs[0]
    assert both.startswith("[[('7', ") and "], [('3', " in both, both
    assert three.startswith("[[('3', "), three
    assert info.startswith("['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'] (1, 8, 8) ")
    assert outputs[1] == ["7"]  # plain ONNX Runtime on raw pixels, no code of ours
    assert outputs[2] == ["input"]
