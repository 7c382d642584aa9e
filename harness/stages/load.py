"""load: speed and memory of a served model under load, beside llama.cpp's own batched figures.

Spec keys: `load.*` (`concurrency`, `requests`, `repeats`, `max_tokens`, `rates`,
`arrivals`; the `users` or `rate` a load budget names), and the cell's serving setting
(harness.spec.serving). The bench answers "how fast for one user"; this answers "how fast
at the load I serve".

- Closed loop, at each concurrency c (by default 1, 2, 4, ... up to the setting's slots,
  and the slots; and the users a load budget names, harness.spec.budgets): c streams
  each send `requests` fixed-length requests (`max_tokens` decoded, end of sequence
  ignored on llama-server) one after another, `repeats` times. Per c: the aggregate
  generated tok/s (every stream's tokens over the wall time from the first request to
  the last answer), each request's decode tok/s (the server's own timing), time to
  first token and inter-token latency (the gaps between streamed tokens, client side).
  A median is given with its distribution-free bounds at 95% (harness.judge.speed), a
  p95 with its bounds where enough samples exist; the aggregate is one figure per
  repeat, so its median comes with the range of the repeats.
- Open loop, at each rate in `rates` (and a load budget's): `arrivals` requests at
  random (Poisson) arrival times, seeded, each sent when it arrives whatever is still
  running; time to first token (which includes the wait for a free slot) and end-to-end
  latency percentiles.
- `load_memory_mb`: the peak resident memory of the server process (llama-server), which
  served only this stage, after the last request (on Ollama `load_ollama_ps_size_mb`, the
  size its /api/ps reports, as the bench); `kv_cache_mb`: the KV cache the
  setting reserves, from the GGUF's shape (harness.sources.gguf.kv_cache_bytes), to read
  memory growth with context against.
- `llama-batched-bench` (llama.cpp's own, same source tree) on the same GGUF, threads,
  KV-cache type, flash attention and context, at the same concurrencies with prompts as
  long as the load's and `max_tokens` generated: `batched_c{c}_tg_tps` is its decode
  rate alone (prefill excluded), `batched_c{c}_gen_tps` the tokens it generated over
  prefill and decode together, which is what the served aggregate pays too, so
  `load_c{c}_vs_engine` is `load_c{c}_agg_tps` over it. What is left between them is the
  server's: HTTP and streaming, sampling, and prefills that interleave with other
  streams' decoding rather than running as one batch.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

from harness import toolchain
from harness.backends import Backend, Deployment
from harness.judge.speed import quantile
from harness.sources.gguf import kv_cache_bytes
from harness.spec.serving import ServeSpec
from harness.stages.bench import MEMORY_METRIC, prompts

VERSION = 2
CONFIDENCE = 0.95
SEED = 0
"""The arrival times of the open loop, so two runs send at the same moments."""


def concurrencies(asked: list[int], slots: int, users: int | None = None) -> list[int]:
    """The concurrencies to drive: those asked, else powers of two up to the slots and the
    slots themselves; and the users a load budget names."""
    out, c = list(asked), 1
    while not asked and c < slots:
        out.append(c)
        c *= 2
    return sorted({*out, *([] if asked else [slots]), *([users] if users else [])})


def timed_request(
    backend: Backend, deployment: Deployment, messages, max_tokens: int, sent: float
) -> dict[str, Any]:
    """One streamed request: client-side times from `sent` (a perf_counter reading; for an
    arrival, when it was due) and the server's own figures."""
    times, final = [], None
    for chunk in backend.chat(deployment, messages, max_tokens=max_tokens, fixed_length=True):
        if chunk.text:
            times.append(time.perf_counter())
        if chunk.done:
            final = chunk
    ended = time.perf_counter()
    if final is None or not times:
        raise RuntimeError("the server streamed no answer")
    tokens = final.completion_tokens or len(times)
    return {
        "sent": sent,
        "ended": ended,
        "ttft_s": times[0] - sent,
        "e2e_s": ended - sent,
        "itl_s": [b - a for a, b in itertools.pairwise(times)],
        "tokens": tokens,
        "prompt_tokens": final.prompt_tokens or 0,
        "decode_tps": tokens / final.decode_seconds if final.decode_seconds else 0.0,
    }


