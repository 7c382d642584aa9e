"""The release gate: is a candidate build no worse than the one in production?

Accuracy is judged as the verdicts judge it: non-inferiority on the same items, paired by
their content (the prompt as sent and the target, so two runs whose eval files differ
never pair unrelated items), with the one-sided bound of `harness.judge.paired` at the stated
confidence. The candidate passes on a task only when its drop against the baseline is
shown to be below the tolerance; a candidate scored on other items is refused. Speed and
memory fail when worse than the tolerated percentage. The summary is Markdown, for a CI
job to post.

The gate fails closed: it passes only what it compared, and only a candidate whose own
verdict is "ok" (or a label `--accept` names). A figure not measured
on both runs (a task with no paired items, decode speed or memory missing),
speed or memory taken on two different machines (`forgebench.machine`), or
memory reported two different ways (llama-server's `memory_mb`, Ollama's
`ollama_ps_size_mb`) fails it, unless that figure is named in `skip`; so does
a candidate that did not finish (`forgebench.status` not "done").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness import track
from harness.errors import InputError
from harness.judge import paired
from harness.judge.blame import drop_state
from harness.spec import DEFAULT_TOLERANCE
from harness.track import RunView, schema

FIGURES = ("accuracy", "decode", "memory")
"""What the gate compares, by the names `forgebench check --skip` takes."""
MEMORY = ("memory_mb", "ollama_ps_size_mb")
"""The memory figures, one per way of measuring (see harness/stages/bench.py)."""


@dataclass
class Tolerances:
    tolerance: float | None = None
    """The accuracy drop a task may lose against the baseline, shown at `confidence`; by
    default the task's tolerance in the candidate's own spec (its `link_e2e_<task>_tolerance`
    metric), else DEFAULT_TOLERANCE."""
    confidence: float | None = None
    """By default the candidate spec's (`forgebench.confidence`), else 0.95."""
    speed_drop_pct: float = 10.0
    memory_rise_pct: float = 10.0
    accept: frozenset[str] = frozenset()
    """Verdicts other than "ok" the candidate may carry (`--accept`), e.g. "slow"."""


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
            f"candidate `{candidate.cell}` "
            f"(run `{candidate.run_id}`) vs baseline "
            f"`{baseline.cell}` (run `{baseline.run_id}`)",
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
    _candidate_state(result, candidate, tol.accept)
    if "accuracy" in skip:
        result.rows.append(("accuracy", "", "", "skipped (--skip accuracy)"))
    else:
        _accuracy(result, cand_items, base_items, _Resolved(tol, candidate))
    machines = candidate.tags.get(schema.MACHINE), baseline.tags.get(schema.MACHINE)
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
            apart = (
                f"the machine it was measured on ({schema.MACHINE}) is not recorded on both runs"
            )
        elif not same_machine:
            apart = f"measured on different machines ({machines[0]} vs {machines[1]})"
        if apart:
            result.rows.append((name, _show(cand), _show(base), "not comparable"))
            result.refusals.append(f"{figure}: {apart}; --skip {figure} to gate without it")
        else:
            _relative(result, figure, name, metric, cand, base, limit)
    result.passed = not result.failures
    return result


@dataclass
class _Resolved:
    """The tolerance per task and the confidence the candidate was judged with, unless
    given: the gate judges by the same rule as the verdict it refuses to contradict."""

    given: Tolerances
    candidate: RunView

    def tolerance(self, task: str) -> float:
        if self.given.tolerance is not None:
            return self.given.tolerance
        return self.candidate.metrics.get(f"link_e2e_{task}_tolerance", DEFAULT_TOLERANCE)

    @property
    def confidence(self) -> float:
        return self.given.confidence or float(self.candidate.tags.get(schema.CONFIDENCE, 0.95))


def _candidate_state(result: GateResult, candidate: RunView, accept: frozenset[str]) -> None:
    """A candidate that did not finish, or whose own verdict is not "ok" (nor a label
    `--accept` names), is not a release, whatever its figures against the baseline."""
    status = candidate.tags.get(schema.STATUS)
    verdict = candidate.tags.get(schema.VERDICT)
    finished = status == "done"
    passing = verdict == "ok" or verdict in accept
    result.rows.append(("candidate status", str(status), "", "ok" if finished else "not done"))
    result.rows.append(
        ("candidate verdict", str(verdict), "", "accepted" if passing else "refused")
    )
    if not finished:
        result.refusals.append(f"candidate status is {status!r}, not 'done': it did not finish")
    if verdict is None:
        result.refusals.append("candidate has no verdict (forgebench.verdict): it was not judged")
    elif not passing:
        why = candidate.tags.get(schema.VERDICT_REASONS) or "no reasons recorded"
        result.refusals.append(
            f"candidate verdict is {verdict!r}, not 'ok': {why}; --accept '{verdict}' to "
            "release it anyway"
        )


def _accuracy(
    result: GateResult,
    cand_items: dict[str, dict[str, bool]],
    base_items: dict[str, dict[str, bool]],
    tol: _Resolved,
) -> None:
    """Non-inferiority per task, on the same items. A baseline task the candidate lacks, or
    scored on other items, was not measured; a task only the candidate has is shown, with
    nothing to compare it to."""
    compared = refused = 0
    for task in sorted(set(cand_items) | set(base_items)):
        cand_task, base_task = cand_items.get(task, {}), base_items.get(task, {})
        if not base_task:
            result.rows.append((f"{task} accuracy", f"{len(cand_task)} items", "", "no baseline"))
            continue
        if cand_task.keys() != base_task.keys():
            other = len(cand_task.keys() - base_task.keys())
            missing = len(base_task.keys() - cand_task.keys())
            result.rows.append((f"{task} accuracy", f"{len(cand_task)} items", "", "not paired"))
            refused += 1
            result.refusals.append(
                f"{task}: the candidate was scored on other items ({other} of its "
                f"{len(cand_task)} are not the baseline's, {missing} of the baseline's "
                f"{len(base_task)} are missing); score both on one eval set, or --skip accuracy"
            )
            continue
        compared += 1
        t = paired.table(base_task, cand_task)
        lower, upper = t.interval(tol.confidence)
        tolerance = tol.tolerance(task)
        state = drop_state(lower, upper, tolerance)
        held = state == "held"
        outcome = {"held": "ok", "lost": "regressed"}.get(state, "not shown within tolerance")
        interval = f"drop {t.drop:+.3f} [{lower:+.3f}, {upper:+.3f}] at {tol.confidence:.0%}"
        result.rows.append(
            (
                f"{task} accuracy ({t.n} paired items)",
                f"{(t.both + t.gained) / t.n:.3f}",
                f"{(t.both + t.lost) / t.n:.3f}",
                f"{outcome} ({interval}, tolerance {tolerance:g}; "
                f"lost {t.lost}, gained {t.gained})",
            )
        )
        if not held:
            result.regressions.append(f"{task}: {outcome}: {interval}, tolerance {tolerance:g}")
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


def against(
    uri: str,
    candidate: RunView,
    baseline_id: str,
    tol: Tolerances,
    skip: frozenset[str] = frozenset(),
) -> tuple[GateResult, RunView]:
    """`compare` on logged runs: the baseline read back from MLflow and both runs' per-item
    samples; what `forgebench check` and `forgebench release` gate with."""
    baseline = track.run_view(uri, baseline_id)
    result = compare(
        candidate,
        baseline,
        track.samples(uri, candidate.run_id),
        track.samples(uri, baseline_id),
        tol,
        skip,
    )
    return result, baseline
