"""Quantization recipes against the plain levels, on SmolLM2 and on Gemma 3 270M.

Runs `experiments/recipes.yaml` (q4_k_m, q3_k_m and q2_k, each plain, with an imatrix from
the training data and with one from a general text) as it is for SmolLM2, and with Gemma
3 270M's base and the spec template of `experiments/gemma3-270m.yaml` for Gemma, each in
one run through the real chain (a store that holds a run already builds nothing), then
prints per model and cell: mean KLD and top-1 agreement against the F16 on the drift text
and on the task's held-out items,
accuracy with its 95% interval, the recipe's paired drop from its plain level with its
95% interval (negative: the recipe answered more items right), the file size and the verdict.

    python benchmarks/quant_recipes.py [--models smollm2-135m gemma3-270m] [--store DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from rich.console import Console
from rich.table import Table

from harness import host, pipeline, spec, track
from harness.plan.store import Store
from harness.report import recipes
from harness.run import outcomes
from harness.track import results

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "recipes.yaml"
GEMMA = {
    "name: recipes\n": "name: recipes-gemma3\n",
    "base: {model: smollm2-135m}": "base: {model: gemma3-270m}",
    "control: false\n": "control: false\n"
    f"serve: {{chat_template: {ROOT / 'experiments' / 'gemma3-base.jinja'}}}\n",
    # Gemma's settings in experiments/gemma3-270m.yaml: a base model learns the format fast
    "train: {epochs: 2, lr: 2.0e-4, batch_size: 8, grad_accum: 1, max_seq_len: 256, seed: 0}": (
        "train: {epochs: 1, lr: 1.0e-3, batch_size: 8, max_seq_len: 96, seed: 0}"
    ),
}


def spec_for(model: str, folder: Path) -> Path:
    text = SPEC.read_text()
    if model == "gemma3-270m":
        for old, new in GEMMA.items():
            assert old in text, old
            text = text.replace(old, new)
    text += f'tracking: {{uri: "sqlite:///{folder / "mlflow.db"}"}}\n'
    path = folder / f"recipes-{model}.yaml"
    path.write_text(text)
    return path


def num(metrics: dict[str, float], key: str, fmt: str) -> str:
    return "-" if metrics.get(key) is None else format(metrics[key], fmt)


def table(model: str, path: Path) -> Table:
    loaded = spec.load(path)
    inv = results.load(loaded.tracking.uri, loaded.name)
    side = recipes.section(inv, lambda row: track.samples(inv.tracking_uri, row.run_id))
    paired = {row["pair"].split(" ", 1)[1]: row["paired"] for row in side.rows}
    out = Table(title=f"{model}: recipes against plain levels ({host.machine()})")
    columns = ("cell", "KLD", "top-1", "KLD task", "top-1 task", "accuracy [95%]")
    columns += ("drop vs plain [95%]", "MB", "verdict")
    for column in columns:
        out.add_column(column)
    task = "arithmetic"
    for row in inv.rows:
        m = row.metrics
        acc = row.accuracy(task)
        lo, hi = m.get(f"accuracy_{task}_ci_low"), m.get(f"accuracy_{task}_ci_high")
        shown = "-" if acc is None else f"{acc:.3f} [{lo:.2f}, {hi:.2f}]"

        out.add_row(
            row.quant,
            num(m, "kld_mean", ".4f"),
            num(m, "top1_agreement", ".3f"),
            num(m, "kld_mean_task", ".4f"),
            num(m, "top1_agreement_task", ".3f"),
            shown,
            paired.get(row.quant, ""),
            "-" if row.size_mb is None else f"{row.size_mb:.1f}",
            row.verdict or row.status,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--store", type=Path, default=Path(".forgebench") / "store")
    parser.add_argument("--folder", type=Path, default=Path("reports") / "quant-recipes")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    console = Console(width=160)
    for model in args.models:
        path = spec_for(model, args.folder.resolve())
        console.print(f"{model}: running {path} ...")
        summary = pipeline.run(spec.load(path), path, Store(args.store), outcomes.Quiet())
        console.print(f"built: {summary.executed or 'nothing (all in the store)'}")
        console.print(table(model, path))


if __name__ == "__main__":
    main()