def closed_loop(backend, deployment, c: int, settings: dict, offset: int) -> list[dict]:
    """`c` streams, each sending `requests` requests back to back."""
    prompt_set = prompts()

    def stream(s: int) -> list[dict]:
        out = []
        for r in range(settings["requests"]):
            messages = prompt_set[(offset + s * settings["requests"] + r) % len(prompt_set)]
            sent = time.perf_counter()
            out.append(timed_request(backend, deployment, messages, settings["max_tokens"], sent))
        return out

    with ThreadPoolExecutor(max_workers=c) as pool:
        return [r for rs in pool.map(stream, range(c)) for r in rs]


def open_loop(backend, deployment, rate: float, settings: dict) -> list[dict]:
    """`arrivals` requests at Poisson arrival times of `rate` per second (seeded)."""
    rng, prompt_set = random.Random(SEED), prompts()
    gaps = [rng.expovariate(rate) for _ in range(settings["arrivals"])]
    start = time.perf_counter()
    due = [start + sum(gaps[: i + 1]) for i in range(len(gaps))]

    def arrive(i: int) -> dict:
        time.sleep(max(0.0, due[i] - time.perf_counter()))
        messages = prompt_set[i % len(prompt_set)]
        return timed_request(backend, deployment, messages, settings["max_tokens"], due[i])

    with ThreadPoolExecutor(max_workers=len(due)) as pool:
        return list(pool.map(arrive, range(len(due))))


def _quantiles(prefix: str, values: list[float], scale: float = 1.0) -> dict[str, float]:
    """Median and p95, each with its bounds where the samples allow."""
    out: dict[str, float] = {}
    for q in (0.5, 0.95):
        figure = quantile(values, q, CONFIDENCE)
        name = f"{prefix}_p{round(q * 100)}"
        out[name] = round(figure.value * scale, 3)
        for side in ("lower", "upper"):
            if (bound := getattr(figure, side)) is not None:
                out[f"{name}_{side}"] = round(bound * scale, 3)
    return out


def summarise_closed(c: int, runs: list[list[dict]]) -> dict[str, float]:
    """The figures of one concurrency over its repeats (see the module docstring)."""
    requests = [r for run in runs for r in run]
    aggregate = [
        sum(r["tokens"] for r in run) / (max(r["ended"] for r in run) - min(r["sent"] for r in run))
        for run in runs
    ]
    p = f"load_c{c}"
    out = {
        f"{p}_agg_tps": round(median(aggregate), 2),
        f"{p}_agg_tps_min": round(min(aggregate), 2),
        f"{p}_agg_tps_max": round(max(aggregate), 2),
        f"{p}_requests": float(len(requests)),
    }
    decode = quantile([r["decode_tps"] for r in requests], 0.5, CONFIDENCE)
    out[f"{p}_decode_tps_p50"] = round(decode.value, 2)
    for side in ("lower", "upper"):
        if (bound := getattr(decode, side)) is not None:
            out[f"{p}_decode_tps_p50_{side}"] = round(bound, 2)
    out |= _quantiles(f"{p}_ttft_ms", [r["ttft_s"] for r in requests], 1000)
    out |= _quantiles(f"{p}_itl_ms", [g for r in requests for g in r["itl_s"]], 1000)
    return out


def summarise_open(rate: float, requests: list[dict]) -> dict[str, float]:
    p = f"load_r{rate:g}"
    span = max(r["ended"] for r in requests) - min(r["sent"] for r in requests)
    out = {f"{p}_agg_tps": round(sum(r["tokens"] for r in requests) / span, 2)}
    out |= _quantiles(f"{p}_ttft_ms", [r["ttft_s"] for r in requests], 1000)
    out |= _quantiles(f"{p}_e2e_s", [r["e2e_s"] for r in requests])
    return out


