"""The report's plots, as PNG bytes, from the rows MLflow holds.

Among them the blame chain, "where the quality went": per adapter, accuracy at
each step from the untuned base in PyTorch to the smallest GGUF, with the step
the verdict blames marked, so a reader sees which step to fix (the training
recipe, the export, or the quant level) instead of only that the last cell is
worse than the first.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from harness import quant
from harness.chain import CONTROL
from harness.judge import paired
from harness.judge.best import pareto_front
from harness.report import serving
from harness.track import RunView, schema

STEPS = ("training", "export", "quantization")
"""The links of the chain, in order; each compares a point with the one before it."""


@dataclass
class Point:
    """One point of an adapter's chain: accuracy per task, and the link that led to it."""

    label: str
    step: str | None
    """The link from its reference to this point (None for the first point)."""
    accuracy: dict[str, float | None]
    row: RunView | None = None
    """The cell whose link metrics describe the step (the cell itself for a quant level)."""
    lost: bool = False
    """The verdict (`forgebench.steps_lost`) blames this point's step."""
    items: dict[str, int] = field(default_factory=dict)
    """task -> the items the chain is scored on, for the accuracy's interval."""
    losses: dict[str, tuple[float, float | None, float | None]] = field(default_factory=dict)
    """task -> (drop, its lower and upper bounds) for the step, where the cell logged them."""


def steps_lost(row: RunView) -> list[str]:
    """The chain steps the verdict blames, from the tag the verdict wrote."""
    tag = row.tags.get(schema.STEPS_LOST, "")
    return [s.strip() for s in tag.split(",") if s.strip() in STEPS]


def chain_tasks(rows: list[RunView], task: str | None) -> list[str]:
    """The primary task, then the guard tasks (which training must not hurt)."""
    if not task:
        return []
    guards = next((r.tags[schema.GUARD_TASKS] for r in rows if schema.GUARD_TASKS in r.tags), "")
    return [task, *(t.strip() for t in guards.split(",") if t.strip() and t.strip() != task)]


def chain(rows: list[RunView], adapter: str, tasks: list[str]) -> list[Point]:
    """The adapter's chain, or [] when its cells logged no chain figures.

    The PyTorch points come from whichever cell logged them (all cells of an
    adapter share them); F16 GGUF is `chain_f16_<task>`, else the f16 cell's own
    accuracy; then one point per quantized cell, largest level first (at the spec's own
    serving setting: a setting is not a step of the chain).
    """
    plain = (r for r in rows if r.line == adapter and not r.setting)
    mine = sorted(plain, key=lambda r: quant.rank(r.quant))

    def shared(prefix: str) -> dict[str, float | None]:
        return {
            t: next(
                (r.metrics[f"{prefix}_{t}"] for r in mine if f"{prefix}_{t}" in r.metrics), None
            )
            for t in tasks
        }

    base, tuned, f16 = shared("chain_hf_base"), shared("chain_hf_tuned"), shared("chain_f16")
    if all(v is None for v in (*base.values(), *tuned.values(), *f16.values())):
        return []
    f16_row = next((r for r in mine if r.quant == quant.F16), None)
    for t in tasks:
        if f16[t] is None and f16_row is not None:
            f16[t] = f16_row.accuracy(t)
    blamed = {s for r in mine for s in steps_lost(r)}

    def logged(step: str) -> RunView | None:
        """A cell that logged the step's link (every cell of the adapter shares it)."""
        keys = {f"link_{step}_{t}_drop" for t in tasks}
        return next((r for r in mine if keys & r.metrics.keys()), None)

    points = [Point("untuned HF", None, base)]
    if adapter != CONTROL:  # the control adapter has no tuned model: its chain starts at export
        points.append(
            Point("tuned HF", "training", tuned, logged("training"), "training" in blamed)
        )
    points.append(Point("F16 GGUF", "export", f16, logged("export"), "export" in blamed))
    points += [
        Point(r.quant, "quantization", {t: r.accuracy(t) for t in tasks}, r)
        for r in mine
        if r.quant != quant.F16
    ]
    logged = {
        t: [r.metrics[f"link_e2e_{t}_items"] for r in mine if f"link_e2e_{t}_items" in r.metrics]
        for t in tasks
    }
    items = {t: int(found[0]) for t, found in logged.items() if found}
    for p in points:
        p.items = items
        if p.step == "quantization":
            p.lost = "quantization" in steps_lost(p.row)
        if p.step and p.row is not None:
            m = p.row.metrics
            p.losses = {
                t: (
                    m[f"link_{p.step}_{t}_drop"],
                    m.get(f"link_{p.step}_{t}_drop_lower"),
                    m.get(f"link_{p.step}_{t}_drop_upper"),
                )
                for t in tasks
                if f"link_{p.step}_{t}_drop" in m
            }
    return points


def blamed(points: list[Point], tasks: list[str]) -> list[tuple[int, int, str]]:
    """(point, its reference point, task) per blamed link: the task that lost most across
    the link carries the mark. A quant level's reference is F16 GGUF, not the level before."""
    f16 = next((i for i, p in enumerate(points) if p.step == "export"), 0)
    out = []
    for i, point in enumerate(points):
        if not point.lost or i == 0:
            continue
        ref = f16 if point.step == "quantization" else i - 1

        def drop(t: str, point: Point = point, ref: int = ref) -> float:
            if t in point.losses:
                return point.losses[t][0]
            before, after = points[ref].accuracy.get(t), point.accuracy.get(t)
            return before - after if before is not None and after is not None else float("-inf")

        out.append((i, ref, max(tasks, key=drop)))
    return out


