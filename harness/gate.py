"""The release gate: is a candidate build no worse than the one in production?

Both are compared on the same eval items (paired, exact McNemar, as in the
verdicts) and the same bench prompts. A regression is an accuracy drop beyond
`accuracy_drop_max` that chance does not explain, or speed/memory worse than
the tolerated percentage. The summary is Markdown, for a CI job to post.

The gate fails closed: it passes only what it compared. A figure not measured
on both runs (a task with no paired items, decode speed or memory missing),
speed or memory taken on two different machines (`forgebench.machine`), or
memory reported two different ways (llama-server's `memory_mb`, Ollama's
`ollama_ps_size_mb`) fails it, unless that figure is named in `skip`; so does
a candidate that did not finish (`forgebench.status` not "done") or was judged
broken or not judged at all (`forgebench.verdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.errors import InputError
from harness.tracking import RunView
from harness.verdict import mcnemar

FIGURES = ("accuracy", "decode", "memory")
"""What the gate compares, by the names `forgebench check --skip` takes."""
MEMORY = ("memory_mb", "ollama_ps_size_mb")
"""The memory figures, one per way of measuring (see harness/stages/bench.py)."""
MACHINE = "forgebench.machine"


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
    regressions: list[str] = field(default_factory=list)
    """Figures measured on both runs and worse than tolerated."""
    refusals: list[str] = field(default_factory=list)
    """Why the gate cannot pass the candidate whatever its figures: not measured, not
    comparable, not finished, broken or not judged."""

    @property
    def failures(self) -> list[str]:
        return self.refusals + self.regressions

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
        if self.refusals:
            lines += ["", "Cannot pass:", *[f"- {f}" for f in self.refusals]]
        if self.regressions:
            lines += ["", "Regressions:", *[f"- {f}" for f in self.regressions]]
        return "\n".join(lines) + "\n"


def compare(
    candidate: RunView,
    baseline: RunView,
    cand_items: dict[str, dict[str, bool]],
    base_items: dict[str, dict[str, bool]],
    tol: Tolerances,
    skip: frozenset[str] = frozenset(),
) -> GateResult:
    """Every check runs, so the summary shows all that is wrong, not the first thing."""
    unknown = sorted(set(skip) - set(FIGURES))
    if unknown:
        raise InputError(
            f"--skip {unknown[0]}: not a figure the gate compares; known: {', '.join(FIGURES)}"
        )
    if set(skip) == set(FIGURES):
        raise InputError("--skip names every figure: the gate would compare nothing")
    result = GateResult(True)
    _candidate_state(result, candidate)
    if "accuracy" in skip:
        result.rows.append(("accuracy", "", "", "skipped (--skip accuracy)"))
    else:
        _accuracy(result, cand_items, base_items, tol)
    machines = candidate.tags.get(MACHINE), baseline.tags.get(MACHINE)
    same_machine = machines[0] is not None and machines[0] == machines[1]
    if not same_machine:
        result.rows.append(("machine", str(machines[0]), str(machines[1]), "not the same"))
    memory, memory_apart = _memory_metric(candidate, baseline)
    for figure, name, metric, limit, apart in (
        ("decode", "decode tok/s (p50)", "decode_tps_p50", -tol.speed_drop_pct, None),
        ("memory", f"memory MB ({memory})", memory, tol.memory_rise_pct, memory_apart),
    ):
        cand, base = candidate.metrics.get(metric), baseline.metrics.get(metric)
        if figure in skip:
            result.rows.append((name, _show(cand), _show(base), f"skipped (--skip {figure})"))
            continue
        if None in machines:
            apart = f"the machine it was measured on ({MACHINE}) is not recorded on both runs"
        elif not same_machine:
            apart = f"measured on different machines ({machines[0]} vs {machines[1]})"
        if apart:
            result.rows.append((name, _show(cand), _show(base), "not comparable"))
            result.refusals.append(f"{figure}: {apart}; --skip {figure} to gate without it")
        else:
            _relative(result, figure, name, metric, cand, base, limit)
    result.passed = not result.failures
    return result


def _candidate_state(result: GateResult, candidate: RunView) -> None:
    """A candidate that did not finish, or whose verdict says it is broken or was never
    judged, is not a release, whatever its figures."""
    status = candidate.tags.get("forgebench.status")
    verdict = candidate.tags.get("forgebench.verdict")
    finished = status == "done"
    judged = verdict is not None and not verdict.startswith(("broken", "unjudged"))
    result.rows.append(("candidate status", str(status), "", "ok" if finished else "not done"))
    result.rows.append(("candidate verdict", str(verdict), "", "judged" if judged else "refused"))
    if not finished:
        result.refusals.append(f"candidate status is {status!r}, not 'done': it did not finish")
    if verdict is None:
        result.refusals.append("candidate has no verdict (forgebench.verdict): it was not judged")
    elif not judged:
        why = candidate.tags.get("forgebench.verdict_reasons") or "no reasons recorded"
        result.refusals.append(f"candidate verdict is {verdict!r}: {why}")


def _accuracy(
    result: GateResult,
    cand_items: dict[str, dict[str, bool]],
    base_items: dict[str, dict[str, bool]],
    tol: Tolerances,
) -> None:
    """Paired per task. A baseline task the candidate lacks, or with no item in common, was
    not measured; a task only the candidate has is shown, with nothing to compare it to."""
    compared = refused = 0
    for task in sorted(set(cand_items) | set(base_items)):
        cand_task, base_task = cand_items.get(task, {}), base_items.get(task, {})
        shared = cand_task.keys() & base_task.keys()
        if not base_task:
            result.rows.append((f"{task} accuracy", f"{len(cand_task)} items", "", "no baseline"))
            continue
        if not shared:
            result.rows.append((f"{task} accuracy", f"{len(cand_task)} items", "", "not paired"))
            refused += 1
            result.refusals.append(
                f"{task}: no item scored on both runs ({len(cand_task)} on the candidate, "
                f"{len(base_task)} on the baseline); --skip accuracy to gate without it"
            )
            continue
        compared += 1
        cand = sum(cand_task[i] for i in shared) / len(shared)
        base = sum(base_task[i] for i in shared) / len(shared)
        lost, gained, p = mcnemar(base_task, cand_task)
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
            result.regressions.append(f"{task}: {cand:.3f} vs {base:.3f}, McNemar p={p:.3g}")
    if not compared and not refused:
        result.refusals.append(
            "accuracy: no evaluated task in common (no per-item samples on one side or both); "
            "--skip accuracy to gate without it"
        )


def _memory_metric(candidate: RunView, baseline: RunView) -> tuple[str, str | None]:
    """The memory figure to compare, and why it cannot be when the two runs report memory
    in two different ways (one on llama-server, one on Ollama)."""
    have = [[n for n in MEMORY if n in run.metrics] for run in (candidate, baseline)]
    common = [n for n in have[0] if n in have[1]]
    if common:
        return common[0], None
    if have[0] and have[1]:
        return have[0][0], (
            f"the candidate reports {have[0][0]}, the baseline {have[1][0]}: two different "
            "measures (llama-server's peak RSS, Ollama's /api/ps size), not comparable"
        )
    return (have[0] or have[1] or [MEMORY[0]])[0], None


def _measured(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _show(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.1f}"


def _relative(
    result: GateResult,
    figure: str,
    name: str,
    metric: str,
    cand: float | None,
    base: float | None,
    limit_pct: float,
) -> None:
    """Fail when the change passes limit_pct (negative: a drop, positive: a rise); a
    figure missing, zero or not finite on either side is not measured, and fails."""
    if not (_measured(cand) and _measured(base)):
        result.rows.append((name, _show(cand), _show(base), "not measured"))
        sides = [s for s, v in (("candidate", cand), ("baseline", base)) if not _measured(v)]
        result.refusals.append(
            f"{figure}: {metric} not measured on the {' and '.join(sides)}; "
            f"--skip {figure} to gate without it"
        )
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
        result.regressions.append(f"{name}: {cand:.1f} vs {base:.1f} ({change:+.1f}%)")
