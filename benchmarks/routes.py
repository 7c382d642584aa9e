"""The merge route against the adapter route, for N adapters x 3 levels on SmolLM2.

For N = 2 and N = 4, one spec with `route: [merge, adapter]` runs from an empty store (the
N = 4 spec adds two adapters to the N = 2 one, in the same store, so the first two are
not built twice; build times come from the store's manifests, which keep the seconds of
the run that built each file). Per route:

- build: the seconds and the bytes on disk of what only that route needs (merge, convert,
  quantize of the merged models; or convert_lora and the base's convert and quantize);
  training is the same for both;
- serving: per cell, the server's peak memory and decode tok/s (the bench stage), and the
  accuracy on the same items;
- one server for all N: the base at Q4_K_M with all N LoRA GGUFs loaded (`--lora` each,
  `--lora-init-without-apply`), its load time and memory, against N servers of the
  merged Q4_K_M models (the serial executor serves a level's adapter cells this way:
  harness/run/deployment.py);
- request order on that server, at the evaluation's concurrency: requests per second
  when every request in flight picks the same adapter (the chain's order) against
  interleaved adapters, which llama-server does not batch together.

    python benchmarks/routes.py [--sizes 2 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from harness import host, pipeline, spec
from harness.backends import ServeConfig
from harness.backends.llamacpp import LlamaServer
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.run import outcomes

LORAS = [
    "{name: a, r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
    "{name: b, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
    "{name: c, r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}",
    "{name: d, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}",
]
SPEC = """\
name: routes-n{n}
base: {{model: smollm2-135m}}
data: {{task: arithmetic, n_train: 96, n_eval: 40, seed: 5}}
train: {{epochs: 1, lr: 5.0e-4, batch_size: 8, max_seq_len: 96, seed: 0}}
lora:
{loras}
quant: [f16, q8_0, q4_k_m]
route: [merge, adapter]
control: false
measure: [check, evaluate, bench]
serve: {{backend: llamacpp, slots: 2}}
evaluate: {{tasks: [arithmetic], concurrency: 2}}
bench: {{warmup: 1, repeats: 1, max_tokens: 32}}
"""
ROUTE_STAGES = {
    "merge": ("merge", "convert", "quantize"),
    "adapter": ("convert_lora", "convert", "quantize"),
}


def run(n: int, folder: Path, store: Store) -> tuple[spec.Spec, outcomes.RunSummary, float]:
    path = folder / f"routes-n{n}.yaml"
    loras = "\n".join(f"  - {lora}" for lora in LORAS[:n])
    path.write_text(SPEC.format(n=n, loras=loras))
    loaded = spec.load(path)
    started = time.perf_counter()
    summary = pipeline.run(loaded, path, store, outcomes.Quiet())
    return loaded, summary, time.perf_counter() - started


def built(cells: list[planning.Cell], store: Store, route: str) -> tuple[float, int]:
    """Seconds and bytes of the unique calls only this route's cells need."""
    mine = [c for c in cells if c.route == route]
    calls = {
        call.key: call
        for c in mine
        for role, call in c.calls.items()
        if role in ROUTE_STAGES[route]
    }
    seconds = sum(store.manifest(call)["seconds"] for call in calls.values())
    size = sum(
        p.stat().st_size
        for call in calls.values()
        for p in store.path(call).rglob("*")
        if p.is_file()
    )
    return seconds, size


def serve(model: Path, template: str, loras: list[Path] = ()) -> tuple[float, float]:
    """Load seconds and peak RSS (MB) of one llama-server for `model`, deployed as the chain
    deploys it, with every LoRA in `loras` loaded (applied only to a request that picks
    it), after one request per adapter."""
    config = ServeConfig("forgebench-bench/serve", template, slots=2, adapters=tuple(loras))
    with LlamaServer() as backend:
        deployment = backend.deploy(model, config)
        for i in range(max(len(loras), 1)):
            picked = _picking(deployment, i) if loras else deployment
            list(backend.chat(picked, [{"role": "user", "content": "What is 12 + 7?"}], 8))
        return deployment.load_seconds, backend.memory_bytes(deployment) / 2**20