def batched_bench(
    gguf: Path, setting: dict[str, Any], levels: list[int], prompt_tokens: int, generated: int
) -> dict[str, float]:
    """llama-batched-bench at the same settings: aggregate prefill and generation tok/s per
    concurrency (its `speed_pp`, `speed_tg`)."""
    command = [
        str(toolchain.tool("llama-batched-bench")),
        "-m", str(gguf),
        "-c", str(setting["num_ctx"] * setting["slots"]),
        "-t", str(setting["threads"]),
        "-npp", str(prompt_tokens),
        "-ntg", str(generated),
        "-npl", ",".join(map(str, levels)),
        "--output-format", "jsonl",
    ]  # fmt: skip
    if setting.get("kv_cache"):
        command += ["-ctk", setting["kv_cache"], "-ctv", setting["kv_cache"]]
    if setting.get("flash_attn"):
        command += ["-fa", setting["flash_attn"]]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    out = {}
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            c = row["pl"]
            out[f"batched_c{c}_tg_tps"] = round(float(row["speed_tg"]), 2)
            out[f"batched_c{c}_pp_tps"] = round(float(row["speed_pp"]), 2)
            # generated tokens over prefill and decode: what a served aggregate also pays
            out[f"batched_c{c}_gen_tps"] = round(c * generated / (row["t_pp"] + row["t_tg"]), 2)
    return out


def resolved(settings: dict[str, Any]) -> dict[str, Any]:
    """The setting the server runs: the spec's own serving values (`ServeSpec.baseline`),
    with the cell's setting; threads, unless named, as llama-server takes them: every core."""
    setting = ServeSpec.model_validate(settings["serve"]).baseline() | settings.get("setting", {})
    return setting | {"threads": setting["threads"] or os.cpu_count() or 1}


def run(settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress, served) -> dict:
    load, setting = settings["load"], resolved(settings)
    served.deploy(alone=True)
    backend, deployment = served.backend, served.deployment
    levels = concurrencies(load["concurrency"], setting["slots"], load.get("users"))
    metrics: dict[str, float] = {}
    samples: list[dict] = []
    for c in levels:
        runs = []
        for repeat in range(load["repeats"]):
            progress(f"{c} concurrent, pass {repeat + 1}/{load['repeats']}", None)
            runs.append(closed_loop(backend, deployment, c, load, offset=repeat))
        metrics |= summarise_closed(c, runs)
        samples += [{"concurrency": c, **r} for run in runs for r in run]
    for rate in sorted({*load["rates"], *([load["rate"]] if load.get("rate") else [])}):
        progress(f"{rate:g} requests/s, {load['arrivals']} arrivals", None)
        requests = open_loop(backend, deployment, rate, load)
        metrics |= summarise_open(rate, requests)
        samples += [{"rate": rate, **r} for r in requests]
    memory = backend.memory_bytes(deployment)
    if memory is not None:
        metrics[f"load_{MEMORY_METRIC[backend.name]}"] = round(memory / 2**20, 1)
    (out / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    gguf = inputs["gguf"] / "model.gguf"
    kv = kv_cache_bytes(gguf, setting["num_ctx"] * setting["slots"], setting["kv_cache"] or "f16")
    metrics["load_ctx_tokens"] = float(setting["num_ctx"] * setting["slots"])
    if kv is not None:
        metrics["kv_cache_mb"] = round(kv / 2**20, 1)
    if settings.get("ollama_quantize"):
        return metrics  # the quantized file is Ollama's own: batched-bench has it not to read
    progress("llama-batched-bench engine reference", None)
    prompt_tokens = round(median(r["prompt_tokens"] for r in samples if r["prompt_tokens"]))
    metrics |= batched_bench(gguf, setting, levels, prompt_tokens, load["max_tokens"])
    for c in levels:
        if engine := metrics.get(f"batched_c{c}_gen_tps"):
            metrics[f"load_c{c}_vs_engine"] = round(metrics[f"load_c{c}_agg_tps"] / engine, 3)
    return metrics
