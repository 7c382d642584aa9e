"""The comparison report: a self-contained HTML page and a Markdown file, from MLflow alone.

Written to `reports/<experiment>/`: `index.html` (plots embedded as PNG data,
no network needed to view it), `report.md` with the PNGs beside it. It opens with the
decision, one line per adapter (the level to ship and why, or that none is), then the
cells, then where the quality went along each chain; each cell's reasons appear once.
"""

from __future__ import annotations

import base64
import html
import platform
from pathlib import Path

from harness import track
from harness.chain import CONTROL
from harness.judge.best import Choice, choose
from harness.report import recipes, routes, serving
from harness.report.comparison import Comparison
from harness.report.plots import blamed, chain, chain_name, chain_tasks, plots
from harness.track import Invocation, RunView, primary_task, schema

COLUMNS = (
    ("cell", "cell"),
    ("verdict", "verdict"),
    ("accuracy", "accuracy (95% CI)"),
    ("kld_mean", "KLD"),
    ("top1_agreement", "top-1"),
    ("ttft_ms_p50", "TTFT p50 ms"),
    ("decode_tps_p5", "decode tok/s p5"),
    ("decode_tps_p50", "decode tok/s p50"),
    ("llama_bench_tg_tps", "llama-bench tg tok/s"),
    ("memory_mb", "memory MB"),
    ("gguf_mb", "size MB"),
)


def cell_values(row: RunView, task: str | None) -> dict[str, str]:
    m = row.metrics
    acc = row.accuracy(task)
    lo, hi = m.get(f"accuracy_{task}_ci_low"), m.get(f"accuracy_{task}_ci_high")
    accuracy = (
        "-"
        if acc is None
        else f"{acc:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")
    )

    def num(key: str, fmt: str) -> str:
        return "-" if m.get(key) is None else format(m[key], fmt)

    return {
        "cell": row.cell,
        "verdict": row.verdict or row.status,
        "accuracy": accuracy,
        "kld_mean": num("kld_mean", ".4f"),
        "top1_agreement": num("top1_agreement", ".3f"),
        "ttft_ms_p50": num("ttft_ms_p50", ".0f"),
        "decode_tps_p5": num("decode_tps_p5", ".1f"),
        "decode_tps_p50": num("decode_tps_p50", ".1f"),
        "llama_bench_tg_tps": num("llama_bench_tg_tps", ".1f"),
        "memory_mb": num("memory_mb", ".0f"),
        "gguf_mb": num("gguf_mb", ".1f"),
    }


def lineage(rows: list[RunView]) -> list[tuple[str, str]]:
    first = next((r for r in rows if r.adapter != CONTROL), rows[0] if rows else None)
    if first is None:
        return []
    p, t = first.params, first.tags
    items = [
        ("base model", ", ".join(f"{k[5:]}={v}" for k, v in p.items() if k.startswith("base."))),
        ("base lineage", t.get(f"{schema.LINEAGE}.note", "")),
        ("data", ", ".join(f"{k[5:]}={v}" for k, v in p.items() if k.startswith("data."))),
        ("llama.cpp", t.get(schema.LLAMA_CPP, "")),
        ("backend", t.get(schema.BACKEND, "")),
        ("machine", t.get(schema.MACHINE, platform.node())),
    ]
    for row in rows:
        if row.adapter != CONTROL and f"LoRA {row.adapter}" not in dict(items):
            items.append(
                (
                    f"LoRA {row.adapter}",
                    ", ".join(
                        f"{k[5:]}={v}"
                        for k, v in row.params.items()
                        if k.startswith("lora.") and k != "lora.name"
                    ),
                )
            )
    for row in rows:
        if sha := row.tags.get(f"{schema.LINEAGE}.lora_gguf_sha256"):
            items.append((f"{row.cell} served", f"GGUF sha256 {served(row)}, LoRA GGUF {sha}"))
    return [(k, v) for k, v in items if v]


def served(row: RunView) -> str:
    return row.tags.get(f"{schema.LINEAGE}.gguf_sha256", "-")


def decision(choice: Choice, rows: list[RunView]) -> str:
    """One line: the level to ship and why, or each level's verdict when none ships."""
    if choice.row is not None:
        return f"ship {choice.why}"
    mine = [r for r in rows if r.adapter == choice.adapter]
    verdicts = "; ".join(f"{r.cell} {r.verdict or r.status}" for r in mine)
    return f"ship nothing: no level was shown ok ({verdicts})"


def slow_or_stupid(rows: list[RunView]) -> list[str]:
    return [
        f"{r.cell}: {r.verdict} ({r.reasons})"
        for r in rows
        if r.verdict not in ("ok", "") and r.reasons
    ]


def quality_chain(rows: list[RunView]) -> list[tuple[str, list[str]]]:
    """Per adapter whose cells logged the chain: its chart's file name and one line per task,
    the blamed step marked on the task the chart marks."""
    tasks = chain_tasks(rows, primary_task(rows))
    out = []
    for adapter in dict.fromkeys(r.line for r in rows):
        points = chain(rows, adapter, tasks)
        if not points:
            continue
        marks = {i: t for i, _, t in blamed(points, tasks)}
        lines = []
        for t in tasks:
            steps = []
            for i, p in enumerate(points):
                acc = p.accuracy.get(t)
                mark = f" ✗ {p.step} lost" if marks.get(i) == t else ""
                steps.append(f"{p.label} {'-' if acc is None else f'{acc:.3f}'}{mark}")
            guard = "" if t == tasks[0] else "guard "
            lines.append(f"{adapter}, {guard}{t}: " + " → ".join(steps))
        out.append((chain_name(adapter), lines))
    return out