def batching(
    model: Path, template: str, loras: list[Path], concurrency: int, requests: int = 24
) -> dict[str, float]:
    """Requests per second on one server with every LoRA loaded, `concurrency` in flight:
    grouped (every request in flight picks the same adapter: how the chain sends them, one
    cell's evaluation at a time) against interleaved (consecutive requests pick the next
    adapter; llama-server does not batch requests with different adapters together)."""
    config = ServeConfig(
        "forgebench-bench/batching", template, slots=concurrency, adapters=tuple(loras)
    )
    prompts = [f"What is {7 * i + 3} + {5 * i + 11}? Answer with the number." for i in range(8)]
    rates = {}
    with LlamaServer() as backend:
        deployment = backend.deploy(model, config)
        orders = {
            "grouped": [i * len(loras) // requests for i in range(requests)],
            "interleaved": [i % len(loras) for i in range(requests)],
        }
        for name, order in (("warm-up", orders["grouped"][:concurrency]), *orders.items()):
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                for answer in pool.map(
                    lambda job: list(
                        backend.chat(
                            _picking(deployment, job[1]),
                            [{"role": "user", "content": prompts[job[0] % len(prompts)]}],
                            32,
                        )
                    ),
                    enumerate(order),
                ):
                    assert answer and answer[-1].done
            rates[name] = len(order) / (time.perf_counter() - started)
    del rates["warm-up"]
    return rates


def _picking(deployment, adapter: int):
    """The deployment with every request applying adapter number `adapter` at scale 1."""
    return replace(deployment, request_fields={"lora": [{"id": adapter, "scale": 1.0}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    console = Console()
    folder = Path(tempfile.mkdtemp(prefix="forgebench-routes-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    store = Store(folder / "store")
    console.print(f"routes benchmark, SmolLM2-135M ({host.machine()}), in {folder}")
    summary_table = Table(title="merge route / adapter route, N adapters x 3 levels")
    for column in (
        "N",
        "route",
        "build s",
        "disk MB",
        "one server for N: load s",
        "memory MB",
        "accuracy (mean)",
        "decode tok/s (mean)",
    ):
        summary_table.add_column(column, justify="right")
    batching_table = Table(title="one Q4_K_M server with N LoRAs: requests/s by request order")
    for column in ("N", "in flight", "grouped by adapter", "interleaved", "interleaved/grouped"):
        batching_table.add_column(column, justify="right")
    cells_table = Table(title="per cell")
    for column in ("N", "cell", "verdict", "accuracy", "decode tok/s", "memory MB", "files MB"):
        cells_table.add_column(column, justify="right")
    for n in args.sizes:
        loaded, summary, wall = run(n, folder, store)
        cells = planning.plan(loaded)
        by_name = {c.name: c for c in cells}
        console.print(f"N={n}: {len(cells)} cells in {wall:.0f} s, executed {summary.executed}")
        q4 = [c for c in cells if c.quant == "q4_k_m"]
        merged = [store.path(c.gguf) / "model.gguf" for c in q4 if c.route == "merge"]
        loras = [store.path(c.lora_gguf) / "adapter.gguf" for c in q4 if c.route == "adapter"]
        first = next(c for c in q4 if c.route == "adapter")
        base = store.path(first.gguf) / "model.gguf"
        template = AutoTokenizer.from_pretrained(store.path(first.model) / "model").chat_template
        servers = {
            "merge": [serve(m, template) for m in merged],
            "adapter": [serve(base, template, loras)],
        }
        rates = batching(base, template, loras, loaded.evaluate.concurrency)
        batching_table.add_row(
            str(n),
            str(loaded.evaluate.concurrency),
            f"{rates['grouped']:.2f}",
            f"{rates['interleaved']:.2f}",
            f"{rates['interleaved'] / rates['grouped']:.2f}",
        )
        for route in ("merge", "adapter"):
            seconds, size = built(cells, store, route)
            mine = [r for r in summary.cells if by_name[r.cell].route == route]
            acc = [
                r.stages["evaluate"].metrics.get("accuracy_arithmetic")
                for r in mine
                if "evaluate" in r.stages
            ]
            tps = [
                r.stages["bench"].metrics.get("decode_tps_p50") for r in mine if "bench" in r.stages
            ]
            load = sum(s[0] for s in servers[route])
            memory = sum(s[1] for s in servers[route])
            summary_table.add_row(
                str(n),
                route,
                f"{seconds:.0f}",
                f"{size / 2**20:.0f}",
                f"{load:.2f} ({len(servers[route])} server{'s' * (len(servers[route]) > 1)})",
                f"{memory:.0f}",
                _mean(acc, ".3f"),
                _mean(tps, ".0f"),
            )
            for r in mine:
                bench = r.stages.get("bench")
                cells_table.add_row(
                    str(n),
                    r.cell,
                    summary.verdicts[r.cell].verdict if r.cell in summary.verdicts else "-",
                    _fmt(r.stages.get("evaluate"), "accuracy_arithmetic", ".3f"),
                    _fmt(bench, "decode_tps_p50", ".0f"),
                    _fmt(bench, "memory_mb", ".0f"),
                    f"{(r.gguf_bytes or 0) / 2**20:.1f}",
                )
    console.print(summary_table)
    console.print(batching_table)
    console.print(cells_table)
    shutil.rmtree(folder, ignore_errors=True)  # 5 GB of models for N = 4


def _mean(values: list[float | None], fmt: str) -> str:
    got = [v for v in values if v is not None]
    return format(sum(got) / len(got), fmt) if got else "-"


def _fmt(outcome, name: str, fmt: str) -> str:
    value = outcome.metrics.get(name) if outcome is not None and not outcome.error else None
    return "-" if value is None else format(value, fmt)


if __name__ == "__main__":
    main()
