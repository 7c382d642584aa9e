"""Serving benchmarks on the quickstart's r16-qkvo adapter at q4_k_m, through llama-server.

1. Stream timing adds no bias: the client's clock and the server's over the same stretch
   of the same requests (first token to the end of the answer), in total and as tokens/s
   counted the server's way (target: within 5%), beside the stream figure forgebench
   reports ((tokens - 1) / that stretch: the first token is not decoded in it, though
   llama-server counts it) and llama-bench's engine figure for the same GGUF.
2. Concurrency pays: GSM8K items/s through lm-eval with 4 requests in flight (4 slots)
   against one at a time (target: >= 2x on 2 cores).
3. With --full: the whole 1,319-item GSM8K test set, 4 in flight (goal: <= 20 minutes
   on the 2-core development machine).

    python benchmarks/serving.py --gsm8k-items 40 [--full]   (after the quickstart has run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from harness import host, spec
from harness.backends import ServeConfig, get
from harness.data import evals
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.run import executor, outcomes
from harness.stages import bench, evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k-items", type=int, default=40)
    parser.add_argument("--full", action="store_true", help="also time all 1,319 GSM8K items")
    parser.add_argument("--store", type=Path, default=Path(".forgebench") / "store")
    args = parser.parse_args()

    quickstart = spec.load(ROOT / "experiments" / "quickstart.yaml")
    cell = next(c for c in planning.plan(quickstart) if c.name == "r16-qkvo-q4_k_m")
    store = Store(args.store)
    gguf = executor.ensure(cell.gguf, store, outcomes.Quiet()) / "model.gguf"
    tokenizer = AutoTokenizer.from_pretrained(store.path(cell.model) / "model")
    config = ServeConfig("bench", tokenizer.chat_template, parameters={"temperature": 0}, slots=4)
    console = Console()
    with get("llamacpp") as backend:
        deployment = backend.deploy(gguf, config)
        figures, samples = bench.measure(
            backend, deployment, {"warmup": 1, "repeats": 3, "max_tokens": 128}, lambda *a: None
        )
        engine = bench.llama_bench(gguf)
        rates, full = {}, None
        with tempfile.TemporaryDirectory() as tmp:
            tasks = evals.prepare(["gsm8k"], quickstart.data.model_dump(mode="json"), Path(tmp))

            def score(limit: int | None, concurrency: int) -> dict:
                out = Path(tmp) / f"{limit}-{concurrency}"
                out.mkdir()
                return evaluate.evaluate(
                    deployment.openai_base_url,
                    deployment.model_name,
                    tasks,
                    limit,
                    concurrency,
                    out,
                )

            for concurrency in (1, 4):
                rates[concurrency] = score(args.gsm8k_items, concurrency)["eval_items_per_s"]
            if args.full:
                started = time.perf_counter()
                full = score(None, 4)
                full["seconds"] = time.perf_counter() - started

    table = Table(title=f"serving, r16-qkvo q4_k_m via llama-server ({host.machine()})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("ratio", justify="right")
    stream, server = figures["stream_tps_p50"], figures["decode_tps_p50"]
    same_count = statistics.median(
        s["completion_tokens"] / s["stream_s"] for s in samples if s["stream_s"] > 0
    )
    clocks = sum(s["stream_s"] for s in samples) / sum(s["decode_s"] for s in samples)
    table.add_row(
        f"first token to end, client / server clock ({len(samples)} requests)",
        "",
        f"{clocks:.3f}",
    )
    table.add_row("decode tok/s, server timings (p50)", f"{server:.1f}", "1.000")
    table.add_row(
        "decode tok/s, client stream, server's count (p50)",
        f"{same_count:.1f}",
        f"{same_count / server:.3f}",
    )
    table.add_row(
        "decode tok/s, client stream as reported (p50)", f"{stream:.1f}", f"{stream / server:.3f}"
    )
    table.add_row(
        "llama-bench tg tok/s (engine)",
        f"{engine['llama_bench_tg_tps']:.1f}",
        f"{engine['llama_bench_tg_tps'] / server:.3f}",
    )
    table.add_row(
        f"GSM8K items/s, 1 request ({args.gsm8k_items} items)", f"{rates[1]:.3f}", "1.00x"
    )
    table.add_row(
        f"GSM8K items/s, 4 concurrent ({args.gsm8k_items} items)",
        f"{rates[4]:.3f}",
        f"{rates[4] / rates[1]:.2f}x",
    )
    if full is not None:
        table.add_row(
            "GSM8K, all 1,319 items, 4 concurrent: minutes",
            f"{full['seconds'] / 60:.1f}",
            f"{full['seconds'] / 60 / 20:.2f} of 20",
        )
        table.add_row(
            "GSM8K accuracy (flexible-extract), all items",
            f"{full['accuracy_gsm8k']:.3f}",
            "",
        )
    console.print(table)


if __name__ == "__main__":
    main()
