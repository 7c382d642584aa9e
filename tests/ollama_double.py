"""A stand-in Ollama server: Ollama's HTTP API, with real llama.cpp inference behind it.

No Ollama server can be installed where forgebench's tests run, so the Ollama backend is
tested against this. It follows Ollama's source (ollama/ollama: server/routes.go,
server/create.go, api/types.go, template/template.go, openai/openai.go): the same fields,
NDJSON streaming, nanosecond durations, error texts and status codes, including errors sent
inside a 200 stream once it has begun, and `_debug_render_only` (the rendered prompt, nothing
generated). Prompts are rendered from the Go template given to /api/create
(ollama_double_gotemplate.py), or, where Ollama 0.30+ prefers the GGUF's own Jinja template,
as llama-server renders that (ollama_double_native.py, with the other rules a real server
applies: names, option types, default context, thinking). Inference is llama-cpp-python
on the uploaded GGUF, one runner per model file, as Ollama's scheduler keeps one, its
prompt cache llama-cpp-python's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
import ollama_double_native as native
from ollama_double_gotemplate import SAMPLE, TemplateError, render_prompt

from harness import toolchain

VERSION = "0.33.0-double"
"""The Ollama whose source the double follows; 0.30-double emulates the older counts."""
DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
# api/types.go DefaultOptions; num_ctx comes from the server's memory (OllamaDouble.num_ctx)
DEFAULTS = {"num_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0}
DEFAULTS |= {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
DEFAULTS |= {"seed": -1, "num_keep": 4}
SAMPLING = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
SAMPLING |= {k: k for k in ("repeat_penalty", "presence_penalty", "frequency_penalty")}
OPENAI = {"max_tokens": "num_predict"} | {k: k for k in ("temperature", "top_p", "stop", "seed")}
Parts = Iterator[tuple[str, dict | None]]
"""Streamed text, then "" with the final metrics."""
UNSUPPORTED = ("format", "tools", "images", "system", "template", "raw", "suffix")
OLLAMA_QUANTIZE = {t: t for t in ("F32", "F16", "BF16", "Q8_0", "Q4_K_S", "Q4_K_M")}
OLLAMA_QUANTIZE["Q4_K"] = "Q4_K_M"
"""fs/ggml/type.go ParseFileType: the quantize values Ollama's create takes, to the type it
makes (its error names five: BF16 is taken but left out, "TODO")."""


class ApiError(Exception):
    """An error answer: {"error": message} with this status (Go's default is 500)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message, self.status = message, status


# --- models, runners and what the API says about them -------------------------------------


@dataclass
class Model:
    name: str
    digest: str
    path: Path
    template: str
    system: str
    parameters: dict
    modified_at: str
    native: bool = False
    """Served on llama-server's Jinja path with the GGUF's own chat template (no Go template
    given, or PreferChatTemplate): server/routes.go chatModeForModel."""
    adapter: Path | None = None
    """The ADAPTER layer's LoRA GGUF, applied at scale 1 by the runner (llama-server --lora)."""

    @property
    def runner_key(self) -> str:
        """One runner per model file and adapter, as the scheduler reloads on either."""
        return f"{self.digest}+{self.adapter.name}" if self.adapter else self.digest

    @property
    def capabilities(self) -> list[str]:
        """Model.Capabilities for the selected template (server/images.go)."""
        if self.native:
            found = native.chat_template_capabilities(native.gguf_chat(self.path).template)
            return [*found, "completion"]
        return ["completion", *native.go_template_capabilities(self.template)]

    @property
    def served_template(self) -> str:
        """server/routes.go selectedModelTemplate: what /api/show calls the template."""
        return native.gguf_chat(self.path).template if self.native else self.template


@dataclass
class Runner:
    llm: llama_cpp.Llama
    num_ctx: int
    model: Model
    expires_at: datetime
    lock: threading.Lock = field(default_factory=threading.Lock)


def _iso(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def full_name(name: str) -> str:
    """Ollama's names default their tag to `latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def keep_alive(value: Any) -> timedelta:
    """api.Duration: 5 minutes by default, seconds as a number or a Go duration string;
    negative is forever."""
    if value is None or str(value).startswith("-"):
        return timedelta(minutes=5) if value is None else timedelta(days=36500)
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    found = re.findall(r"([\d.]+)(ms|s|m|h)", value)
    return timedelta(seconds=sum(float(n) * units[u] for n, u in found))


def go_quote(s: str) -> str:
    """parser.quote: how `ollama show --modelfile` writes a value."""
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return f'"""{s}"""' if '"' in s else f'"{s}"'
    return s


def go_value(v: Any, syntax: bool = False) -> str:
    """fmt's %v (or %#v) of a JSON-decoded value."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return json.dumps(v, ensure_ascii=False) if syntax and isinstance(v, str) else str(v)


def split_utf8(raw: bytes) -> tuple[str, bytes]:
    """Decode what is complete; keep a character split across tokens for the next one."""
    for cut in range(len(raw), max(len(raw) - 4, -1), -1):
        try:
            return raw[:cut].decode(), raw[cut:]
        except UnicodeDecodeError:
            continue
    return raw.decode(errors="replace"), b""


def hold_back(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """(sendable, kept back, stopped): a stop string ends the text before it, and a tail that
    may begin one waits, so no stop string ever reaches the client (as in Ollama's runner)."""
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        return text[: min(hits)], "", True
    keep = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - keep], text[len(text) - keep :], False


def generate(runner: Runner, prompt: str, options: dict, counts_cached: bool, shift: bool) -> Parts:
    """Sample until an end-of-generation token, a stop string or num_predict; the last item
    carries Ollama's metrics (api.Metrics omits zero values).

    A prompt that fills num_ctx is refused with llama-server's error, or, on the Go template
    path with context shift (`shift`), cut as llm/llama_server.go completionPromptForRequest
    cuts it. The prompt cache is llama-cpp-python's own, which reuses the longest prefix
    shared with what the runner last held, as llama-server's slot does with `cache_prompt`
    (always set by Ollama); `prompt_eval_count` counts only the tokens evaluated before
    Ollama 0.31, cached ones too from 0.31 on (promptEvalCount = cache_n + prompt_n,
    ollama commit 35fa277), while `prompt_eval_duration` is always the evaluated ones' time.
    """
    llm = runner.llm
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    if len(tokens) >= runner.num_ctx:
        if not shift:
            error = native.CONTEXT_OVERFLOW.format(n=len(tokens), ctx=runner.num_ctx)
            raise ApiError(error, 400)
        tokens = shifted(tokens, runner.num_ctx, options["num_keep"], llm.token_bos())
    cached = 0
    for held, wanted in zip(llm._input_ids[: llm.n_tokens].tolist(), tokens, strict=False):
        if held != wanted:
            break
        cached += 1
    cached = min(cached, len(tokens) - 1)  # the last prompt token is always evaluated
    room = runner.num_ctx - len(tokens)
    limit = min(room, options["num_predict"]) if options["num_predict"] > 0 else room
    stops = [s for s in options.get("stop") or [] if s]
    if options["seed"] >= 0:
        llm.set_seed(int(options["seed"]))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampled = llm.generate(tokens, **{arg: options[name] for arg, name in SAMPLING.items()})
    started = first = time.perf_counter()
    count, reason, held, raw = 0, "length", "", b""
    for token in sampled:
        first = first if count else time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            reason = "stop"
            break
        count += 1
        text, raw = split_utf8(raw + llm.detokenize([token], special=True))
        sendable, held, stopped = hold_back(held + text, stops)
        if sendable:
            yield sendable, None
        if stopped or count >= limit:
            reason = "stop" if stopped else "length"
            break
    if held:  # the start of a stop string that never came
        yield held, None
    ended = time.perf_counter()
    prompt_count = len(tokens) if counts_cached else len(tokens) - cached
    metrics = {"done_reason": reason, "prompt_eval_count": prompt_count, "eval_count": count}
    metrics |= {"prompt_eval_duration": _ns(first - started), "eval_duration": _ns(ended - first)}
    yield "", {k: v for k, v in metrics.items() if v}


def shifted(tokens: list[int], num_ctx: int, num_keep: int, bos: int) -> list[int]:
    """completionPromptForRequest with context shift: keep num_keep tokens (and BOS), drop
    from after them so that half the context's remainder is free (contextShiftPromptLimit)."""
    keep = min(max(num_keep, 0) + (tokens[:1] == [bos]), num_ctx - 1)
    limit = num_ctx - max((num_ctx - keep) // 2, 1)
    return tokens[:keep] + tokens[keep + len(tokens) - limit :]


def answer_chunk(model: str, key: str, text: str, final: dict | None) -> dict:
    """One /api/chat ("message") or /api/generate ("response") object; `final` ends it.
    Thinking goes in message.thinking (chat) or `thinking` (generate), never in content."""
    thought = isinstance(text, native.Thought)
    said = {"thinking": str(text)} if thought else {}
    text = "" if thought else text
    content = {"role": "assistant", "content": text} | said if key == "message" else text
    chunk = {"model": model, "created_at": _iso(), key: content, "done": final is not None}
    return chunk | ({} if key == "message" else said) | (final or {})


class OllamaDouble:
    """`with OllamaDouble() as double:` serves at `double.host` until the block ends. Loaded
    models stay loaded until unloaded (keep_alive 0); `expires_at` is only reported."""

    def __init__(self, version: str = VERSION, vram_bytes: int = 0) -> None:
        """`version` as /api/version reports it: before 0.31, prompt_eval_count leaves out
        cached prompt tokens; from 0.34.1 a create with an adapter is refused (as reported
        of 0.34.2; what 0.34.1+ does with `quantize` on a GGUF is not known here, and
        forgebench does not ask it). `vram_bytes`: the GPUs' memory, which sets the default
        num_ctx (none here: 4096)."""
        self.version = version
        self.release = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
        self.counts_cached = self.release[:2] >= (0, 31)
        self.num_ctx = native.default_num_ctx(vram_bytes)
        self.unreachable: dict[str, str] = {}
        """Listed models whose /api/show fails, name -> error (a cloud model offline)."""
        self.folder = Path(tempfile.mkdtemp(prefix="ollama-double-"))
        (self.folder / "blobs").mkdir()
        self.models: dict[str, Model] = {}
        self.runners: dict[str, Runner] = {}
        self.uploads: list[str] = []
        """Digests received by POST /api/blobs, in order."""
        self.copied: Callable[[str, str], None] = lambda source, destination: None
        """Called after each POST /api/copy, before its reply."""
        self.lock = threading.RLock()
        self.connections: set[socket.socket] = set()
        """Open client connections (keep-alive), which a server that dies drops."""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.double = self  # type: ignore[attr-defined]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> OllamaDouble:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering, as an Ollama server that died: the port closes and the runners go;
        what it stored (models, blobs) stays, as it does on disk, for `start_again`."""
        self.server.shutdown()
        self.server.server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        with self.lock:
            for runner in self.runners.values():
                _close(runner)
            self.runners.clear()

    def start_again(self) -> None:
        """Ollama restarted: the same address, the same models, none of them loaded."""
        port = self.server.server_address[1]
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.server.double = self  # type: ignore[attr-defined]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        for runner in self.runners.values():
            _close(runner)
        shutil.rmtree(self.folder, ignore_errors=True)

    def blob_path(self, digest: str, status: int = 400) -> Path:
        if not (match := DIGEST.match(digest)):
            raise ApiError("invalid digest format", status)
        return self.folder / "blobs" / f"sha256-{match.group(1)}"

    def blob(self, h: _Handler, digest: str) -> None:
        path = self.blob_path(digest)
        if h.command == "POST" and path.exists():  # one it has: 200, the body unused
            h.read_body(lambda _: None)
        if h.command == "HEAD" or path.exists():
            return h.reply(200 if path.exists() else 404, None)
        sha, partial = hashlib.sha256(), path.with_suffix(".partial")
        with partial.open("wb") as fh:
            h.read_body(lambda data: (sha.update(data), fh.write(data)))
        if (got := f"sha256:{sha.hexdigest()}") != digest:
            partial.unlink()
            raise ApiError(f'digest mismatch, expected "{digest}", got "{got}"', 400)
        partial.rename(path)
        self.uploads.append(digest)
        h.reply(201, None)

    def create(self, h: _Handler, body: dict) -> None:
        name, files = body.get("model") or body.get("name") or "", body.get("files") or {}
        if not all(files.values()):
            raise ApiError("invalid digest format", 400)
        if not native.valid_name(name):
            raise ApiError("invalid model name", 400)
        if any(body.get(k) for k in ("from", "messages")) or (
            len(files) != 1 or not next(iter(files)).endswith(".gguf")
        ):
            raise ApiError("the test double creates models from one .gguf file only", 400)
        adapters = body.get("adapters") or {}
        if adapters and self.release >= (0, 34, 1):  # ollama PR #14969: errAdaptersUnsupported
            raise ApiError("LoRA adapters are no longer supported", 400)
        if not all(adapters.values()):
            raise ApiError("invalid digest format", 400)
        if len(adapters) > 1:  # convertModelFromFiles: errOnlyOneAdapterSupported
            raise ApiError("only one adapter is currently supported", 400)
        if adapters and not next(iter(adapters)).endswith(".gguf"):
            raise ApiError("the test double takes a GGUF adapter (ADAPTER x.gguf) only", 400)
        steps = self._create(full_name(name), next(iter(files.values())), body)
        h.stream(steps) if body.get("stream", True) else h.reply(200, list(steps)[-1])

    def _create(self, name: str, digest: str, body: dict) -> Iterator[dict]:
        """create.go's status lines; errors after the first one go inside the stream."""
        yield {"status": "parsing GGUF"}
        path = self.blob_path(digest, status=500)
        if not path.exists():
            raise ApiError(f"open {path}: no such file or directory")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ApiError("supplied file was not in GGUF format", 400)
        if wanted := (body.get("quantize") or body.get("quantization") or "").upper():
            path, digest = yield from self._quantized(path, digest, wanted)
        else:
            yield {"status": f"using existing layer {digest}"}
        adapter = None
        for adapter_digest in (body.get("adapters") or {}).values():
            adapter = self.blob_path(adapter_digest, status=500)
            if not adapter.exists():
                raise ApiError(f"open {adapter}: no such file or directory")
            # ggufLayers: a GGUF whose general.type is "adapter" is an adapter layer; any
            # other would be a second model layer, which the runner cannot load as a LoRA
            if native.gguf_kind(adapter) != "adapter":
                raise ApiError("the ADAPTER file is not a LoRA GGUF (general.type adapter)", 400)
            yield {"status": f"using existing layer {adapter_digest}"}
        template, system = body.get("template") or "", body.get("system") or ""
        chat_template = native.gguf_chat(path).template
        if not template and not chat_template:
            raise ApiError("the test double needs a template: the GGUF has none either", 400)
        try:
            if template:
                render_prompt(template, SAMPLE)
        except TemplateError as exc:
            raise ApiError(f"template error: {exc}", 400) from None
        served_natively = not template or native.prefers_chat_template(chat_template, template)
        parameters = body.get("parameters") or {}
        for layer in filter(None, (template, system, json.dumps(parameters) if parameters else "")):
            yield {"status": f"creating new layer sha256:{_sha(layer)}"}
        yield {"status": "writing manifest"}
        native.describe(path)
        with self.lock:
            made = Model(
                name, digest, path, template, system, parameters, _iso(), served_natively, adapter
            )
            self.models[name] = made
        yield {"status": "success"}

    def _quantized(self, path: Path, digest: str, wanted: str) -> Iterator[dict]:
        """createModel's quantize, as Ollama 0.30+ does it: fs/ggml ParseFileType takes
        five types, only an F16, BF16 or F32 file is quantized, and llama.cpp's own
        llama-quantize makes the file (server/quantization.go: `--allow-requantize IN OUT
        TYPE`, no per-tensor overrides for llama or gemma3). Returns the new (path, digest)."""
        if wanted not in OLLAMA_QUANTIZE:
            raise ApiError(
                f"unsupported quantization type {wanted} - supported types are "
                "F32, F16, Q4_K_S, Q4_K_M, Q8_0"
            )
        source = native.describe(path)[0]["quantization_level"]
        if source not in ("F16", "BF16", "F32"):
            raise ApiError("quantization is only supported for F16, BF16 and F32 models")
        target = OLLAMA_QUANTIZE[wanted]
        if source == target:
            yield {"status": f"using existing layer {digest}"}
            return path, digest
        yield {"status": f"quantizing {source} model to {target}"}
        handle, name = tempfile.mkstemp(prefix=target, suffix=".partial", dir=self.folder)
        os.close(handle)
        made = Path(name)
        command = [str(toolchain.tool("llama-quantize")), "--allow-requantize"]
        done = subprocess.run([*command, str(path), str(made), target], capture_output=True)
        if done.returncode != 0:
            made.unlink(missing_ok=True)
            raise ApiError(f"llama-quantize failed: exit status {done.returncode}")
        yield {"status": "verifying conversion"}
        new = f"sha256:{hashlib.sha256(made.read_bytes()).hexdigest()}"
        made.rename(self.blob_path(new))
        yield {"status": f"creating new layer {new}"}
        return self.blob_path(new), new

    def model(self, name: str) -> Model:
        if full_name(name) not in self.models:
            raise ApiError(f"model '{name}' not found", 404)
        return self.models[full_name(name)]

    def show(self, h: _Handler, body: dict) -> None:
        if not (name := body.get("model") or body.get("name")):
            raise ApiError("model is required", 400)
        if (error := self.unreachable.get(full_name(name))) is not None:
            raise ApiError(error)
        m = self.model(full_name(name))
        options = [(k, v) for k, vs in sorted(m.parameters.items()) for v in _listed(vs)]
        lines = ['# Modelfile generated by "ollama show"']
        lines += [
            "# To build a new Modelfile based on this, replace FROM with:",
            f"# FROM {m.name}",
        ]
        lines += ["", f"FROM {m.path}", f"TEMPLATE {go_quote(m.template)}"]
        lines += [f"SYSTEM {go_quote(m.system)}"] if m.system else []
        lines += [f"PARAMETER {k} {go_quote(go_value(v))}" for k, v in options]
        details, info = native.describe(m.path)
        reply = {"modelfile": "\n".join(lines) + "\n", "template": m.served_template}
        reply["details"] = details
        reply["parameters"] = "\n".join(f"{k:<30} {go_value(v, True)}" for k, v in options)
        reply |= {"model_info": info, "capabilities": m.capabilities, "modified_at": m.modified_at}
        if body.get("verbose"):
            reply["tensors"] = native.tensors(m.path)
        h.reply(200, reply | ({"system": m.system} if m.system else {}))

    def tags(self, h: _Handler, body: dict) -> None:
        listed = []
        for m in self.models.values():
            entry = {"name": m.name, "model": m.name, "modified_at": m.modified_at}
            entry |= {"size": m.path.stat().st_size, "digest": _sha(m.name + m.digest + m.template)}
            listed.append(entry | {"details": native.describe(m.path)[0]})
        for name in self.unreachable:  # a cloud model: listed, its weights elsewhere
            entry = {"name": name, "model": name, "modified_at": _iso(), "size": 384}
            listed.append(entry | {"digest": _sha(name), "remote_host": "https://ollama.com:443"})
        h.reply(200, {"models": listed})

    def ps(self, h: _Handler, body: dict) -> None:
        listed = []
        for r in self.runners.values():
            (details, info), size = native.describe(r.model.path), r.model.path.stat().st_size
            entry = {"name": r.model.name, "model": r.model.name, "details": details}
            entry |= {"size": size + native.kv_cache_bytes(info, r.num_ctx), "size_vram": 0}
            entry |= {"digest": _sha(r.model.name + r.model.digest + r.model.template)}
            listed.append(entry | {"expires_at": _iso(r.expires_at), "context_length": r.num_ctx})
        h.reply(200, {"models": listed})

    def delete(self, h: _Handler, body: dict) -> None:
        name = body.get("model") or body.get("name") or ""
        with self.lock:
            if (model := self.models.pop(full_name(name), None)) is None:
                raise ApiError(f"model '{name}' not found", 404)
            if all(m.digest != model.digest for m in self.models.values()):
                model.path.unlink(missing_ok=True)  # manifest.RemoveLayers: unused blobs go
        h.reply(200, None)

    def copy(self, h: _Handler, body: dict) -> None:
        """server/routes.go CopyHandler: the source's manifest under another name (the
        layers are shared); `copied` is called after, for a test that acts between steps."""
        source, destination = body.get("source") or "", body.get("destination") or ""
        if not source or not destination:
            raise ApiError("source and destination are required", 400)
        with self.lock:
            model = self.model(source)
            name = full_name(destination)
            self.models[name] = dataclasses.replace(model, name=name, modified_at=_iso())
        self.copied(source, destination)
        h.reply(200, None)

    def chat(self, h: _Handler, body: dict) -> None:
        self._answer(h, body, "message", body.get("messages") or [])

    def generate(self, h: _Handler, body: dict) -> None:
        """/api/generate, with the model's own template and system prompt."""
        prompt = body.get("prompt")
        self._answer(h, body, "response", [{"role": "user", "content": prompt}] if prompt else [])

    def _answer(self, h: _Handler, body: dict, key: str, messages: list[dict]) -> None:
        if unsupported := [k for k in UNSUPPORTED if body.get(k)]:
            raise ApiError(f"the test double does not support {', '.join(unsupported)}", 400)
        model = self.model(body.get("model", ""))
        if not messages:
            return h.reply(200, answer_chunk(body["model"], key, "", self._load(model, body)))
        body = body | {"think": self._think(model, body)}
        if body.get("_debug_render_only"):
            return h.reply(200, self._render_only(model, messages, body, key))
        h.answer(self._chat(model, messages, body), body, key)

    def _render_only(self, model: Model, messages: list, body: dict, key: str) -> dict:
        """routes.go with DebugRenderOnly: the runner is scheduled (loaded) and the prompt
        rendered, then answered whole whatever `stream` says, with a zero message or
        response, done false and the prompt in _debug_info; nothing is generated."""
        options = DEFAULTS | model.parameters | (body.get("options") or {})
        runner = self._runner(model, options, body)
        with runner.lock:
            prompt = self._prompt(model, runner, with_system(model, messages), body)
        empty = {"role": "", "content": ""} if key == "message" else ""
        reply = {"model": body["model"], "created_at": _iso(), key: empty, "done": False}
        return reply | {"_debug_info": {"rendered_template": prompt}}

    def _chat(self, model: Model, messages: list, body: dict) -> Parts:
        messages = with_system(model, messages)
        return self._run(model, lambda r: self._prompt(model, r, messages, body), body)

    def _think(self, model: Model, body: dict) -> bool | None:
        """ChatHandler: a thinking model thinks unless told not to (think defaults to true);
        asking any other model to think is an error."""
        think = body.get("think")
        if "thinking" in model.capabilities:
            return True if think is None else bool(think)
        if think:
            raise ApiError(f'"{body.get("model")}" does not support thinking', 400)
        return think

    def _prompt(self, model: Model, runner: Runner, messages: list[dict], body: dict) -> str:
        """The prompt for these messages: the oldest non-system ones dropped while it does
        not fit num_ctx (truncateNativeChatMessages, server/prompt.go chatPrompt; unless
        `truncate` is false), rendered by the GGUF's Jinja template on llama-server's path,
        else by the Go template."""
        think = body.get("think")
        chat = native.gguf_chat(model.path)

        def render(turns: list[dict]) -> str:
            try:
                if not model.native:
                    return render_prompt(model.template, turns)
                adds_bos = bool(runner.llm.tokenize(b"", add_bos=True, special=True))
                return native.render_jinja(
                    chat.template, turns, chat.bos, chat.eos, adds_bos, think
                )
            except (TemplateError, jinja2.TemplateError) as exc:
                raise ApiError(f"template: {exc}") from None

        if body.get("truncate") is False or len(messages) <= 1:
            return render(messages)
        for start in range(len(messages)):
            system = [m for m in messages[:start] if m["role"] == "system"]
            prompt = render(system + messages[start:])
            tokens = runner.llm.tokenize(prompt.encode(), add_bos=True, special=True)
            if len(tokens) <= runner.num_ctx:
                break
        return prompt

    def openai_chat(self, h: _Handler, body: dict) -> None:
        """/v1/chat/completions mapped onto /api/chat as openai.FromChatRequest maps it
        (temperature and top_p default to 1), answered whole: no streaming."""
        if not body.get("messages"):
            raise ApiError("[] is too short - 'messages'", 400)
        texts_only = all(isinstance(m.get("content"), str) for m in body["messages"])
        if body.get("stream") or not texts_only:
            raise ApiError("the test double answers string contents, unstreamed, only", 400)
        options = {"temperature": 1.0, "top_p": 1.0}
        options |= {name: body[key] for key, name in OPENAI.items() if body.get(key) is not None}
        if isinstance(options.get("stop"), str):
            options["stop"] = [options["stop"]]
        model = self.model(body.get("model", ""))
        messages = [{"role": m["role"], "content": m["content"]} for m in body["messages"]]
        asked = {"options": options, "think": self._think(model, body | {"think": None})}
        texts, finals = zip(*self._chat(model, messages, asked), strict=True)
        said = "".join(t for t in texts if not isinstance(t, native.Thought))
        final, message = finals[-1], {"role": "assistant", "content": said}
        n, m = final["prompt_eval_count"], final.get("eval_count", 0)
        usage = {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
        choice = {"index": 0, "message": message, "finish_reason": final["done_reason"]}
        reply = {"id": f"chatcmpl-{random.randrange(999)}", "object": "chat.completion"}
        reply |= {"created": int(time.time()), "model": body["model"], "choices": [choice]}
        h.reply(200, reply | {"system_fingerprint": "fp_ollama", "usage": usage})

    def _load(self, model: Model, body: dict) -> dict:
        """An empty prompt loads the model, or unloads it when keep_alive is 0."""
        if keep_alive(body.get("keep_alive")) == timedelta(0):
            with self.lock:
                _close(self.runners.pop(model.runner_key, None))
            return {"done_reason": "unload"}
        self._runner(model, DEFAULTS | model.parameters | (body.get("options") or {}), body)
        return {"done_reason": "load"}

    def context_length(self, model: Model, options: dict) -> int:
        """The runner's num_ctx: the option, else the server's memory tier default, never
        above the model's trained context (server/sched.go effectiveContext) nor under 4."""
        wanted = int(options.get("num_ctx") or self.num_ctx)
        trained = native.gguf_chat(model.path).train_ctx
        return max(4, min(wanted, trained) if trained > 0 else wanted)

    def _runner(self, model: Model, options: dict, body: dict) -> Runner:
        """The model file's runner, (re)loaded when absent or its num_ctx changed; options
        of the wrong type fail here, at load (scheduleRunner's modelOptions: a 500), not
        when the model was created."""
        if error := native.option_error(model.parameters) or native.option_error(
            body.get("options") or {}
        ):
            raise ApiError(error)
        num_ctx = self.context_length(model, options)
        with self.lock:
            runner = self.runners.get(model.runner_key)
            if runner is None or runner.num_ctx != num_ctx:
                _close(runner)
                llm = llama_cpp.Llama(
                    model_path=str(model.path),
                    n_ctx=num_ctx,
                    lora_path=str(model.adapter) if model.adapter else None,
                    verbose=False,
                )
                llm.eval([llm.token_bos(), llm.token_eos()])  # warm up, as llama-server does
                llm.reset()
                runner = Runner(llm, num_ctx, model, datetime.now(UTC))
                self.runners[model.runner_key] = runner
            runner.model = model
            runner.expires_at = datetime.now(UTC) + keep_alive(body.get("keep_alive"))
            return runner

    def _run(self, model: Model, render: Callable[[Runner], str], body: dict) -> Parts:
        started = time.perf_counter()
        options = DEFAULTS | model.parameters | (body.get("options") or {})
        runner = self._runner(model, options, body)
        loaded = time.perf_counter()
        shift = not model.native and body.get("truncate") is not False
        with runner.lock:
            prompt = render(runner)
            parts = generate(runner, prompt, options, self.counts_cached, shift)
            if model.native and body.get("think"):
                parts = native.split_thinking(parts, prompt.rstrip().endswith("<think>"))
            for text, final in parts:
                if final is not None:
                    final["total_duration"] = _ns(time.perf_counter() - started)
                    final["load_duration"] = _ns(loaded - started)
                yield text, final


def with_system(model: Model, messages: list[dict]) -> list[dict]:
    """ChatHandler: the model's system prompt leads unless the request's first message is one."""
    if messages[0]["role"] != "system" and model.system:
        return [{"role": "system", "content": model.system}, *messages]
    return messages


def _close(runner: Runner | None) -> None:
    """Free a runner once no request is generating with it."""
    if runner:
        with runner.lock:
            runner.llm.close()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else [value]


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: JSON bodies in, Gin-style JSON and chunked NDJSON out."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.double.connections.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.double.connections.discard(self.connection)  # type: ignore[attr-defined]

    def log_message(self, *args: Any) -> None:
        """Quiet: a failing test shows what matters, not an access log."""

    def route(self) -> None:
        double: OllamaDouble = self.server.double  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        routes = {
            ("GET", "/"): lambda h, b: h.reply(200, "Ollama is running"),
            ("GET", "/api/version"): lambda h, b: h.reply(200, {"version": double.version}),
            ("GET", "/api/tags"): double.tags,
            ("GET", "/api/ps"): double.ps,
            ("POST", "/api/create"): double.create,
            ("POST", "/api/show"): double.show,
            ("DELETE", "/api/delete"): double.delete,
            ("POST", "/api/copy"): double.copy,
            ("POST", "/api/chat"): double.chat,
            ("POST", "/api/generate"): double.generate,
            ("POST", "/v1/chat/completions"): double.openai_chat,
        }
        try:
            if path.startswith("/api/blobs/") and self.command in ("HEAD", "POST"):
                return double.blob(self, path.removeprefix("/api/blobs/"))
            if (self.command, path) not in routes:
                return self.reply(404, "404 page not found")
            routes[self.command, path](self, self._json() if self.command != "GET" else {})
        except ApiError as exc:
            error: Any = exc.message
            if path.startswith("/v1/"):  # openai.NewError
                kind = {400: "invalid_request_error", 404: "not_found_error"}.get(exc.status)
                error = {"message": exc.message, "type": kind or "api_error", "param": None}
                error["code"] = None
            self.reply(exc.status, {"error": error})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_DELETE = route

    def _json(self) -> dict:
        data = bytearray()
        self.read_body(data.extend)
        if not data:
            raise ApiError("missing request body", 400)
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise ApiError(str(exc), 400) from None

    def read_body(self, sink: Callable[[bytes], Any]) -> None:
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0 and (data := self.rfile.read(min(remaining, 1 << 20))):
            sink(data)
            remaining -= len(data)

    def reply(self, status: int, obj: Any) -> None:
        """One whole answer: Gin's JSON (or text); no body for None or HEAD."""
        data = (obj if isinstance(obj, str) else "" if obj is None else dumps(obj)).encode()
        self.send_response(status)
        if obj is not None:
            kind = "text/plain" if isinstance(obj, str) else "application/json"
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def answer(self, parts: Parts, body: dict, key: str) -> None:
        """Chat/generate objects streamed; or with "stream": false, the last holding all text."""
        items = (answer_chunk(body["model"], key, text, final) for text, final in parts)
        if body.get("stream", True):
            return self.stream(items)
        chunks = list(items)
        text = "".join(c[key]["content"] if key == "message" else c[key] for c in chunks)
        held = (c[key] if key == "message" else c for c in chunks)
        thinking = "".join(h.get("thinking", "") for h in held)
        final = chunks[-1]
        final[key] = final[key] | {"content": text} if key == "message" else text
        if thinking:
            final[key] = final[key] | {"thinking": thinking} if key == "message" else final[key]
            final |= {} if key == "message" else {"thinking": thinking}
        self.reply(200, final)

    def stream(self, items: Iterator[dict]) -> None:
        """routes.go streamResponse: an error before the first line is a plain error answer
        with its status; after it, an {"error": ...} line in the 200 stream."""
        first = next(items)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for item in itertools.chain([first], items):
                self._line(item)
        except ApiError as exc:
            self._line({"error": exc.message})
        self.wfile.write(b"0\r\n\r\n")

    def _line(self, item: dict) -> None:
        data = (dumps(item) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def dumps(obj: Any) -> str:
    """JSON as Go's encoder writes it, with <, > and & escaped."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
