"""Verdicts: is a cell ok, "slow", "stupid" (and through which step), "broken" or "unjudged"?

"Slow" is a missed speed or memory budget; a decode budget (absolute, or a multiple of
the same adapter's F16 in the same run) is judged on the median decode rate of the
bench's fixed-length requests and its distribution-free bounds (`harness.judge.speed`): slow
when surely below, unjudged when the bounds straddle it. A TTFT budget is judged the same
way on the p95 time to first token (slow when surely above); memory is a peak, measured
once, against its budget as it is.
"Stupid" is lost accuracy, shown with the spec's confidence: a cell whose end-to-end
drop on a task (from the tuned HF model on a target task, from the untuned one on a guard
task) is surely beyond that task's tolerance, with the family-wise error held across
every cell and task of the run by Holm's procedure; the label names the steps of the
chain (`harness.judge.blame`) whose own drop is surely above zero (`stupid (quantization)`,
`stupid (export)`, `stupid (training: forgetting)` on a guard task). Training that does
not surely gain the spec's minimum on a target task is `stupid (training: no gain)`: an
adapter trained on wrong labels is never ok. A level whose mean KLD from its F16 is above
`kld_max` is `stupid (quantization)` too. "Broken" is a cell that failed a stage or the
chat check (`broken (template)` when the served template differs from the tokenizer's).

"ok" means shown within tolerance, not "no loss found": every link of the chain and the
end-to-end drop hold (their upper bounds are below the tolerance, at the stated
confidence), training surely gained, and every budget was met. Anything else that is not
slow, stupid or broken is "unjudged", with the reason: a missing or failed reference, an
interval that straddles the tolerance (with about how many items would decide it), a
figure not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import quant
from harness.chain import CONTROL, MERGE
from harness.errors import ForgebenchError
from harness.judge import paired, speed
from harness.judge.blame import END_TO_END, Link, Rule, Scores, compare
from harness.spec import BudgetSpec

__all__ = ["Figures", "Scores", "Verdict", "judge"]


@dataclass
class Figures:
    """What a cell measured, as the verdict needs it."""

    cell: str
    adapter: str
    quant: str
    status: str = "done"
    route: str = MERGE
    """A level is judged against the F16 of its own route."""
    setting: str | None = None
    """A serving setting's name (harness.spec.serving): `quant` is then `<level>-<setting>`,
    the level's GGUF served so, and judged through its level at the spec's own setting."""
    rescored: bool = False
    """A setting's answers were scored anew (it can change them), not shared with its level."""
    error: str | None = None
    broken: str | None = None
    """What broke, for the label: "template" when the export parity check failed."""
    accuracy: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, bool]] = field(default_factory=dict)
    """task -> item id -> correct, for the paired tests."""
    evaluated: bool = False
    """Accuracy was asked for (the spec measures evaluate)."""
    decode_rates: list[float] = field(default_factory=list)
    """Each bench request's decode tok/s (fixed-length decodes): the median is judged."""
    ttft_ms: list[float] = field(default_factory=list)
    """Each bench request's time to first token: its p95 is judged."""
    memory_mb: float | None = None
    load: speed.Loaded = field(default_factory=speed.Loaded)
    """The load's requests at the load a load budget names."""
    kld_mean: float | None = None
    tuning_kld: float | None = None
    """Mean KLD of the tuned F16 from the untuned F16 on the drift text (a forgetting sign)."""

    @property
    def level(self) -> str:
        """The level (or recipe) of the cell's GGUF, without its serving setting."""
        return quant.without_setting(self.quant, self.setting)

    def scores(self) -> Scores:
        error = None if self.status == "done" else (self.error or self.status)
        return Scores(self.quant, self.accuracy, self.items, error)


@dataclass
class Verdict:
    cell: str
    verdict: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What informs but does not decide: each held link's interval, the tuning drift."""
    links: list[Link] = field(default_factory=list)
    chain: dict[str, float] = field(default_factory=dict)
    """The chain's accuracies: chain_hf_base_<task>, chain_hf_tuned_<task>, chain_f16_<task>."""
    steps: list[str] = field(default_factory=list)
    """The steps blamed, as the label names them."""
    speed: dict[str, float] = field(default_factory=dict)
    """The median decode rate's bounds the budget was judged with, as MLflow metrics."""


