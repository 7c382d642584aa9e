"""The comparison report: a self-contained HTML page and a Markdown file, from MLflow alone.

Written to `reports/<experiment>/`: `index.html` (plots embedded as PNG data,
no network needed to view it), `report.md` with the PNGs beside it.
"""

from __future__ import annotations

import base64
import html
import io
import platform
from pathlib import Path

from harness.best import Choice, choose, pareto_front
from harness.results import Invocation, Row, primary_task

COLUMNS = (
    ("cell", "cell"),
    ("verdict", "verdict"),
    ("accuracy", "accuracy (95% CI)"),
    ("kld_mean", "KLD"),
    ("top1_agreement", "top-1"),
    ("ttft_ms_p50", "TTFT p50 ms"),
    ("decode_tps_p50", "decode tok/s"),
    ("llama_bench_tg_tps", "llama-bench tg tok/s"),
    ("memory_mb", "memory MB"),
    ("gguf_mb", "size MB"),
)


def cell_values(row: Row, task: str | None) -> dict[str, str]:
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
        "decode_tps_p50": num("decode_tps_p50", ".1f"),
        "llama_bench_tg_tps": num("llama_bench_tg_tps", ".1f"),
        "memory_mb": num("memory_mb", ".0f"),
        "gguf_mb": num("gguf_mb", ".1f"),
    }


