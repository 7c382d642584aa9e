"""bench: speed and memory of a served model, measured the way a user calls it.

Spec keys: `bench.*` (`max_tokens`, `repeats`, `warmup`). A fixed prompt set
(`evals/bench_prompts.jsonl`) is streamed through the serving API one request
at a time, each decoding exactly `max_tokens` tokens (end of sequence ignored, on
llama-server), `repeats` times over, after warm-up requests, on a deployment of the
bench's own: one that an earlier stage (check, evaluate) used is replaced first, so that no figure
depends on whether those stages ran now or came from the store. Per request:
time to first token from the client's side, end-to-end stream tokens/s, and the
server's own prefill and decode figures (llama-server `timings`, Ollama's
nanosecond durations).

Prefill is read from the first request after the deploy alone (a warm-up request
unless `warmup` is 0), whose prompt nothing has cached yet: later prompts share the
chat template's opening with the one before, which the servers' prompt cache skips, and
Ollama counts those skipped tokens in `prompt_eval_count` from 0.31 on but not in 0.30,
while its `prompt_eval_duration` leaves them out in both (harness/backends/ollama_stream.py
`chunk_from`); only a cold prompt gives one figure on every server.

Every percentile is by nearest rank (the ceil(q/100 * n)-th smallest sample, so
it is always a request that happened). Each figure is reported as its median
(`_p50`) and its slow tail: `ttft_s_p95`/`ttft_ms_p95` for time to first token,
`decode_tps_p5`, `stream_tps_p5` and `prefill_tps_p5` for the throughputs (a
throughput's p95 would be its fast tail, so it is not reported). With few
requests the slow tail is the slowest request, which is the honest answer.

Memory, which the two servers can only report in different ways, under two names:
- `memory_mb` (llama-server): the peak resident memory (VmHWM, weights mapped
  in, KV cache, compute buffers, the server's heap) of the server process that
  served nothing but this bench, read after its last request: load, warm-up and
  bench requests. MiB.
- `ollama_ps_size_mb` (Ollama): the size Ollama's `/api/ps` reports for the
  loaded model, its own account of weights, KV cache and compute graph; not a
  measurement of any process. MiB.
Beside them: the model's load time and `llama-bench`'s engine figures for the
same GGUF and thread count, as the reference the served figures are read against
(none where Ollama's create quantized the F16: the file it serves stays on the server).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from harness import toolchain
from harness.backends import Backend, Deployment
from harness.data.evals import EVALS

PROMPTS = EVALS / "bench_prompts.jsonl"
VERSION = 4
"""The bench's logic in the stage key (harness/plan/keys.py): 2 is nearest-rank percentiles, the
throughputs' slow tail (p5, no p95) and memory on a deployment of the bench's own; 3 is
prefill from the cold first request; 4 is fixed-length decodes."""
MEMORY_METRIC = {"llamacpp": "memory_mb", "ollama": "ollama_ps_size_mb"}
"""Backend name -> the name its `memory_bytes` is reported under (see the docstring)."""
THROUGHPUTS = ("stream_tps", "prefill_tps", "decode_tps")


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the ceil(q/100 * n)-th smallest value (1-based, at least the first).

    Exact arithmetic, since in floats 5/100 * 60 is 3.0000000000000004 and would take
    the 4th value instead of the 3rd."""
    if not values:
        raise ValueError("a percentile of no values")
    ordered = sorted(values)
    rank = math.ceil(Fraction(str(q)) * len(ordered) / 100)
    return ordered[max(1, min(len(ordered), rank)) - 1]


def prompts() -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in PROMPTS.read_text().splitlines() if line]


def one_request(backend: Backend, deployment: Deployment, messages, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    final = None
    for chunk in backend.chat(deployment, messages, max_tokens=max_tokens, fixed_length=True):
        if first is None and chunk.text:
            first = time.perf_counter()
        if chunk.done:
            final = chunk
    ended = time.perf_counter()
    if final is None or first is None:
        raise RuntimeError("the server streamed no answer")
    tokens = final.completion_tokens or 0
    return {
        "ttft_s": first - started,
        "stream_tps": (tokens - 1) / (ended - first) if tokens > 1 and ended > first else 0.0,
        "prefill_tps": final.prompt_tokens / final.prompt_seconds
        if final.prompt_tokens and final.prompt_seconds
        else 0.0,
        "decode_tps": tokens / final.decode_seconds if final.decode_seconds else 0.0,
        "completion_tokens": tokens,
        # the same stretch timed by each side: first token to the end of the answer
        "stream_s": ended - first,
        "decode_s": final.decode_seconds or 0.0,
    }


def measure(
    backend: Backend, deployment: Deployment, settings: dict[str, Any], progress
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Summary figures and the per-request ones they summarise."""
    prompt_set = prompts()
    warmup, total = settings["warmup"], settings["repeats"] * len(prompt_set)
    order = prompt_set[:warmup] + [prompt_set[i % len(prompt_set)] for i in range(total)]
    samples, cold = [], None
    for i, messages in enumerate(order):
        if i >= warmup:
            progress(f"request {i + 1 - warmup}/{total}", (i + 1 - warmup) / total)
        sample = one_request(backend, deployment, messages, settings["max_tokens"])
        cold = cold or sample  # the first: nothing cached since the deploy
        if i >= warmup:
            samples.append(sample)
    metrics = summarise(samples, cold)
    metrics["load_s"] = round(deployment.load_seconds, 3)
    memory = backend.memory_bytes(deployment)
    if memory is not None:
        metrics[MEMORY_METRIC[backend.name]] = round(memory / 2**20, 1)
    return metrics, samples


def summarise(
    samples: list[dict[str, float]], cold: dict[str, float] | None = None
) -> dict[str, float]:
    """Median and slow tail of each per-request figure (see the module docstring); prefill
    from the `cold` request when there is one."""
    metrics: dict[str, float] = {"bench_requests": float(len(samples))}
    ttft = [s["ttft_s"] for s in samples]
    for q in (50, 95):
        metrics[f"ttft_s_p{q}"] = round(percentile(ttft, q), 4)
        metrics[f"ttft_ms_p{q}"] = round(percentile(ttft, q) * 1000, 1)
    for name in THROUGHPUTS:
        values = [s[name] for s in ([cold] if cold and name == "prefill_tps" else samples)]
        for q in (50, 5):
            metrics[f"{name}_p{q}"] = round(percentile(values, q), 4)
    return metrics


def llama_bench(gguf: Path, threads: int | None = None) -> dict[str, float]:
    """llama.cpp's own engine figures (prompt processing and generation tokens/s)."""
    command = [
        str(toolchain.tool("llama-bench")),
        "-m",
        str(gguf),
        "-p",
        "64",
        "-n",
        "32",
        "-r",
        "2",
        "-t",
        str(threads or os.cpu_count() or 1),
        "-o",
        "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    out = {}
    for row in rows:
        kind = "pp" if row.get("n_prompt", 0) > 0 else "tg"
        out[f"llama_bench_{kind}_tps"] = round(float(row["avg_ts"]), 2)
    return out


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress, served) -> dict:
    served.deploy(alone=True)
    metrics, samples = measure(served.backend, served.deployment, settings["bench"], progress)
    (out / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    if settings.get("ollama_quantize"):
        return metrics  # the quantized file is Ollama's own: llama-bench has it not to read
    threads = int(settings["serve"]["parameters"].get("num_thread", os.cpu_count() or 1))
    progress("llama-bench engine reference", None)
    metrics |= llama_bench(inputs["gguf"] / "model.gguf", threads)
    return metrics