def slow_reasons(
    fig: Figures, budgets: BudgetSpec, f16: Figures | None = None
) -> tuple[list[str], list[str]]:
    """(missed budgets, budgets not shown met: a figure not measured, or a decode median
    whose interval straddles its budget)."""
    missed, unmeasured = _decode(fig, budgets, f16)
    if (budget := budgets.ttft_ms_p95_max) is not None:
        if not fig.ttft_ms:
            unmeasured.append(f"TTFT p95 not measured (budget {budget:g} ms)")
        else:
            p95 = speed.quantile(fig.ttft_ms, 0.95, budgets.confidence)
            state, said = speed.against(p95, budget, "TTFT", "ms", at_most=True)
            {"missed": missed, "unjudged": unmeasured}.get(state, []).append(said)
    if (budget := budgets.memory_mb_max) is not None:  # a peak, measured once: no interval
        if fig.memory_mb is None:
            unmeasured.append(f"memory not measured (budget {budget:g} MB)")
        elif fig.memory_mb > budget:
            missed.append(f"memory {fig.memory_mb:.0f} MB > {budget:g}")
    if budgets.load is not None:
        loaded = speed.under_load(fig.load, budgets.load, budgets.confidence)
        missed, unmeasured = missed + loaded[0], unmeasured + loaded[1]
    return missed, unmeasured


def _decode(fig: Figures, budgets: BudgetSpec, f16: Figures | None) -> tuple[list, list]:
    """The median decode rate against `decode_tps_min` and against `decode_speedup_min`
    times the median of the F16 of the cell's own adapter and route, measured in the same
    run (a budget that means the same on every CPU)."""
    wanted = []
    if budgets.decode_tps_min is not None:
        wanted.append((budgets.decode_tps_min, "decode p50", "tok/s"))
    if budgets.decode_speedup_min is not None:
        base = f16.decode_rates if f16 is not None else []
        if not base:
            return [], [f"decode of {quant.F16} not measured (decode_speedup_min)"]
        reference = speed.median(base, budgets.confidence).value
        budget = budgets.decode_speedup_min * reference
        wanted.append(
            (
                budget,
                f"decode p50 ({budgets.decode_speedup_min:g}x {quant.F16}'s {reference:.0f})",
                "tok/s",
            )
        )
    if wanted and not fig.decode_rates:
        return [], [
            f"{name} not measured (budget {budget:g} {unit})" for budget, name, unit in wanted
        ]
    missed, undecided = [], []
    for budget, name, unit in wanted:
        state, said = speed.against(
            speed.median(fig.decode_rates, budgets.confidence), budget, name, unit
        )
        if state == "missed":
            missed.append(said)
        elif state == "unjudged":
            undecided.append(said)
    return missed, undecided


@dataclass
class Judging:
    """What every cell is judged with: the HF references by adapter, the tasks, the guard
    tasks among them, the budgets and the name of the untuned control adapter."""

    references: dict[str, Scores]
    tasks: list[str]
    guard: set[str]
    budgets: BudgetSpec
    control: str = CONTROL


def rule_for(budgets: BudgetSpec, task: str) -> Rule:
    """What the task's links are judged by: its tolerance, the run's confidence and the gain
    training must show."""
    return Rule(budgets.tolerance_of(task), budgets.confidence, budgets.min_gain)


def chain_links(
    fig: Figures, f16: Figures | None, ctx: Judging, plain: Figures | None = None
) -> list[Link]:
    """The links from the untuned base to this cell, and end to end, on every task; a
    serving setting's cell goes through `plain`, its level at the spec's own setting."""
    references, control = ctx.references, ctx.control
    own_hf = references.get(fig.adapter) or Scores("tuned HF", error="not scored")
    base_hf = references.get(control) or Scores("untuned HF", error="not scored")
    f16_scores = f16.scores() if f16 is not None else Scores(quant.F16, error="no cell")
    tuned = fig.adapter != control
    pairs = []
    if tuned:
        pairs.append(("training", base_hf, own_hf))
    pairs.append(("export", own_hf, f16_scores))
    level = fig.scores()
    if fig.setting is not None:
        level = plain.scores() if plain is not None else Scores(fig.level, error="no cell")
    if fig.level != quant.F16:
        pairs.append(("quantization", f16_scores, level))
    if fig.setting is not None and fig.rescored:
        pairs.append(("serving", level, fig.scores()))
    links = []
    for task in ctx.tasks:
        rule, guard = rule_for(ctx.budgets, task), task in ctx.guard
        links += [compare(step, task, ref, cand, rule, guard) for step, ref, cand in pairs]
        start = own_hf if tuned and not guard else base_hf
        links.append(compare(END_TO_END, task, start, fig.scores(), rule, guard))
    return links