def plots(rows: list[Row], task: str | None) -> dict[str, bytes]:
    """Each plot as PNG bytes, keyed by file name; a plot with no data is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    adapters = list(dict.fromkeys(r.adapter for r in rows))

    def save(name: str, fig) -> None:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        out[name] = buffer.getvalue()

    def points(adapter: str, x: str, y: str):
        mine = [r for r in rows if r.adapter == adapter and r.status == "done"]
        return [
            (
                getattr(r, x) if x != "accuracy" else r.accuracy(task),
                r.accuracy(task) if y == "accuracy" else getattr(r, y),
                r.quant,
            )
            for r in mine
        ]

    if task and any(r.accuracy(task) is not None for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for adapter in adapters:
            pts = [
                (x, y, q)
                for x, y, q in points(adapter, "size_mb", "accuracy")
                if None not in (x, y)
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=adapter)
                for x, y, q in pts:
                    ax.annotate(q, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="GGUF size (MB)", ylabel=f"{task} accuracy", title="Accuracy vs file size")
        ax.legend()
        save("accuracy_vs_size.png", fig)

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for adapter in adapters:
            mine = [r for r in rows if r.adapter == adapter]
            front = {r.cell for r in pareto_front(mine, task)}
            pts = [
                (r.decode_tps, r.accuracy(task), r.cell in front)
                for r in mine
                if r.decode_tps is not None and r.accuracy(task) is not None
            ]
            if pts:
                line = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=adapter)
                best = sorted((p for p in pts if p[2]), key=lambda p: p[0])
                ax.plot(
                    [p[0] for p in best], [p[1] for p in best], "--", color=line.get_facecolor()[0]
                )
        ax.set(
            xlabel="decode tok/s (p50)",
            ylabel=f"{task} accuracy",
            title="Pareto front: accuracy vs decode speed (dashed)",
        )
        ax.legend()
        save("pareto.png", fig)

        base = {r.quant: r.accuracy(task) for r in rows if r.adapter == "base"}
        tuned = [a for a in adapters if a != "base"]
        levels = [q for q in dict.fromkeys(r.quant for r in rows)]
        if base and tuned:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            width = 0.8 / (len(tuned) + 1)
            for i, adapter in enumerate(["base", *tuned]):
                acc = {r.quant: r.accuracy(task) for r in rows if r.adapter == adapter}
                ax.bar(
                    [j + i * width for j in range(len(levels))],
                    [acc.get(q) or 0 for q in levels],
                    width,
                    label=adapter,
                )
            ax.set_xticks([j + width * len(tuned) / 2 for j in range(len(levels))], levels)
            ax.set(ylabel=f"{task} accuracy", title="Tuned vs untuned base per quant level")
            ax.legend()
            save("tuned_vs_base.png", fig)

    if any(r.decode_tps for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        levels = list(dict.fromkeys(r.quant for r in rows))
        width = 0.8 / max(1, len(adapters))
        for i, adapter in enumerate(adapters):
            tps = {r.quant: r.decode_tps for r in rows if r.adapter == adapter}
            ax.bar(
                [j + i * width for j in range(len(levels))],
                [tps.get(q) or 0 for q in levels],
                width,
                label=adapter,
            )
        engine = {r.quant: r.metrics.get("llama_bench_tg_tps") for r in rows}
        ax.plot(
            [j + 0.4 - width / 2 for j in range(len(levels))],
            [engine.get(q) or 0 for q in levels],
            "k_",
            markersize=20,
            label="llama-bench tg",
        )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], levels)
        ax.set(ylabel="decode tok/s (p50)", title="Decode speed per quant level")
        ax.legend()
        save("decode_tps.png", fig)

    curves = {r.adapter: r.loss for r in rows if r.loss}
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for adapter, loss in curves.items():
            ax.plot([s for s, _ in loss], [v for _, v in loss], label=adapter)
        ax.set(xlabel="step", ylabel="training loss", title="Training loss")
        ax.legend()
        save("training_loss.png", fig)
    return out


def lineage(rows: list[Row]) -> list[tuple[str, str]]:
    first = next((r for r in rows if r.adapter != "base"), rows[0] if rows else None)
    if first is None:
        return []
    p, t = first.params, first.tags
    items = [
        ("base model", ", ".join(f"{k[5:]}={v}" for k, v in p.items() if k.startswith("base."))),
        ("base lineage", t.get("forgebench.lineage.note", "")),
        ("data", ", ".join(f"{k[5:]}={v}" for k, v in p.items() if k.startswith("data."))),
        ("llama.cpp", t.get("forgebench.llama_cpp", "")),
        ("backend", t.get("forgebench.backend", "")),
        ("machine", t.get("forgebench.machine", platform.node())),
    ]
    for row in rows:
        if row.quant == rows[0].quant and row.adapter != "base":
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
    return [(k, v) for k, v in items if v]


def slow_or_stupid(rows: list[Row]) -> list[str]:
    return [
        f"{r.cell}: {r.verdict} ({r.reasons})"
        for r in rows
        if r.verdict not in ("ok", "") and r.reasons
    ]


def markdown(inv: Invocation, choices: list[Choice], images: list[str]) -> str:
    task = primary_task(inv.rows)
    lines = [
        f"# forgebench report: {inv.experiment}",
        "",
        f"MLflow run `{inv.run_id}`; accuracy is `{task}`."
        if task
        else f"MLflow run `{inv.run_id}`.",
        "",
        "## Cells",
        "",
    ]
    lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in inv.rows:
        values = cell_values(row, task)
        lines.append("| " + " | ".join(values[key] for key, _ in COLUMNS) + " |")
    lines += ["", "## Best quant level per adapter", ""]
    lines += [f"- **{c.adapter}**: {c.why}" for c in choices]
    lines += ["", "## Slow or stupid", ""]
    lines += [f"- {line}" for line in slow_or_stupid(inv.rows)] or ["- none"]
    lines += ["", "## Lineage", ""] + [f"- {k}: {v}" for k, v in lineage(inv.rows)]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def page(inv: Invocation, choices: list[Choice], images: dict[str, bytes]) -> str:
    task = primary_task(inv.rows)
    esc = html.escape
    accuracy_note = f"; accuracy is <code>{esc(task)}</code>" if task else ""
    head = "".join(f"<th>{esc(title)}</th>" for _, title in COLUMNS)
    body = ""
    for row in inv.rows:
        values = cell_values(row, task)
        cls = esc(values["verdict"].replace("+", "-"))
        body += (
            f'<tr class="{cls}">'
            + "".join(f"<td>{esc(values[key])}</td>" for key, _ in COLUMNS)
            + "</tr>\n"
        )
    best = "".join(f"<li><b>{esc(c.adapter)}</b>: {esc(c.why)}</li>" for c in choices)
    flagged = "".join(f"<li>{esc(s)}</li>" for s in slow_or_stupid(inv.rows)) or "<li>none</li>"
    lin = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in lineage(inv.rows))
    figs = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{esc(name)}</figcaption></figure>'
        for name, png in images.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>forgebench: {esc(inv.experiment)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
tr.slow td {{ background: #fff4d6; }} tr.stupid td {{ background: #fde2e1; }}
tr.slow-stupid td {{ background: #f9d0c4; }} tr.broken td, tr.failed td {{ background: #eee; }}
figure {{ display: inline-block; margin: 1em; }} img {{ max-width: 640px; }}
</style></head><body>
<h1>forgebench report: {esc(inv.experiment)}</h1>
<p>MLflow run <code>{esc(inv.run_id)}</code>{accuracy_note}.</p>
<h2>Cells</h2><table id="cells"><tr>{head}</tr>
{body}</table>
<h2>Best quant level per adapter</h2><ul id="best">{best}</ul>
<h2>Slow or stupid</h2><ul>{flagged}</ul>
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
    md = out_dir / "report.md"
    md.write_text(markdown(inv, choices, list(images)))
    index = out_dir / "index.html"
    index.write_text(page(inv, choices, images))
    return index, md
