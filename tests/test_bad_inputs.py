"""The catalog of bad inputs (tests/bad_specs/): each file's first line names the message
it must produce. Every one is one line with exit code 2, and nothing reaches the store
or MLflow, from `run` and from `validate` alike (validate reads what run reads). Services
that accept a connection and never reply stop the command the same way."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

CATALOG = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))
pytestmark = pytest.mark.usefixtures("room_on_disk")


def expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n")[0].decode()  # the rest need not be UTF-8
    assert first.startswith("# error: "), f"{path.name} must open with '# error: <message>'"
    return first.removeprefix("# error: ")


def test_the_catalog_is_large_enough():
    assert len(CATALOG) >= 70


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("path", CATALOG, ids=lambda p: p.stem)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(command, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default sqlite:///mlflow.db would land
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # nothing answers on the discard port
    store = tmp_path / "store"
    result = CliRunner().invoke(app, [command, str(path), "--store", str(store)])
    assert_refused(result, expected(path), tmp_path, store)


def test_a_refused_tracking_uri_keeps_its_password_out_of_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path(__file__).parent / "bad_specs" / "tracking_server_unknown_host.yaml"
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "hunter2" in path.read_text() and "hunter2" not in result.output


GOOD = """\
name: good
base: {model: smollm2-135m}
data: {task: arithmetic, n_train: 16}
lora:
  - {name: a, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
quant: [f16]
"""


@pytest.fixture
def silent_listener():
    """A TCP listener on 127.0.0.1 that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_tracking_server_that_never_replies_stops_run_in_one_line(
    silent_listener, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent_listener}")
    spec, store = tmp_path / "good.yaml", tmp_path / "store"
    spec.write_text(GOOD)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(store)])
    print(f"refused after {time.perf_counter() - started:.2f} s")  # for the record, not judged
    assert_refused(
        result,
        f"MLFLOW_TRACKING_URI: MLflow tracking server: http://127.0.0.1:{silent_listener} "
        "did not answer within 3 s",
        tmp_path,
        store,
    )


def test_an_ollama_host_that_never_replies_stops_run_in_one_line(
    silent_listener, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{silent_listener}")
    spec, store = tmp_path / "good.yaml", tmp_path / "store"
    spec.write_text(GOOD + "serve: {backend: ollama}\n")
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(store)])
    print(f"refused after {time.perf_counter() - started:.2f} s")  # for the record, not judged
    assert_refused(
        result, f"no Ollama server answers at http://127.0.0.1:{silent_listener}", tmp_path, store
    )


def assert_refused(result, message: str, cwd: Path, store: Path) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not store.exists()
    assert not (cwd / "mlflow.db").exists()
    assert not (cwd / "mlruns").exists()


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_store_that_will_not_fit_on_the_disk_is_refused(command, tmp_path, monkeypatch):
    """The disk is the one need the catalog cannot reach (the suite's machine has what it
    has), so the filesystem reports half a GiB free here, where the quickstart-sized spec's
    outputs take more."""
    from harness.preflight import resources

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resources, "free_disk", lambda folder: 2**29)
    spec, store = tmp_path / "good.yaml", tmp_path / "store"
    spec.write_text(GOOD)
    result = CliRunner().invoke(app, [command, str(spec), "--store", str(store)])
    assert_refused(
        result,
        f"not enough disk for the store: about 1.6 GiB needed, 0.5 GiB free at {tmp_path}; "
        "free some disk or use --store elsewhere",
        tmp_path,
        store,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["best", "quickstart"],
        ["report", "quickstart"],
        ["check", "--candidate", "quickstart:main-f16", "--baseline", "quickstart:main-q8_0"],
    ],
    ids=lambda a: a[0],
)
def test_reading_results_from_a_database_that_does_not_exist_writes_none(
    args, tmp_path, monkeypatch
):
    """MLflow would create ./mlflow.db (and ./mlruns) on the way to an empty answer."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: no MLflow database at sqlite:///mlflow.db: run a spec first, or pass "
        "--tracking-uri (or MLFLOW_TRACKING_URI) where it logged"
    )
    assert list(tmp_path.iterdir()) == []
