"""`forgebench release` and `resume_from` naming a run, where nothing needs a model: how a
run is told from a folder, and the bad inputs refused in one line (exit 2) before anything
runs. The three nights on SmolLM2 through the Ollama double are in test_release_gate.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.spec.sections import names_a_run

HEAD = """\
name: nightly
base: {model: smollm2-135m}
data: {task: arithmetic, n_train: 16}
quant: [f16]
control: false
measure: [check]
tracking: {uri: "sqlite:///%s"}
lora:
"""
ONE = "  - {name: main, r: 4, alpha: 8, target_modules: [q_proj]}\n"


@pytest.mark.parametrize(
    "value",
    ["web4-agent@champion", "models:/web4-agent@champion", "nightly:main-q8_0", "0" * 32],
)
def test_a_run_is_named_by_alias_cell_or_id(value):
    assert names_a_run(value)


@pytest.mark.parametrize("value", ["adapters/night1", "/srv/adapters/night1", "night1", "a:b/c"])
def test_a_folder_is_a_path(value):
    assert not names_a_run(value)


def spec(tmp_path: Path, loras: str) -> Path:
    path = tmp_path / "nightly.yaml"
    path.write_text(HEAD % (tmp_path / "mlflow.db") + loras)
    return path


def refused(result, message: str, tmp_path: Path) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "store").exists()


def release(path: Path, tmp_path: Path):
    store = str(tmp_path / "store")
    return CliRunner().invoke(app, ["release", str(path), "--model", "web4", "--store", store])


def test_a_release_ships_one_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    two = ONE + "  - {name: other, r: 8, alpha: 16, target_modules: [q_proj]}\n"
    result = release(spec(tmp_path, two), tmp_path)
    refused(result, "lora: a release ships one adapter and this spec has 2 (main, other)", tmp_path)


def test_a_release_needs_an_ollama_to_deploy_to(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # the discard port: nothing answers
    result = release(spec(tmp_path, ONE), tmp_path)
    refused(result, "release deploys to Ollama and none answers at http://127.0.0.1:9", tmp_path)


def test_continuing_from_a_cell_that_was_never_logged_is_one_line(tmp_path):
    entry = "  - {name: main, resume_from: nightly:main-q8_0}\n"
    result = CliRunner().invoke(app, ["validate", str(spec(tmp_path, entry))])
    refused(result, "lora[0].resume_from: no MLflow database at sqlite:///", tmp_path)


def test_a_first_night_needs_the_adapter_shape_to_start_from(tmp_path):
    entry = "  - {name: main, resume_from: web4@champion, r: 4}\n"
    result = CliRunner().invoke(app, ["validate", str(spec(tmp_path, entry))])
    refused(
        result,
        "web4@champion is not registered yet, so this first build trains from the base and "
        "needs alpha, target_modules",
        tmp_path,
    )


def test_a_second_release_of_one_model_waits_for_the_first(tmp_path):
    """The lock a release holds while it runs, gates and promotes: a second one for the same
    model says it waits, and runs nothing before the first lets go (here: never)."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from filelock import FileLock
    from ollama_double import OllamaDouble

    cache = tmp_path / "cache"
    (cache / "release").mkdir(parents=True)
    path = spec(tmp_path, ONE)
    store = str(tmp_path / "store")
    said: list[str] = []
    with OllamaDouble() as double, FileLock(cache / "release" / "web4.lock"):
        env = os.environ | {"OLLAMA_HOST": double.host, "FORGEBENCH_CACHE": str(cache)}
        command = ["release", str(path), "--model", "web4", "--store", store]
        second = subprocess.Popen(
            [sys.executable, "-m", "harness", *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=lambda: said.extend(second.stderr), daemon=True).start()
        try:
            deadline = time.monotonic() + 120
            while not any("waiting" in line for line in said) and time.monotonic() < deadline:
                assert second.poll() is None, said
                time.sleep(0.1)
            time.sleep(2)
            assert second.poll() is None, said  # still waiting
        finally:
            second.kill()
            second.wait()
    assert "waiting for another `forgebench release --model web4` to finish\n" in said
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran while it waited
