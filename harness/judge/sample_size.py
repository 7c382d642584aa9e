"""How many items each task has, and what tolerance they can decide.

A link is "held" only when the upper bound on its drop is below the task's tolerance.
With n items the bound cannot fall below z^2 / (n + z^2) even when the two models agree
on every item (`harness.judge.paired.smallest_tolerance`), so a tolerance at or below it could
never be shown: every cell would be "unjudged" after the whole run. `check` refuses such
a spec before anything runs; `describe` tells `plan` what each task can decide, at no
disagreement and at the disagreement a quantized small model typically shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from harness import data
from harness.data import evals
from harness.errors import InputError
from harness.judge import paired, speed
from harness.spec import Spec
from harness.stages import bench

TYPICAL_DISAGREEMENT = 0.10
"""Items two models of one chain answer differently, as the quickstart shows (10-20%)."""


@dataclass
class TaskItems:
    task: str
    items: int
    tolerance: float
    smallest: float
    """The smallest tolerance the items can show, with no disagreement at all."""
    typical: float
    """The upper bound with no drop at TYPICAL_DISAGREEMENT."""

    def describe(self, confidence: float) -> str:
        return (
            f"{self.task}: {self.items} items, tolerance {self.tolerance:g}; at {confidence:.0%} "
            f"they can show drops below {self.smallest:.3f} with no disagreement, below "
            f"{self.typical:.3f} at {TYPICAL_DISAGREEMENT:.0%} disagreement"
        )


def items(spec: Spec) -> dict[str, int]:
    """task -> the items it will be scored on (after evaluate.limit)."""
    out = {}
    for task in spec.evaluate.all_tasks:
        if isinstance(task, str):
            name = task
            if task == "arithmetic":
                count = spec.data.n_eval
            else:
                path = evals.GSM8K_DATA if task == "gsm8k" else evals.CAPITALS_DATA
                count = sum(1 for _, line in data.lines(path) if line.strip())
        else:
            name, count = task.name, evals.check_qa_jsonl(task.path, task.scorer, task.regex)
        out[name] = min(count, spec.evaluate.limit or count)
    return out


def plan(spec: Spec) -> list[TaskItems]:
    if "evaluate" not in spec.measure:
        return []
    confidence = spec.budgets.confidence
    out = []
    for task, n in items(spec).items():
        half = round(n * TYPICAL_DISAGREEMENT / 2)
        right = (n - 2 * half) // 2
        typical = paired.Table(right, half, half, n - 2 * half - right).interval(confidence)[1]
        tolerance = spec.budgets.tolerance_of(task)
        smallest = paired.smallest_tolerance(n, confidence)
        out.append(TaskItems(task, n, tolerance, smallest, typical))
    return out


def require_decidable(spec: Spec) -> None:
    """Refuse a task whose items can never show its tolerance, and a speed budget whose
    figure the bench's requests can never bound."""
    _requests(spec)
    z2 = NormalDist().inv_cdf(spec.budgets.confidence) ** 2
    for task in plan(spec):
        if task.tolerance <= task.smallest:
            needed = math.floor(z2 / task.tolerance - z2) + 1
            raise InputError(
                f"{spec.where('budgets', 'tolerance')}: {task.task} has {task.items} items, and "
                f"at confidence {spec.budgets.confidence:g} they cannot show a drop below "
                f"{task.smallest:.3f} even with no disagreement, so tolerance {task.tolerance:g} "
                f"could never be shown; score at least {needed} items, or raise the tolerance"
            )


def _requests(spec: Spec) -> None:
    """A budget on the median decode rate needs 5 requests at 95% (its bounds are order
    statistics), one on the p95 TTFT 59: fewer, and every cell would be unjudged."""
    prompts = len(bench.prompts())
    made = spec.bench.repeats * prompts
    budgets = spec.budgets
    wanted = [
        ("ttft_ms_p95_max", 0.95, "a p95"),
        ("decode_tps_min", 0.5, "a median"),
        ("decode_speedup_min", 0.5, "a median"),
    ]
    for budget, q, what in wanted:
        needed = speed.needed(q, budgets.confidence)
        if getattr(budgets, budget) is not None and made < needed:
            raise InputError(
                f"{spec.where('budgets', budget)}: {what} is bounded at confidence "
                f"{budgets.confidence:g} only from {needed} requests, and the bench makes "
                f"{made} ({spec.bench.repeats} repeats of {prompts} prompts); set "
                f"bench.repeats: {math.ceil(needed / prompts)}, or drop the budget"
            )
