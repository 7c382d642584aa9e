"""Verdicts: is a cell ok, "slow", "stupid" (and through which step), "broken" or "unjudged"?

"Slow" is a missed speed or memory budget; the decode budget is judged on the slow
tail (p5 of the per-request decode rates), since a user notices the slow answers.
"Stupid" is lost accuracy, blamed on the step of the chain that lost it
(`harness.blame`): `stupid (training)` when the tuned HF model is significantly worse
than the untuned base, `stupid (training: forgetting)` on a guard task, `stupid
(export)` when the F16 GGUF, served, is worse than the tuned HF model (conversion or
template loss), `stupid (quantization)` when a level is worse than its F16 or drifts
from it (mean KLD above `kld_max`). "Broken" is a cell that failed a stage or the chat
check (`broken (template)` when the served template differs from the tokenizer's).

A verdict never passes what was not measured: a cell any of whose links is unjudged
(missing or failed reference, reference at the floor), a cell whose accuracy was not
measured at all, or a budget whose figure is missing, is "unjudged" with the reason,
never "ok". Every "ok" says the smallest
drop its items could have shown, so a user sees when there are too few items.

The paired test is the exact McNemar test: the same items are scored by both
models, so only the items where they disagree carry information, and with the few
hundred items a quick eval has, the exact binomial form is right where the
chi-squared approximation is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import quant
from harness.blame import Link, Scores, compare, mcnemar
from harness.errors import ForgebenchError
from harness.spec import BudgetSpec

__all__ = ["Figures", "Scores", "Verdict", "judge", "mcnemar"]


@dataclass
class Figures:
    """What a cell measured, as the verdict needs it."""

    cell: str
    adapter: str
    quant: str
    status: str = "done"
    route: str = "merge"
    """A level is judged against the F16 of its own route."""
    error: str | None = None
    broken: str | None = None
    """What broke, for the label: "template" when the export parity check failed."""
    accuracy: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, bool]] = field(default_factory=dict)
    """task -> item id -> correct, for the paired tests."""
    evaluated: bool = False
    """Accuracy was asked for (the spec measures evaluate)."""
    decode_tps: float | None = None
    """The slow tail: p5 of the per-request decode rates."""
    ttft_ms_p95: float | None = None
    memory_mb: float | None = None
    kld_mean: float | None = None
    tuning_kld: float | None = None
    """Mean KLD of the tuned F16 from the untuned F16 on the drift text (a forgetting sign)."""

    def scores(self) -> Scores:
        error = None if self.status == "done" else (self.error or self.status)
        return Scores(self.quant, self.accuracy, self.items, error)


@dataclass
class Verdict:
    cell: str
    verdict: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What informs but does not decide: each held link's power, the tuning drift."""
    links: list[Link] = field(default_factory=list)
    chain: dict[str, float] = field(default_factory=dict)
    """The chain's accuracies: chain_hf_base_<task>, chain_hf_tuned_<task>, chain_f16_<task>."""

    @property
    def steps_lost(self) -> list[str]:
        return list(dict.fromkeys(link.blame for link in self.links if link.state == "lost"))


def slow_reasons(fig: Figures, budgets: BudgetSpec) -> tuple[list[str], list[str]]:
    """(missed budgets, budgets whose figure was not measured)."""
    checks = [
        ("decode p5", budgets.decode_tps_min, fig.decode_tps, "tok/s", "<"),
        ("TTFT p95", budgets.ttft_ms_p95_max, fig.ttft_ms_p95, "ms", ">"),
        ("memory", budgets.memory_mb_max, fig.memory_mb, "MB", ">"),
    ]
    missed, unmeasured = [], []
    for name, budget, value, unit, worse in checks:
        if budget is None:
            continue
        if value is None:
            unmeasured.append(f"{name} not measured (budget {budget:g} {unit})")
        elif (value < budget) if worse == "<" else (value > budget):
            missed.append(f"{name} {value:.0f} {unit} {worse} {budget:g}")
    return missed, unmeasured


@dataclass
class Judging:
    """What every cell is judged with: the HF references by adapter, the tasks, the guard
    tasks among them, the budgets and the name of the untuned control adapter."""

    references: dict[str, Scores]
    tasks: list[str]
    guard: set[str]
    budgets: BudgetSpec
    control: str = "base"


