"""Verdicts: is a cell ok, "slow", "stupid", both, or "broken"?

"Slow" is a missed speed or memory budget. "Stupid" is lost accuracy against
the cell's own F16 (same adapter, same items): the drop must exceed
`accuracy_drop_max` AND be significant on the paired items, or the drift from
F16 (mean KL divergence) must exceed `kld_max`. "Broken" is a cell that failed
a stage or the chat check. Quantization should fix slow without causing stupid;
these verdicts show where it stops doing so.

The paired test is the exact McNemar test: the same items are scored by both
cells, so only the items where they disagree carry information, and with the
few hundred items a quick eval has, the exact binomial form is right where the
chi-squared approximation is not. (A paired bootstrap would answer the same
question with more machinery and a random seed.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import quant
from harness.errors import ForgebenchError
from harness.spec import BudgetSpec


@dataclass
class Figures:
    """What a cell measured, as the verdict needs it."""

    cell: str
    adapter: str
    quant: str
    status: str = "done"
    error: str | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, bool]] = field(default_factory=dict)
    """task -> item id -> correct, for the paired test."""
    decode_tps: float | None = None
    ttft_ms_p95: float | None = None
    memory_mb: float | None = None
    kld_mean: float | None = None


@dataclass
class Verdict:
    cell: str
    verdict: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Comparisons that inform but do not decide, e.g. tuned vs untuned base."""


def mcnemar(reference: dict[str, bool], candidate: dict[str, bool]) -> tuple[int, int, float]:
    """Exact McNemar on paired items: (ref right & cand wrong, ref wrong & cand right, p)."""
    from scipy.stats import binomtest

    shared = reference.keys() & candidate.keys()
    lost = sum(1 for i in shared if reference[i] and not candidate[i])
    gained = sum(1 for i in shared if candidate[i] and not reference[i])
    if lost + gained == 0:
        return 0, 0, 1.0
    return lost, gained, float(binomtest(lost, lost + gained, 0.5).pvalue)


def slow_reasons(fig: Figures, budgets: BudgetSpec) -> list[str]:
    reasons = []
    if (
        budgets.decode_tps_min is not None
        and fig.decode_tps is not None
        and fig.decode_tps < budgets.decode_tps_min
    ):
        reasons.append(f"decode {fig.decode_tps:.0f} tok/s < {budgets.decode_tps_min:g}")
    if (
        budgets.ttft_ms_p95_max is not None
        and fig.ttft_ms_p95 is not None
        and fig.ttft_ms_p95 > budgets.ttft_ms_p95_max
    ):
        reasons.append(f"TTFT p95 {fig.ttft_ms_p95:.0f} ms > {budgets.ttft_ms_p95_max:g}")
    if (
        budgets.memory_mb_max is not None
        and fig.memory_mb is not None
        and fig.memory_mb > budgets.memory_mb_max
    ):
        reasons.append(f"memory {fig.memory_mb:.0f} MB > {budgets.memory_mb_max:g}")
    return reasons


def accuracy_loss(fig: Figures, ref: Figures, budgets: BudgetSpec, label: str) -> list[str]:
    """Tasks on which `fig` is worse than `ref` beyond the budget, significantly."""
    reasons = []
    for task, accuracy in sorted(fig.accuracy.items()):
        if task not in ref.accuracy:
            continue
        drop = ref.accuracy[task] - accuracy
        _, _, p = mcnemar(ref.items.get(task, {}), fig.items.get(task, {}))
        if drop > budgets.accuracy_drop_max and p < budgets.significance:
            reasons.append(
                f"{task} {accuracy:.2f} vs {ref.accuracy[task]:.2f} at {label}, McNemar p={p:.3g}"
            )
    return reasons


def stupid_reasons(fig: Figures, ref: Figures | None, budgets: BudgetSpec) -> list[str]:
    reasons = []
    if ref is not None and ref is not fig and ref.status == "done":
        reasons += accuracy_loss(fig, ref, budgets, quant.REFERENCE)
    if budgets.kld_max is not None and fig.kld_mean is not None and fig.kld_mean > budgets.kld_max:
        reasons.append(f"KLD {fig.kld_mean:.3g} > {budgets.kld_max:g} from {quant.REFERENCE}")
    return reasons


def judge(cells: list[Figures], budgets: BudgetSpec, control: str = "base") -> dict[str, Verdict]:
    """One verdict per cell. Raises when a cell has no F16 reference to be judged against."""
    by_key = {(c.adapter, c.quant): c for c in cells}
    missing = sorted({c.adapter for c in cells if (c.adapter, quant.REFERENCE) not in by_key})
    if missing:
        raise ForgebenchError(
            f"no {quant.REFERENCE} cell for {', '.join(missing)}: accuracy is judged against the "
            f"same adapter at {quant.REFERENCE}; add {quant.REFERENCE} to the spec's quant list"
        )
    verdicts = {}
    for fig in cells:
        if fig.status != "done":
            verdicts[fig.cell] = Verdict(fig.cell, "broken", [fig.error or fig.status])
            continue
        slow = slow_reasons(fig, budgets)
        stupid = stupid_reasons(fig, by_key[(fig.adapter, quant.REFERENCE)], budgets)
        label = "+".join(name for name, hit in (("slow", slow), ("stupid", stupid)) if hit)
        verdict = Verdict(fig.cell, label or "ok", slow + stupid)
        base = by_key.get((control, fig.quant))
        if fig.adapter != control and base is not None and base.status == "done":
            verdict.notes += [
                _versus(fig, base, task) for task in sorted(fig.accuracy) if task in base.accuracy
            ]
        verdicts[fig.cell] = verdict
    return verdicts


def _versus(fig: Figures, base: Figures, task: str) -> str:
    _, _, p = mcnemar(base.items.get(task, {}), fig.items.get(task, {}))
    return (
        f"{task}: tuned {fig.accuracy[task]:.2f} vs untuned {base.accuracy[task]:.2f} "
        f"at {fig.quant} (McNemar p={p:.3g})"
    )
