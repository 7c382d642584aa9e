"""The release gate: is a candidate build no worse than the one in production?

Both are compared on the same eval items (paired, exact McNemar, as in the
verdicts) and the same bench prompts. A regression is an accuracy drop beyond
`accuracy_drop_max` that chance does not explain, or speed/memory worse than
the tolerated percentage. The summary is Markdown, for a CI job to post.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.tracking import RunView
from harness.verdict import mcnemar


@dataclass
class Tolerances:
    accuracy_drop_max: float = 0.02
    significance: float = 0.05
    speed_drop_pct: float = 10.0
    memory_rise_pct: float = 10.0


@dataclass
class GateResult:
    passed: bool
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(check, candidate, baseline, outcome)"""
    failures: list[str] = field(default_factory=list)

    def markdown(self, candidate: RunView, baseline: RunView) -> str:
        head = "PASS" if self.passed else "FAIL"
        lines = [
            f"## forgebench check: {head}",
            "",
            f"candidate `{candidate.tags.get('forgebench.cell', candidate.name)}` "
            f"(run `{candidate.run_id}`) vs baseline "
            f"`{baseline.tags.get('forgebench.cell', baseline.name)}` (run `{baseline.run_id}`)",
            "",
            "| check | candidate | baseline | outcome |",
            "|---|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows]
        if self.failures:
            lines += ["", "Regressions:", *[f"- {f}" for f in self.failures]]
        return "\n".join(lines) + "\n"


def compare(
    candidate: RunView,
    baseline: RunView,
    cand_items: dict[str, dict[str, bool]],
    base_items: dict[str, dict[str, bool]],
    tol: Tolerances,
) -> GateResult:
    result = GateResult(True)
    tasks = sorted(set(cand_items) & set(base_items))
    for task in tasks:
        shared = cand_items[task].keys() & base_items[task].keys()
        if not shared:
            continue
        cand = sum(cand_items[task][i] for i in shared) / len(shared)
        base = sum(base_items[task][i] for i in shared) / len(shared)
        lost, gained, p = mcnemar(base_items[task], cand_items[task])
        regressed = base - cand > tol.accuracy_drop_max and p < tol.significance
        result.rows.append(
            (
                f"{task} accuracy ({len(shared)} paired items)",
                f"{cand:.3f}",
                f"{base:.3f}",
                f"{'regressed' if regressed else 'ok'} "
                f"(lost {lost}, gained {gained}, McNemar p={p:.3g})",
            )
        )
        if regressed:
            result.failures.append(f"{task}: {cand:.3f} vs {base:.3f}, McNemar p={p:.3g}")
    if not tasks:
        result.failures.append("no evaluated task in common: cannot compare accuracy")
    _relative(
        result,
        "decode tok/s (p50)",
        candidate.metrics.get("decode_tps_p50"),
        baseline.metrics.get("decode_tps_p50"),
        -tol.speed_drop_pct,
    )
    _relative(
        result,
        "memory MB",
        candidate.metrics.get("memory_mb"),
        baseline.metrics.get("memory_mb"),
        tol.memory_rise_pct,
    )
    result.passed = not result.failures
    return result


def _relative(
    result: GateResult, name: str, cand: float | None, base: float | None, limit_pct: float
) -> None:
    """Fail when the change passes limit_pct (negative: a drop, positive: a rise)."""
    if cand is None or base is None or base == 0:
        result.rows.append((name, str(cand), str(base), "not measured"))
        return
    change = (cand - base) / base * 100
    bad = change < limit_pct if limit_pct < 0 else change > limit_pct
    result.rows.append(
        (
            name,
            f"{cand:.1f}",
            f"{base:.1f}",
            f"{'regressed' if bad else 'ok'} ({change:+.1f}%, limit {limit_pct:+g}%)",
        )
    )
    if bad:
        result.failures.append(f"{name}: {cand:.1f} vs {base:.1f} ({change:+.1f}%)")
