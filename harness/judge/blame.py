"""The blame chain: which step of the chain lost the quality, with a stated confidence.

Every cell is the end of a chain of models, each scored on the same items:

    untuned HF -> tuned HF -> F16 GGUF (served) -> quantized level (served) -> setting
             training     export              quantization                serving

(the last link only for a serving setting that can change answers, harness.spec.serving:
the same GGUF served at the spec's own setting, then at this one).

Each arrow is a link: a paired comparison on the items both models scored, with a
one-sided interval on the accuracy drop (`harness.judge.paired`). A link is one of:

- "held": the drop is surely below the task's tolerance (its upper bound is), or, for
  training on a target task, the gain is surely above the spec's minimum gain;
- "lost": the drop is surely above the tolerance (its lower bound is);
- "no gain": training on a target task did not surely gain the minimum;
- "unjudged": a score is missing or failed, the items do not pair up, or the interval
  straddles the tolerance; the link then says about how many items would decide it at
  the disagreement seen.

Beside the steps, every cell has an "end to end" link on each task: from the tuned HF
model on a target task (what training made, as shipped), from the untuned HF model on a
guard task (what the user had). A cell is "stupid" when an end-to-end drop is surely
beyond the tolerance, with the family-wise error held across the run (`harness.judge.verdict`);
the steps blamed are those whose own drop is surely above zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.judge import paired

STEPS = ("training", "export", "quantization", "serving")
END_TO_END = "end to end"


@dataclass
class Scores:
    """One model's results: task -> accuracy, task -> item id -> correct."""

    label: str
    accuracy: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, bool]] = field(default_factory=dict)
    error: str | None = None
    """Why there are no scores (a failed or missing stage)."""


@dataclass(frozen=True)
class Rule:
    """What a link is judged by: the task's tolerance on a drop, the confidence of every
    bound, and the gain training must show on a target task."""

    tolerance: float
    confidence: float
    min_gain: float = 0.0


def drop_state(lower: float, upper: float, tolerance: float) -> str:
    """The one rule for a drop's interval against a tolerance: "held" when its upper bound
    is below the tolerance, "lost" when its lower bound is above it, else "unjudged". The
    chain's links and the release gate both decide with it."""
    if upper < tolerance:
        return "held"
    if lower > tolerance:
        return "lost"
    return "unjudged"


@dataclass
class Link:
    step: str
    task: str
    reference: str
    candidate: str
    state: str
    """"held", "lost", "no gain" or "unjudged"."""
    why: str = ""
    guard: bool = False
    gain: bool = False
    """Training on a target task: it must earn a gain, not only keep the accuracy."""
    rule: Rule | None = None
    table: paired.Table | None = None
    lower: float | None = None
    upper: float | None = None
    p_beyond: float | None = None
    """One-sided p of "the drop is above the tolerance" (end-to-end links)."""

    @property
    def blame(self) -> str:
        """The step as the verdict names it."""
        if self.step == "training" and self.guard:
            return "training: forgetting"
        if self.state == "no gain":
            return "training: no gain"
        return self.step

    @property
    def dropped(self) -> bool:
        """The drop is surely above zero."""
        return self.lower is not None and self.lower > 0

    @property
    def key(self) -> str:
        return "e2e" if self.step == END_TO_END else self.step

    def metrics(self) -> dict[str, float]:
        if self.table is None:
            return {}
        prefix = f"link_{self.key}_{self.task}"
        values = {
            "drop": self.table.drop,
            "drop_lower": self.lower,
            "drop_upper": self.upper,
            "tolerance": self.rule.tolerance if self.rule else None,
            "p_beyond": self.p_beyond,
            "lost": float(self.table.lost),
            "gained": float(self.table.gained),
            "items": float(self.table.n),
        }
        return {f"{prefix}_{k}": v for k, v in values.items() if v is not None}


def compare(
    step: str,
    task: str,
    reference: Scores | None,
    candidate: Scores | None,
    rule: Rule,
    guard: bool = False,
) -> Link:
    """One link of the chain on one task."""
    names = (reference.label if reference else "reference", candidate.label if candidate else "")
    gain = step == "training" and not guard
    link = Link(step, task, *names, state="unjudged", guard=guard, gain=gain, rule=rule)
    for side in (reference, candidate):
        if side is None or side.error or task not in side.items:
            what = side.label if side else f"the {step} reference"
            reason = side.error if side and side.error else "not scored"
            link.why = f"no {what} score on {task} ({reason})"
            return link
    t = paired.table(reference.items[task], candidate.items[task])
    if t.n == 0:
        link.why = f"{task}: {reference.label} and {candidate.label} share no items"
        return link
    link.table = t
    link.lower, link.upper = t.interval(rule.confidence)
    if step == END_TO_END:
        link.p_beyond = t.p_beyond(rule.tolerance)
    head = (
        f"{task} {candidate.label} {_acc(t, 'candidate')} vs {reference.label} "
        f"{_acc(t, 'reference')}"
    )
    if gain:
        return _gained(link, t, head)
    interval = f"{t.drop:+.2f} [{link.lower:+.2f}, {link.upper:+.2f}]"
    tol = rule.tolerance
    link.state = drop_state(link.lower, link.upper, tol)
    if link.state == "held":
        link.why = f"{head}: {step} drop {interval}, within tolerance {tol:g}"
    elif link.state == "lost":
        link.why = f"{head}: {step} drop {interval}, beyond tolerance {tol:g}"
    else:
        link.why = f"{head}: {step} drop {interval} straddles tolerance {tol:g}; " + _more(
            t, tol, rule.confidence
        )
    return link


def _gained(link: Link, t: paired.Table, head: str) -> Link:
    """Training on a target task: held when the gain is surely above the minimum."""
    rule = link.rule
    gain = f"gain {-t.drop:+.2f} [{-link.upper:+.2f}, {-link.lower:+.2f}]"
    wanted = f"surely above {rule.min_gain:g}" if rule.min_gain else "surely above zero"
    if -link.upper > rule.min_gain:
        link.state = "held"
        link.why = f"{head}: training {gain}, {wanted} at {rule.confidence:.0%}"
    else:
        link.state = "no gain"
        more = "" if -t.drop <= rule.min_gain else "; " + _more(t, -rule.min_gain, rule.confidence)
        link.why = f"{head}: training {gain}, not {wanted} at {rule.confidence:.0%}{more}"
    return link


def _more(t: paired.Table, threshold: float, confidence: float) -> str:
    needed = t.items_to_decide(threshold, confidence)
    if needed is None:
        return "the drop seen sits on it, so no item count decides it"
    return f"about {needed} items would decide it at the disagreement seen ({t.n} now)"


def _acc(t: paired.Table, side: str) -> str:
    right = t.both + (t.lost if side == "reference" else t.gained)
    return f"{right / t.n:.2f}"