def judge(
    cells: list[Figures],
    budgets: BudgetSpec,
    references: dict[str, Scores] | None = None,
    tasks: list[str] | None = None,
    guard: list[str] = (),
    control: str = CONTROL,
) -> dict[str, Verdict]:
    """One verdict per cell. `references` maps an adapter (and `control`) to its HF scores;
    `tasks` lists every scored task, `guard` those an adapter must not hurt. Raises when
    an adapter has no F16 cell to judge its levels against."""
    by_key = {(c.adapter, c.route, c.quant): c for c in cells}
    missing = sorted({c.adapter for c in cells if (c.adapter, c.route, quant.F16) not in by_key})
    if missing:
        raise ForgebenchError(
            f"no {quant.F16} cell for {', '.join(missing)}: accuracy is judged against the "
            f"same adapter at {quant.F16}; add {quant.F16} to the spec's quant list"
        )
    links, f16s, speed_f16s = {}, {}, {}
    for fig in cells:
        scored = tasks if tasks is not None else sorted(fig.accuracy)
        ctx = Judging(references or {}, scored, set(guard), budgets, control)
        f16 = f16s[fig.cell] = by_key.get((fig.adapter, fig.route, quant.F16))
        # speed is judged against the F16 served the same way; accuracy through the chain
        same = quant.F16 + (f"-{fig.setting}" if fig.setting else "")
        speed_f16s[fig.cell] = by_key.get((fig.adapter, fig.route, same))
        plain = by_key.get((fig.adapter, fig.route, fig.level))
        done = scored and fig.status == "done"
        links[fig.cell] = chain_links(fig, f16, ctx, plain) if done else []
    beyond = _beyond(links, 1 - budgets.confidence)
    return {
        fig.cell: _judge_cell(
            fig,
            speed_f16s[fig.cell],
            links[fig.cell],
            beyond,
            budgets,
            _chain(fig, f16s[fig.cell], references or {}, control),
        )
        for fig in cells
    }


def _beyond(links: dict[str, list[Link]], alpha: float) -> set[int]:
    """The end-to-end links surely beyond tolerance, Holm-adjusted across the whole run
    (by id), so a run with no true loss calls a cell stupid at most `alpha` of the time."""
    tested = [link for mine in links.values() for link in mine if link.p_beyond is not None]
    rejected = paired.holm([link.p_beyond for link in tested], alpha)
    return {id(link) for link, out in zip(tested, rejected, strict=True) if out}


def _judge_cell(
    fig: Figures,
    f16: Figures | None,
    links: list[Link],
    beyond: set[int],
    budgets: BudgetSpec,
    chain: dict[str, float],
) -> Verdict:
    if fig.status != "done":
        label = f"broken ({fig.broken})" if fig.broken else "broken"
        return Verdict(fig.cell, label, [fig.error or fig.status])
    verdict = Verdict(fig.cell, "", links=links, chain=chain)
    for name, values, q in (
        ("decode_tps_p50", fig.decode_rates, 0.5),
        ("ttft_ms_p95", fig.ttft_ms, 0.95),
    ):
        if values:
            figure = speed.quantile(values, q, budgets.confidence)
            bounds = {"lower": figure.lower, "upper": figure.upper}
            verdict.speed |= {f"{name}_{k}": v for k, v in bounds.items() if v is not None}
    slow, unmeasured = slow_reasons(fig, budgets, f16)
    stupid, steps = _stupid(links, beyond)
    if budgets.kld_max is not None and fig.level != quant.F16:
        if fig.kld_mean is None:
            unmeasured.append(f"KLD from {quant.F16} not measured (budget {budgets.kld_max:g})")
        elif fig.kld_mean > budgets.kld_max:
            stupid.append(f"KLD {fig.kld_mean:.3g} > {budgets.kld_max:g} from {quant.F16}")
            steps += [] if "quantization" in steps else ["quantization"]
    unjudged = unmeasured + [link.why for link in links if link.state != "held"]
    if fig.evaluated and not links:
        unjudged.append("no task was scored")
    elif not links:
        unjudged.append("accuracy not measured: add evaluate to the spec's measure list")
    parts = ["slow"] if slow else []
    if stupid:
        parts.append(f"stupid ({', '.join(steps)})" if steps else "stupid")
    elif unjudged:
        parts.append("unjudged")
    verdict.verdict = "+".join(parts) or "ok"
    verdict.steps = steps
    verdict.reasons = slow + stupid + ([] if stupid else unjudged)
    verdict.notes = [link.why for link in links if link.state == "held"]
    if fig.tuning_kld is not None:
        verdict.notes.append(
            f"training moved the F16 by KLD {fig.tuning_kld:.3g} on the drift text"
        )
    return verdict


def _stupid(links: list[Link], beyond: set[int]) -> tuple[list[str], list[str]]:
    """(reasons, steps blamed): every task whose end-to-end drop is surely beyond its
    tolerance (Holm across the run), with the steps on it whose own drop is surely above
    zero; and training that did not surely gain on a target task."""
    reasons, steps = [], []
    for link in links:
        if link.state == "no gain":
            reasons.append(link.why)
            steps.append(link.blame)
        if id(link) not in beyond:
            continue
        reasons.append(
            f"{link.why} (one-sided p={link.p_beyond:.2g}, Holm-adjusted across the run)"
        )
        for step in links:
            if step.task == link.task and step.step != END_TO_END and step.dropped:
                reasons.append(step.why)
                steps.append(step.blame)
    return reasons, list(dict.fromkeys(steps))


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
