"""Fixtures shared by the unit tests of the export stage, the inference API and the CLI."""

import pytest

from tests.export_helpers import exported_project


@pytest.fixture(scope="session")
def project():
    """A copy of the project after one real `python -m pipeline.export` (built once)."""
    path, process = exported_project()
    assert process.returncode == 0, process.stderr
    return path
