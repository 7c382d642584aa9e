"""The embedded backend: llama.cpp's own `llama-server`, one process per deployed model.

It is the engine Ollama runs, with parallel slots, continuous batching and
per-response `timings`, built from the same llama.cpp revision as the
converter and quantizer (`forgebench setup`). Each deployment is a child
process on a free loopback port, health-checked before use and stopped on
`remove`/`close`; on Linux the child also gets SIGTERM if this process dies
(even by `kill -9`), so no server is ever orphaned. A request that cannot reach a
server whose process has exited raises `ServerStopped`, saying how it ended (exit
code or signal) with the last lines of its log, rather than a connection error.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from harness import toolchain
from harness.backends.base import Chunk, Deployment, ServeConfig, ServerStopped
from harness.backends.llamacpp_requests import applied, parse_stream, request_body, with_system
from harness.errors import ForgebenchError

HEALTH_TIMEOUT_S = 120.0
PORT_ATTEMPTS = 3
EXIT_GRACE_S = 0.5
"""How long a failed request waits for the server's exit to show: a killed process's
sockets close a moment before the kernel reports it gone."""
LOG_TAIL = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_status(returncode: int) -> str:
    """How a process ended, as a person reads it after its name: "exited with code 1",
    "was killed by signal 9 (SIGKILL)"."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by signal {-returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"was killed by signal {-returncode}"


def log_tail(log: Path, lines: int = LOG_TAIL) -> list[str]:
    """The last non-blank lines of a server's log; none when it cannot be read."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_command(gguf: Path, config: ServeConfig, port: int, template_file: Path) -> list[str]:
    """The llama-server argument list; context is per slot, as Ollama's num_ctx is."""
    num_ctx = int(config.parameters.get("num_ctx", 2048))
    threads = config.parameters.get("num_thread", os.cpu_count() or 1)
    return [
        str(toolchain.tool("llama-server")),
        "--model",
        str(gguf),
        "--alias",
        config.model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(config.slots),
        "--ctx-size",
        str(num_ctx * config.slots),
        "--threads",
        str(threads),
        "--jinja",
        "--chat-template-file",
        str(template_file),
        "--no-webui",
        *cache_arguments(config),
        *lora_arguments(config),
    ]


def cache_arguments(config: ServeConfig) -> list[str]:
    """The KV-cache type and flash attention, where the config names them."""
    out = []
    if config.cache_type is not None:
        out += ["--cache-type-k", config.cache_type, "--cache-type-v", config.cache_type]
    if config.flash_attn is not None:
        out += ["--flash-attn", config.flash_attn]
    return out


def loras(config: ServeConfig) -> list[Path]:
    """The LoRA GGUFs the server loads, in --lora order: a request's `lora` ids index it."""
    return [*([config.adapter] if config.adapter else []), *config.adapters]


def lora_arguments(config: ServeConfig) -> list[str]:
    """--lora for each LoRA GGUF; a shared server's are loaded at scale 0, so that only
    the adapter a request picks applies to it, and it keeps no prompt cache across
    requests, whose entries name no adapter (see harness/run/deployment.py)."""
    arguments = [part for path in loras(config) for part in ("--lora", str(path))]
    shared = ["--lora-init-without-apply", "--cache-ram", "0"]
    return arguments + (shared if config.adapters else [])


