"""Each serving setting beside its level at the spec's own setting: the same GGUF, served
with another context, slots, KV-cache type, flash attention or threads.

Accuracy is compared on the items both were scored on, where the setting was scored anew
(a KV-cache type or flash attention: harness.spec.serving); a setting that cannot change
answers shares its level's scores, and says so. Under load: the aggregate generated tok/s
at each concurrency the load stage drove, beside llama-batched-bench's at the same
settings (the engine's ceiling), the peak memory of the server under that load, and the KV
cache the setting reserves as the GGUF's shape predicts it.
"""

from __future__ import annotations

from harness.report.comparison import Comparison, Items, both, paired_on, paired_text
from harness.track import Invocation, RunView, primary_task, schema

COLUMNS = (
    ("pair", "adapter, level, setting"),
    ("verdict", "verdict"),
    ("accuracy", "accuracy own / setting"),
    ("paired", "paired: lost, gained, drop [95% interval]"),
    ("load", "aggregate tok/s by concurrency (engine)"),
    ("memory", "peak memory MB own / setting"),
    ("kv", "KV cache MB own / setting"),
)
NOTE = (
    "Each figure the level at the spec's own serving setting / at this one. Paired: scored "
    "anew only where the setting can change answers (KV-cache type, flash attention); "
    "context, slots and threads share their level's answers. Aggregate tok/s: every "
    "stream's generated tokens over the wall time at c concurrent streams (median of the "
    "load's repeats), and in brackets llama-batched-bench's for the same GGUF and settings "
    "(its generated tokens over prefill and decode). Memory: the server's peak under the "
    "load; KV cache: what the setting reserves, from the model's shape."
)


def under_load(row: RunView) -> str:
    """`c1 95 (120), c2 150 (210)`: the load's aggregate and the engine's, per concurrency."""
    shown = []
    for c, value in row.throughput.items():
        engine = row.metrics.get(f"batched_c{c}_gen_tps")
        reference = f" ({engine:.0f})" if engine is not None else ""
        shown.append(f"c{c} {value:.0f}{reference}")
    return ", ".join(shown) or "-"


def evaluation(row: RunView) -> str | None:
    """The key of the evaluation the row's scores came from: a setting that cannot change
    answers has its level's."""
    return row.tags.get(f"{schema.KEY}.evaluate")


def section(inv: Invocation, items: Items) -> Comparison:
    task = primary_task(inv.rows)
    own = {(r.adapter, r.route, r.quant): r for r in inv.rows if not r.setting}
    rows = []
    for row in inv.rows:
        plain = own.get((row.adapter, row.route, row.level)) if row.setting else None
        if plain is None:
            continue
        pair = (plain, row)
        rescored = evaluation(row) != evaluation(plain)
        table = paired_on(task, plain, row, items) if rescored else None
        rows.append(
            {
                "pair": f"{row.line} {row.level} {row.setting}",
                "verdict": row.verdict or row.status or "-",
                "accuracy": both(pair, ".3f", lambda r: r.accuracy(task)),
                "paired": paired_text(table) if rescored else "answers shared",
                "load": f"{under_load(plain)} / {under_load(row)}",
                "memory": both(pair, ".0f", "load_memory_mb"),
                "kv": both(pair, ".1f", "kv_cache_mb"),
            }
        )
    return Comparison("serving", "Serving settings against the spec's own", NOTE, COLUMNS, rows)


def plots(plt, rows: list[RunView]) -> dict[str, object]:
    """Per level, aggregate throughput against concurrency (a line per setting the load
    drove at more than one, llama-batched-bench's dashed); and peak memory against the
    context reserved, a line per level and KV-cache type, dashed where the KV cache the
    GGUF's shape predicts would take it from its smallest context. None without load."""
    figures = {}
    for (line, level), mine in _by_level(rows).items():
        curves = [r for r in mine if len(r.throughput) > 1]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for row in curves:
            levels = list(row.throughput)
            drawn = ax.plot(levels, list(row.throughput.values()), "o-")
            drawn[0].set_label(row.setting or "spec's own")
            engine = [(c, row.metrics.get(f"batched_c{c}_gen_tps")) for c in levels]
            engine = [(c, v) for c, v in engine if v is not None]
            color = drawn[0].get_color()
            ax.plot([c for c, _ in engine], [v for _, v in engine], "--", color=color)
        ax.set(
            xlabel="concurrent streams",
            ylabel="aggregate generated tok/s",
        )
        ax.set_title(f"{line} {level}: throughput vs concurrency\n(dashed: llama-batched-bench)")
        ax.set_xticks(sorted({c for r in curves for c in r.throughput}))
        ax.legend(fontsize=7)
        figures[f"throughput_{line}_{level}.png"] = fig
    keys = {"load_ctx_tokens", "load_memory_mb", "kv_cache_mb"}
    sized = [r for r in rows if keys <= r.metrics.keys()]
    if sized:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        groups: dict[tuple[str, str], list[RunView]] = {}
        for row in sized:
            kv = row.params.get("setting.kv_cache", "f16")
            groups.setdefault((f"{row.line} {row.level}", kv), []).append(row)
        for (name, kv), group in groups.items():
            group.sort(key=lambda r: r.metrics["load_ctx_tokens"])
            x = [r.metrics["load_ctx_tokens"] for r in group]
            drawn = ax.plot(x, [r.metrics["load_memory_mb"] for r in group], "o-")
            drawn[0].set_label(f"{name}, KV {kv}")
            first = group[0].metrics
            predicted = [
                first["load_memory_mb"] + r.metrics["kv_cache_mb"] - first["kv_cache_mb"]
                for r in group
            ]
            ax.plot(x, predicted, "--", color=drawn[0].get_color())
        ax.set(
            xlabel="context reserved (num_ctx x slots, tokens)",
            ylabel="peak memory under load (MB)",
            title="Memory vs context (dashed: as the KV cache predicts)",
        )
        ax.legend(fontsize=7)
        figures["memory_vs_context.png"] = fig
    return figures


def _by_level(rows: list[RunView]) -> dict[tuple[str, str], list[RunView]]:
    """The rows the load drove, by adapter line and level."""
    out: dict[tuple[str, str], list[RunView]] = {}
    for row in rows:
        if row.throughput:
            out.setdefault((row.line, row.level), []).append(row)
    return out