def chain_links(fig: Figures, f16: Figures | None, ctx: Judging) -> list[Link]:
    """The links from the untuned base to this cell, on every task."""
    references, budgets, control = ctx.references, ctx.budgets, ctx.control
    own_hf = references.get(fig.adapter) or Scores("tuned HF", error="not scored")
    base_hf = references.get(control) or Scores("untuned HF", error="not scored")
    f16_scores = f16.scores() if f16 is not None else Scores(quant.REFERENCE, error="no cell")
    pairs = []
    if fig.adapter != control:
        pairs.append(("training", base_hf, own_hf))
    pairs.append(("export", own_hf, f16_scores))
    if fig.quant != quant.REFERENCE:
        pairs.append(("quantization", f16_scores, fig.scores()))
    drop_max, alpha = budgets.accuracy_drop_max, budgets.significance
    return [
        compare(step, task, ref, cand, drop_max, alpha, guard=task in ctx.guard)
        for step, ref, cand in pairs
        for task in ctx.tasks
    ]


def judge(
    cells: list[Figures],
    budgets: BudgetSpec,
    references: dict[str, Scores] | None = None,
    tasks: list[str] | None = None,
    guard: list[str] = (),
    control: str = "base",
) -> dict[str, Verdict]:
    """One verdict per cell. `references` maps an adapter (and `control`) to its HF scores;
    `tasks` lists every scored task, `guard` those an adapter must not hurt. Raises when
    an adapter has no F16 cell to judge its levels against."""
    by_key = {(c.adapter, c.route, c.quant): c for c in cells}
    missing = sorted(
        {c.adapter for c in cells if (c.adapter, c.route, quant.REFERENCE) not in by_key}
    )
    if missing:
        raise ForgebenchError(
            f"no {quant.REFERENCE} cell for {', '.join(missing)}: accuracy is judged against the "
            f"same adapter at {quant.REFERENCE}; add {quant.REFERENCE} to the spec's quant list"
        )
    verdicts = {}
    for fig in cells:
        scored = tasks if tasks is not None else sorted(fig.accuracy)
        ctx = Judging(references or {}, scored, set(guard), budgets, control)
        f16 = by_key.get((fig.adapter, fig.route, quant.REFERENCE))
        verdicts[fig.cell] = _judge_cell(fig, f16, ctx)
    return verdicts


def _judge_cell(fig: Figures, f16: Figures | None, ctx: Judging) -> Verdict:
    if fig.status != "done":
        label = f"broken ({fig.broken})" if fig.broken else "broken"
        return Verdict(fig.cell, label, [fig.error or fig.status])
    budgets, tasks = ctx.budgets, ctx.tasks
    links = chain_links(fig, f16, ctx) if tasks else []
    chain = _chain(fig, f16, ctx.references, ctx.control)
    verdict = Verdict(fig.cell, "", links=links, chain=chain)
    slow, unmeasured = slow_reasons(fig, budgets)
    stupid = [link.why for link in links if link.state == "lost"]
    unjudged = unmeasured + [link.why for link in links if link.state == "unjudged"]
    if fig.evaluated and not tasks:
        unjudged.append("no task was scored")
    elif not links:
        unjudged.append("accuracy not measured: add evaluate to the spec's measure list")
    steps = verdict.steps_lost
    if budgets.kld_max is not None and fig.quant != quant.REFERENCE:
        if fig.kld_mean is None:
            unjudged.append(f"KLD from {quant.REFERENCE} not measured (budget {budgets.kld_max:g})")
        elif fig.kld_mean > budgets.kld_max:
            stupid.append(f"KLD {fig.kld_mean:.3g} > {budgets.kld_max:g} from {quant.REFERENCE}")
            steps += [] if "quantization" in steps else ["quantization"]
    parts = []
    if slow:
        parts.append("slow")
    if stupid:
        parts.append(f"stupid ({', '.join(steps)})")
    elif unjudged:
        parts.append("unjudged")
    verdict.verdict = "+".join(parts) or "ok"
    verdict.reasons = slow + stupid + ([] if stupid else unjudged)
    verdict.notes = [link.why for link in links if link.state in ("held", "n/a")]
    if fig.tuning_kld is not None:
        verdict.notes.append(
            f"training moved the F16 by KLD {fig.tuning_kld:.3g} on the drift text"
        )
    return verdict


def _chain(
    fig: Figures, f16: Figures | None, references: dict[str, Scores], control: str
) -> dict[str, float]:
    """The accuracies along the cell's chain, as MLflow metrics."""
    out: dict[str, float] = {}
    named = [("hf_base", references.get(control))]
    if fig.adapter != control:
        named.append(("hf_tuned", references.get(fig.adapter)))
    named.append(("f16", f16.scores() if f16 is not None and f16.status == "done" else None))
    for name, scores in named:
        if scores is not None and not scores.error:
            out |= {f"chain_{name}_{task}": acc for task, acc in scores.accuracy.items()}
    return out
