"""The blame chain: which step of the chain lost the quality.

Every cell is the end of a chain of models, each scored on the same items:

    untuned HF -> tuned HF -> F16 GGUF (served) -> quantized level (served)
             training     export              quantization

Each arrow is a paired comparison (exact McNemar on the items both scored, with
the accuracy drop), so a cell that lost accuracy is blamed on the step that lost
it, not only on its distance from its own F16. A link is one of:

- "lost": the drop exceeds `accuracy_drop_max` and chance does not explain it;
- "held": no such drop, and the items could have shown one (`detectable` says
  the smallest drop they could show significant);
- "unjudged": the reference is missing or failed, the items do not pair up, or
  the reference is at the floor of the task (too few right items for any loss to
  be significant), so nothing could have been detected;
- "n/a": a training link on a task the untuned base cannot do at all (a floor
  reference there means training cannot have lost anything; it is what training
  is for). Guard tasks are the exception: a guard task the base cannot do is
  unjudged, since it is there to show forgetting.

A reference at the ceiling can still lose items, so it stays informative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STEPS = ("training", "export", "quantization")


@dataclass
class Scores:
    """One model's results: task -> accuracy, task -> item id -> correct."""

    label: str
    accuracy: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, bool]] = field(default_factory=dict)
    error: str | None = None
    """Why there are no scores (a failed or missing stage)."""


@dataclass
class Link:
    step: str
    task: str
    reference: str
    candidate: str
    state: str
    """"lost", "held", "unjudged" or "n/a"."""
    why: str = ""
    n: int = 0
    drop: float | None = None
    p: float | None = None
    lost: int = 0
    gained: int = 0
    detectable: float | None = None
    guard: bool = False

    @property
    def blame(self) -> str:
        """The step as the verdict names it."""
        return "training: forgetting" if self.step == "training" and self.guard else self.step

    def metrics(self) -> dict[str, float]:
        prefix = f"link_{self.step}_{self.task}"
        values = {
            "drop": self.drop,
            "p": self.p,
            "lost": float(self.lost),
            "gained": float(self.gained),
            "detectable": self.detectable,
            "items": float(self.n),
        }
        return {f"{prefix}_{k}": v for k, v in values.items() if v is not None}


def mcnemar(reference: dict[str, bool], candidate: dict[str, bool]) -> tuple[int, int, float]:
    """Exact McNemar on paired items: (ref right & cand wrong, ref wrong & cand right, p)."""
    from scipy.stats import binomtest

    shared = reference.keys() & candidate.keys()
    lost = sum(1 for i in shared if reference[i] and not candidate[i])
    gained = sum(1 for i in shared if candidate[i] and not reference[i])
    if lost + gained == 0:
        return 0, 0, 1.0
    return lost, gained, float(binomtest(lost, lost + gained, 0.5).pvalue)


def needed_losses(n: int, drop_max: float, significance: float) -> int:
    """The fewest lost items (none gained) that would count as a loss on n paired items:
    the exact two-sided McNemar p of m losses and no gains is 2 * 0.5**m, and the drop
    m/n must exceed drop_max."""
    significant = math.floor(math.log2(2 / significance)) + 1
    beyond_budget = math.floor(drop_max * n + 1e-9) + 1
    return max(significant, beyond_budget)


def compare(
    step: str,
    task: str,
    reference: Scores | None,
    candidate: Scores | None,
    drop_max: float,
    significance: float,
    guard: bool = False,
) -> Link:
    """One link of the chain on one task."""
    names = (reference.label if reference else "reference", candidate.label if candidate else "")
    link = Link(step, task, *names, state="unjudged", guard=guard)
    for side in (reference, candidate):
        if side is None or side.error or task not in side.items:
            what = side.label if side else f"the {step} reference"
            reason = side.error if side and side.error else "not scored"
            link.why = f"no {what} score on {task} ({reason})"
            return link
    ref, cand = reference.items[task], candidate.items[task]
    shared = ref.keys() & cand.keys()
    link.n = len(shared)
    if not shared:
        link.why = f"{task}: {reference.label} and {candidate.label} share no items"
        return link
    link.lost, link.gained, link.p = mcnemar(ref, cand)
    link.drop = (sum(ref[i] for i in shared) - sum(cand[i] for i in shared)) / len(shared)
    needed = needed_losses(len(shared), drop_max, significance)
    link.detectable = needed / len(shared)
    right = sum(ref[i] for i in shared)
    if right < needed:
        floor = (
            f"{reference.label} gets {right} of {len(shared)} {task} items right; a loss needs "
            f"{needed} lost items to show at p<{significance:g}"
        )
        if step == "training" and not guard:
            link.state, link.why = "n/a", f"{floor}: the untuned base cannot do this task"
        else:
            link.why = f"{floor}: the reference is at the floor, nothing could be detected"
        return link
    lost = link.drop > drop_max and link.p < significance
    link.state = "lost" if lost else "held"
    link.why = (
        f"{task} {candidate.label} {_acc(cand, shared)} vs {reference.label} {_acc(ref, shared)} "
        f"({step}: lost {link.lost}, gained {link.gained}, McNemar p={link.p:.3g}"
        + (")" if lost else f"; could show drops >= {link.detectable:.2f})")
    )
    return link


def _acc(items: dict[str, bool], shared: set[str]) -> str:
    return f"{sum(items[i] for i in shared) / len(shared):.2f}"