def markdown(
    inv: Invocation,
    choices: list[Choice],
    images: list[str],
    comparisons: list[Comparison] = (),
) -> str:
    task = primary_task(inv.rows)
    lines = [
        f"# forgebench report: {inv.experiment}",
        "",
        f"MLflow run `{inv.run_id}`; accuracy is `{task}`."
        if task
        else f"MLflow run `{inv.run_id}`.",
        "",
        "## Decision",
        "",
        *(f"- **{c.adapter}**: {decision(c, inv.rows)}" for c in choices),
        "",
        "## Cells",
        "",
    ]
    lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in inv.rows:
        values = cell_values(row, task)
        lines.append("| " + " | ".join(values[key] for key, _ in COLUMNS) + " |")
    for side in comparisons:
        lines += ["", f"## {side.title}", "", side.note, ""]
        lines.append("| " + " | ".join(title for _, title in side.columns) + " |")
        lines.append("|" + "---|" * len(side.columns))
        for values in side.rows:
            lines.append("| " + " | ".join(values[key] for key, _ in side.columns) + " |")
    chains = quality_chain(inv.rows)
    if chains:
        lines += ["", "## Where the quality went"]
        for name, text in chains:
            lines += ["", *(f"- {line}" for line in text), "", f"![{name}]({name})"]
    lines += ["", "## Why not ok", ""]
    lines += [f"- {line}" for line in slow_or_stupid(inv.rows)] or ["- none"]
    lines += ["", "## Lineage", ""] + [f"- {k}: {v}" for k, v in lineage(inv.rows)]
    shown = {name for name, _ in chains}
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images if name not in shown]
    return "\n".join(lines) + "\n"


def page(
    inv: Invocation,
    choices: list[Choice],
    images: dict[str, bytes],
    comparisons: list[Comparison] = (),
) -> str:
    task = primary_task(inv.rows)
    esc = html.escape
    accuracy_note = f"; accuracy is <code>{esc(task)}</code>" if task else ""
    head = "".join(f"<th>{esc(title)}</th>" for _, title in COLUMNS)
    body = ""
    for row in inv.rows:
        values = cell_values(row, task)
        cls = esc(values["verdict"].split(" (")[0].replace("+", "-"))
        body += (
            f'<tr class="{cls}">'
            + "".join(f"<td>{esc(values[key])}</td>" for key, _ in COLUMNS)
            + "</tr>\n"
        )
    compared = ""
    for side in comparisons:
        rows = "".join(
            "<tr>" + "".join(f"<td>{esc(values[k])}</td>" for k, _ in side.columns) + "</tr>"
            for values in side.rows
        )
        titles = "".join(f"<th>{esc(t)}</th>" for _, t in side.columns)
        compared += (
            f"<h2>{esc(side.title)}</h2><p>{esc(side.note)}</p>"
            f'<table id="{side.key}"><tr>{titles}</tr>{rows}</table>'
        )
    best = "".join(
        f"<li><b>{esc(c.adapter)}</b>: {esc(decision(c, inv.rows))}</li>" for c in choices
    )
    flagged = "".join(f"<li>{esc(s)}</li>" for s in slow_or_stupid(inv.rows)) or "<li>none</li>"
    lin = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in lineage(inv.rows))

    def figure(name: str) -> str:
        return (
            f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
            f'{base64.b64encode(images[name]).decode()}"><figcaption>{esc(name)}</figcaption>'
            "</figure>"
        )

    chains = [(name, text) for name, text in quality_chain(inv.rows) if name in images]
    where = "".join(
        f'<div class="chain">{"".join(f"<p>{esc(line)}</p>" for line in text)}{figure(name)}</div>'
        for name, text in chains
    )
    where = f'<h2>Where the quality went</h2><div id="chain">{where}</div>' if where else ""
    shown = {name for name, _ in chains}
    figs = "".join(figure(name) for name in images if name not in shown)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>forgebench: {esc(inv.experiment)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
tr.slow td {{ background: #fff4d6; }} tr.stupid td {{ background: #fde2e1; }}
tr.slow-stupid td {{ background: #f9d0c4; }} tr.broken td, tr.failed td {{ background: #eee; }}
tr.unjudged td {{ background: #eef0ff; }}
#cells td:nth-child(-n+2) {{ white-space: nowrap; }} .chain p {{ margin: 0.2em 0; font-size: 90%; }}
figure {{ display: inline-block; margin: 1em; }} img {{ max-width: 640px; }}
</style></head><body>
<h1>forgebench report: {esc(inv.experiment)}</h1>
<p>MLflow run <code>{esc(inv.run_id)}</code>{accuracy_note}.</p>
<h2>Decision</h2><ul id="best">{best}</ul>
<h2>Cells</h2><table id="cells"><tr>{head}</tr>
{body}</table>
{compared}
{where}
<h2>Why not ok</h2><ul>{flagged}</ul>
<h2>Lineage</h2><ul>{lin}</ul>
<h2>Plots</h2>{figs}
</body></html>
"""


def write(inv: Invocation, out_dir: Path, by: str = "size") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    choices = choose(inv.rows, by)
    images = plots(inv.rows, primary_task(inv.rows))
    for name, png in images.items():
        (out_dir / name).write_bytes(png)

    def items(row: RunView) -> dict[str, dict[str, bool]]:
        return track.samples(inv.tracking_uri, row.run_id)

    sides = [routes.section(inv, items), recipes.section(inv, items), serving.section(inv, items)]
    comparisons = [side for side in sides if side.rows]
    md = out_dir / "report.md"
    md.write_text(markdown(inv, choices, list(images), comparisons))
    index = out_dir / "index.html"
    index.write_text(page(inv, choices, images, comparisons))
    return index, md
