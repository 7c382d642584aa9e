"""The catalog of bad inputs (tests/bad_specs/): each file's first line names the message
it must produce. Every one is one line with exit code 2, and nothing reaches the store
or MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

CATALOG = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name} must open with '# error: <message>'"
    return first.removeprefix("# error: ")


def test_the_catalog_is_large_enough():
    assert len(CATALOG) >= 25


@pytest.mark.parametrize("path", CATALOG, ids=lambda p: p.stem)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default sqlite:///mlflow.db would land
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # nothing answers on the discard port
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["run", str(path), "--store", str(store)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert expected(path) in lines[0]
    assert not store.exists()
    assert not (tmp_path / "mlflow.db").exists()