RED = "#d62728"


def chain_plot(plt, adapter: str, points: list[Point], tasks: list[str]):
    """Accuracy along the chain, one line per task; each blamed link shaded, its candidate
    point crossed and an arrow drawn from the reference it lost against."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    xs = range(len(points))
    for t in tasks:
        ys = [p.accuracy.get(t) for p in points]
        style = "o-" if t == tasks[0] else "s--"
        label = t if t == tasks[0] else f"{t} (guard)"
        (line,) = ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=label)
        n = next((p.items[t] for p in points if t in p.items), None)
        if n:  # every point of a chain is scored on the same items: its 95% interval
            bounds = [paired.accuracy_interval(y, n) if y is not None else None for y in ys]
            below = [y - b[0] if b else 0.0 for y, b in zip(ys, bounds, strict=True)]
            above = [b[1] - y if b else 0.0 for y, b in zip(ys, bounds, strict=True)]
            values = [float("nan") if y is None else y for y in ys]
            ax.errorbar(
                xs,
                values,
                yerr=[below, above],
                fmt="none",
                capsize=3,
                ecolor=line.get_color(),
                alpha=0.6,
            )
    row_of: dict[int, int] = {}  # a blamed link's label row: adjacent labels alternate
    for i, ref, t in blamed(points, tasks):
        row_of[i] = 1 if row_of.get(i - 1) == 0 else 0
        point = points[i]
        ax.axvspan(i - 0.4, i + 0.4, color=RED, alpha=0.12)
        before, after = points[ref].accuracy.get(t), point.accuracy.get(t)
        text = f"{point.step} lost"
        if after is not None:
            ax.plot([i], [after], "X", color=RED, markersize=13, zorder=5)
        if before is not None and after is not None:
            ax.annotate(
                "",
                (i, after),
                xytext=(ref, before),
                arrowprops={"arrowstyle": "->", "color": RED, "linestyle": ":"},
            )
            text += f"\n{t} {before:.2f}→{after:.2f}"
        drop, lower, upper = point.losses.get(t, (None, None, None))
        if lower is not None and upper is not None:
            text += f"\ndrop {drop:.2f} [{lower:.2f}, {upper:.2f}]"
        edge = "right" if i == len(points) - 1 else "left" if i == 0 else "center"
        ax.text(i, 1.47 - 0.24 * row_of[i], text, ha=edge, va="top", fontsize=8, color=RED)
    ax.set_xticks(list(xs), [p.label for p in points], rotation=20)
    ax.set_ylim(-0.03, 1.5)  # headroom above 1.0 for two rows of blamed links' labels
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set(ylabel="accuracy", title=f"{adapter}: where the quality went")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def chain_name(adapter: str) -> str:
    return "chain_" + re.sub(r"[^A-Za-z0-9_.-]", "_", adapter) + ".png"


def plots(rows: list[RunView], task: str | None) -> dict[str, bytes]:
    """Each plot as PNG bytes, keyed by file name; a plot with no data is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    adapters = list(dict.fromkeys(r.line for r in rows))
    settings = [r for r in rows if r.setting]
    rows = [r for r in rows if not r.setting]  # the levels' plots: the spec's own setting

    def save(name: str, fig) -> None:
        out[name] = _png(plt, fig)

    if tasks := chain_tasks(rows, task):
        for adapter in adapters:
            if points := chain(rows, adapter, tasks):
                save(chain_name(adapter), chain_plot(plt, adapter, points, tasks))

    if task and any(r.accuracy(task) is not None for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for adapter in adapters:
            pts = [
                (r.size_mb, r.accuracy(task), r.quant)
                for r in rows
                if r.line == adapter and r.status == "done"
                if r.size_mb is not None and r.accuracy(task) is not None
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
            mine = [r for r in rows if r.line == adapter]
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
        if ax.get_legend_handles_labels()[0]:  # none without a bench
            ax.legend()
        save("pareto.png", fig)

        base = {r.quant: r.accuracy(task) for r in rows if r.adapter == CONTROL}
        tuned = [a for a in adapters if a != CONTROL]
        levels = list(dict.fromkeys(r.quant for r in rows))
        if base and tuned:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            width = 0.8 / (len(tuned) + 1)
            for i, adapter in enumerate([CONTROL, *tuned]):
                acc = {r.quant: r.accuracy(task) for r in rows if r.line == adapter}
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
            tps = {r.quant: r.decode_tps for r in rows if r.line == adapter}
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

    out |= {name: _png(plt, fig) for name, fig in serving.plots(plt, rows + settings).items()}
    curves = {r.adapter: r.loss for r in rows if r.loss}
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for adapter, loss in curves.items():
            ax.plot([s for s, _ in loss], [v for _, v in loss], label=adapter)
        ax.set(xlabel="step", ylabel="training loss", title="Training loss")
        ax.legend()
        save("training_loss.png", fig)
    return out


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
