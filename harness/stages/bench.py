"""bench: speed and memory of a served model, measured the way a user calls it.

Spec keys: `bench.*` (`max_tokens`, `repeats`, `warmup`). A fixed prompt set
(`evals/bench_prompts.jsonl`) is streamed through the serving API one request
at a time, after warm-up requests. Per request: time to first token from the
client's side, end-to-end stream tokens/s, and the server's own prefill and
decode figures (llama-server `timings`, Ollama's nanosecond durations).
Reported as p50/p95, with the model's load time, the serving process's peak
resident memory and, beside them, `llama-bench`'s engine figures for the same
GGUF and thread count, as the reference the served figures are read against.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.backends import Backend, Deployment
from harness.evals import EVALS

PROMPTS = EVALS / "bench_prompts.jsonl"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; with few samples p95 is the slowest, which is the honest answer."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def prompts() -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in PROMPTS.read_text().splitlines() if line]


def one_request(backend: Backend, deployment: Deployment, messages, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    final = None
    for chunk in backend.chat(deployment, messages, max_tokens=max_tokens):
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
    for messages in prompt_set[: settings["warmup"]]:
        one_request(backend, deployment, messages, settings["max_tokens"])
    samples = []
    total = settings["repeats"] * len(prompt_set)
    for i in range(total):
        progress(f"request {i + 1}/{total}", (i + 1) / total)
        samples.append(
            one_request(
                backend, deployment, prompt_set[i % len(prompt_set)], settings["max_tokens"]
            )
        )
    metrics: dict[str, float] = {"bench_requests": float(len(samples))}
    for name in ("ttft_s", "stream_tps", "prefill_tps", "decode_tps"):
        values = [s[name] for s in samples]
        metrics[f"{name}_p50"] = round(statistics.median(values), 4)
        metrics[f"{name}_p95"] = round(percentile(values, 95), 4)
    metrics["ttft_ms_p50"] = round(metrics["ttft_s_p50"] * 1000, 1)
    metrics["ttft_ms_p95"] = round(metrics["ttft_s_p95"] * 1000, 1)
    metrics["load_s"] = round(deployment.load_seconds, 3)
    memory = backend.memory_bytes(deployment)
    if memory is not None:
        metrics["memory_mb"] = round(memory / 2**20, 1)
    return metrics, samples


def llama_bench(gguf: Path, threads: int | None = None) -> dict[str, float]:
    """llama.cpp's own engine figures (prompt processing and generation tokens/s)."""
    from harness import toolchain

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
    served.deploy()
    metrics, samples = measure(served.backend, served.deployment, settings["bench"], progress)
    (out / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    threads = int(settings["serve"]["parameters"].get("num_thread", os.cpu_count() or 1))
    progress("llama-bench engine reference", None)
    metrics |= llama_bench(inputs["gguf"] / "model.gguf", threads)
    return metrics
