"""Repeatable verdicts: the quickstart measured twice gives the same verdicts and the same
answers, item by item.

Batched scoring is not bit-repeatable (llama-server's K-quant kernels sum in another
order depending on what shares the batch), so forgebench scores one request at a time
with the prompt cache off (`evaluate.concurrency: 1`, `serve.slots: 1`, the defaults).
This script shows that it is enough: it runs the spec into two stores and diffs the
verdicts, the replies and their correctness, item by item (the flip rate).

By default the second store is seeded with the first one's builds (train, merge,
convert, quantize and the PyTorch reference: deterministic, the adapters bit-identical
across runs by their manifests' sha256), so every *measurement* runs twice; `--clean`
trains again too (twice the time). `--store` names the first run's store: a store the
quickstart already ran into makes the first run a cached replay of that run.

    python benchmarks/repeatable.py [--clean] [--store .forgebench/store] [--spec ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from rich.console import Console
from rich.table import Table

from harness import host, pipeline, spec
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.run import outcomes

ROOT = Path(__file__).resolve().parents[1]
BUILT = ("resolve", "train", "merge", "convert", "quantize", "reference")


def run_once(loaded: spec.Spec, path: Path, store: Store, db: Path) -> outcomes.RunSummary:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    return pipeline.run(loaded, path, store, outcomes.Quiet())


def seed(source: Store, target: Store, cells: list[planning.Cell]) -> None:
    """Copy the deterministic builds of `source` into `target`, so only measurements rerun."""
    for call in planning.unique_calls(cells).values():
        if call.stage in BUILT and source.has(call):
            shutil.copytree(source.path(call), target.path(call), dirs_exist_ok=True)


def rows(store: Store, cell: planning.Cell, stage: str) -> dict[str, dict]:
    out = {}
    for path in sorted(store.path(cell.calls[stage]).glob("samples_*.jsonl")):
        task = path.stem.removeprefix("samples_")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[f"{task}/{row['doc_id']}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "experiments" / "quickstart.yaml")
    parser.add_argument("--clean", action="store_true", help="train again for the second run")
    parser.add_argument("--store", type=Path, help="the first run's store (default: a new one)")
    args = parser.parse_args()
    loaded = spec.load(args.spec)
    cells = planning.plan(loaded)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="forgebench-repeat-") as tmp:
        stores = [Store(args.store or Path(tmp) / "store1"), Store(Path(tmp) / "store2")]
        summaries, seconds = [], []
        for i, store in enumerate(stores):
            if i == 1 and not args.clean:
                seed(stores[0], store, cells)
            started = time.perf_counter()
            summaries.append(run_once(loaded, args.spec, store, Path(tmp) / f"mlflow{i}.db"))
            seconds.append(time.perf_counter() - started)
        table = Table(title=f"{loaded.name} measured twice ({host.machine()})")
        for column in ("cell", "run 1", "run 2", "replies differ", "right/wrong flips"):
            table.add_column(column)
        same, same_quality, replies_total, flips_total, items_total = 0, 0, 0, 0, 0
        for cell in cells:
            first, second = (s.verdicts.get(cell.name) for s in summaries)
            verdicts = [v.verdict if v else "-" for v in (first, second)]
            same += verdicts[0] == verdicts[1]
            # "slow" is a speed figure of this machine at this moment; the rest is accuracy
            quality = {v.removeprefix("slow+").removeprefix("slow") for v in verdicts}
            same_quality += len(quality) == 1
            replies = flips = 0
            if "evaluate" in cell.calls and all(s.has(cell.calls["evaluate"]) for s in stores):
                a, b = (rows(s, cell, "evaluate") for s in stores)
                shared = a.keys() & b.keys()
                replies = sum(a[k]["response"] != b[k]["response"] for k in shared)
                flips = sum(a[k]["correct"] != b[k]["correct"] for k in shared)
                items_total += len(shared)
            replies_total, flips_total = replies_total + replies, flips_total + flips
            table.add_row(cell.name, *verdicts, str(replies), str(flips))
        console.print(table)
        console.print(
            f"identical verdicts: {same} of {len(cells)} cells ({same_quality} ignoring slow); "
            f"replies that differ: {replies_total} of {items_total}; right/wrong flips: "
            f"{flips_total}; runs took {seconds[0]:.0f} s and {seconds[1]:.0f} s"
        )
        raise SystemExit(0 if same == len(cells) else 1)


if __name__ == "__main__":
    main()