class LlamaServer:
    name = "llamacpp"

    def __init__(self) -> None:
        self._servers: dict[str, tuple[subprocess.Popen, ServeConfig, Path]] = {}
        self._http = httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0))

    def deploy(self, gguf: Path, config: ServeConfig) -> Deployment:
        if config.quantize is not None:
            raise ForgebenchError(
                f"{config.model_name}: llama-server serves {gguf.name} as it is and cannot "
                f"quantize it to {config.quantize}: that is Ollama's create (serve.backend: "
                "ollama)"
            )
        self.remove_name(config.model_name)
        folder = Path(tempfile.mkdtemp(prefix="forgebench-llama-server-"))
        template_file = folder / "chat_template.jinja"
        template_file.write_text(config.chat_template)
        for _ in range(PORT_ATTEMPTS):  # another process may take the port between probe and bind
            port = free_port()
            log = folder / f"server-{port}.log"
            started = time.perf_counter()
            with log.open("w") as fh:
                process = subprocess.Popen(
                    server_command(gguf, config, port, template_file),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent,
                )
            self._servers[config.model_name] = (process, config, folder)
            url = f"http://127.0.0.1:{port}"
            if self._wait_healthy(process, url, log):
                return Deployment(
                    self.name,
                    config.model_name,
                    url,
                    time.perf_counter() - started,
                    {"pid": process.pid, "port": port, "log": str(log)},
                    applied(config),
                )
            if "bind" not in log.read_text():
                tail = log_tail(log, 3)
                self.remove_name(config.model_name)
                raise ForgebenchError(f"llama-server failed to start: {' | '.join(tail)}")
        self.remove_name(config.model_name)
        raise ForgebenchError(f"llama-server could not bind a port after {PORT_ATTEMPTS} tries")

    def _wait_healthy(self, process: subprocess.Popen, url: str, log: Path) -> bool:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if self._http.get(f"{url}/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise ForgebenchError(f"llama-server not healthy after {HEALTH_TIMEOUT_S:.0f}s; see {log}")

    def chat(
        self,
        deployment: Deployment,
        messages: list[dict[str, str]],
        max_tokens: int = 256,
        adapter_scale: float | None = None,
        fixed_length: bool = False,
    ) -> Iterator[Chunk]:
        _, config, _ = self._servers[deployment.model_name]
        body = request_body(messages, config, max_tokens, deployment.request_fields, adapter_scale)
        if fixed_length:
            body["ignore_eos"] = True
        # one connection per request: llama-server closes kept-alive connections after a
        # few requests, which would surface as a spurious disconnect mid-benchmark
        try:
            with self._http.stream(
                "POST",
                f"{deployment.openai_base_url}/chat/completions",
                json=body,
                headers={"Connection": "close"},
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise ForgebenchError(
                        f"llama-server answered {response.status_code}: {response.text[:300]}"
                    )
                yield from parse_stream(response.iter_lines())
        except httpx.TransportError:
            if gone := self.stopped(deployment):
                raise gone from None
            raise

    def render_prompt(self, deployment: Deployment, messages: list[dict[str, str]]) -> str:
        """The prompt text llama-server builds for `chat` with these messages (POST
        /apply-template: the chat route without inference). A leading BOS text is left out
        when the vocabulary adds BOS at tokenization (llama.cpp strips it, so that the prompt
        does not start with two); the text is as the template rendered it otherwise."""
        _, config, _ = self._servers[deployment.model_name]
        try:
            response = self._http.post(
                f"{deployment.base_url}/apply-template",
                json={"messages": with_system(messages, config)},
                headers={"Connection": "close"},
            )
        except httpx.TransportError:
            if gone := self.stopped(deployment):
                raise gone from None
            raise
        if response.status_code != 200:
            raise ForgebenchError(
                f"llama-server answered {response.status_code} to /apply-template: "
                f"{response.text[:300]}"
            )
        return response.json()["prompt"]

    def memory_bytes(self, deployment: Deployment) -> int | None:
        """Peak resident memory (VmHWM) of the deployment's server process since it started,
        in bytes; None when /proc does not show it. Peak rather than current, since mapped
        weight pages can be evicted and come back; the bench stage gives this a process of
        its own (see harness/stages/bench.py), so it covers load, warm-up and bench only."""
        process, _, _ = self._servers[deployment.model_name]
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def stopped(self, deployment: Deployment) -> ServerStopped | None:
        """How the deployment's llama-server ended, with the last lines of its log, once its
        process has exited; None while it runs. Waits up to EXIT_GRACE_S for the exit."""
        process, _, _ = self._servers[deployment.model_name]
        try:
            returncode = process.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            return None
        return ServerStopped(
            f"llama-server {exit_status(returncode)}",
            log_tail(Path(deployment.details["log"])),
        )

    def remove(self, deployment: Deployment) -> None:
        self.remove_name(deployment.model_name)

    def remove_name(self, model_name: str) -> None:
        entry = self._servers.pop(model_name, None)
        if entry is None:
            return
        process, _, folder = entry
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        for name in list(self._servers):
            self.remove_name(name)
        self._http.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
