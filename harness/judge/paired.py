"""Paired accuracy differences with a stated confidence: the statistics every verdict and
the release gate decide with.

Two models scored on the same items form a paired 2x2 table: `both` right, `lost` (the
reference right, the candidate wrong), `gained` (the other way), `neither`. The drop is
`(lost - gained) / n`, the reference's accuracy minus the candidate's.

Its interval is Newcombe's hybrid score interval for paired proportions ("square and
add", method 10 of Newcombe 1998, Stat Med 17:2635), with his continuity-corrected
correlation: a closed form with good coverage at the item counts a quick eval has
(Fagerland, Lydersen and Laake 2013 recommend it), where the Wald interval is too short.
No well-kept Python library has a paired-difference interval (statsmodels has it for
independent samples only), so it is here, with tests against the published values of
Fagerland, Lydersen and Laake's "Statistical Analysis of Contingency Tables", chapter 8.

Every bound is one-sided at the stated confidence (the two-sided interval at
`2 * confidence - 1`): a drop "surely below" the tolerance has its upper bound below it.
Decisions across a run's cells and tasks are held to a family-wise error rate by Holm's
step-down procedure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

__all__ = [
    "Table",
    "accuracy_interval",
    "holm",
    "smallest_tolerance",
    "table",
]


@dataclass(frozen=True)
class Table:
    """The paired 2x2 table of a reference and a candidate on their shared items."""

    both: int
    lost: int
    gained: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.lost + self.gained + self.neither

    @property
    def drop(self) -> float:
        return (self.lost - self.gained) / self.n

    @property
    def discordant(self) -> float:
        """The share of items the two models disagree on."""
        return (self.lost + self.gained) / self.n

    def interval(self, confidence: float) -> tuple[float, float]:
        """One-sided bounds on the drop at `confidence` each: (lower, upper)."""
        return _newcombe(self, _z(confidence))

    def p_beyond(self, tolerance: float) -> float:
        """One-sided p-value of "the drop is above `tolerance`": the smallest 1 - confidence
        at which the lower bound clears it (1.0 when the drop seen does not)."""
        if self.drop <= tolerance:
            return 1.0
        low, high = 0.0, 40.0
        if _newcombe(self, high)[0] > tolerance:
            return 0.0
        for _ in range(100):  # the lower bound falls as z grows: bisect on z
            mid = (low + high) / 2
            low, high = (mid, high) if _newcombe(self, mid)[0] > tolerance else (low, mid)
        return 1 - NormalDist().cdf(low)

    def items_to_decide(self, threshold: float, confidence: float) -> int | None:
        """About how many items, at the discordance and drop seen, would put the interval
        on one side of `threshold`; None when the drop seen sits on it (no count decides)."""
        lower, upper = self.interval(confidence)
        gap = threshold - self.drop
        if abs(gap) < 1e-9:
            return None
        half = (upper - self.drop) if gap > 0 else (self.drop - lower)
        return max(self.n + 1, math.ceil(self.n * (half / abs(gap)) ** 2))


def table(reference: dict[str, bool], candidate: dict[str, bool]) -> Table:
    """The paired table on the items both scored."""
    shared = reference.keys() & candidate.keys()
    both = sum(1 for i in shared if reference[i] and candidate[i])
    lost = sum(1 for i in shared if reference[i] and not candidate[i])
    gained = sum(1 for i in shared if candidate[i] and not reference[i])
    return Table(both, lost, gained, len(shared) - both - lost - gained)


def smallest_tolerance(n: int, confidence: float) -> float:
    """The upper bound on the drop with n items and no disagreement at all, at the ceiling
    (or floor) of the task, where it is widest: z^2 / (n + z^2). A tolerance at or below it
    can never be shown, whatever the models do."""
    z2 = _z(confidence) ** 2
    return z2 / (n + z2)


def accuracy_interval(accuracy: float, n: int, confidence: float = 0.975) -> tuple[float, float]:
    """The Wilson interval of one model's accuracy on n items (each side at `confidence`:
    the default is the two-sided 95% interval), for plots and tables."""
    return _wilson(round(accuracy * n), n, _z(confidence))


def holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down rejections at family-wise error `alpha`, in the order given."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        rejected[i] = True
    return rejected


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    centre = (2 * successes + z * z) / (2 * (n + z * z))
    p = successes / n
    half = z * math.sqrt(z * z + 4 * successes * (1 - p)) / (2 * (n + z * z))
    return centre - half, centre + half


def _newcombe(t: Table, z: float) -> tuple[float, float]:
    """Newcombe's method 10 at normal quantile z: the Wilson intervals of the two
    accuracies, combined with their correlation phi (shrunk by n/2 when positive, his
    continuity correction; 0 when a margin is empty)."""
    n = t.n
    p1, p2 = (t.both + t.lost) / n, (t.both + t.gained) / n
    l1, u1 = _wilson(t.both + t.lost, n, z)
    l2, u2 = _wilson(t.both + t.gained, n, z)
    margins = (
        (t.both + t.lost) * (t.gained + t.neither) * (t.both + t.gained) * (t.lost + t.neither)
    )
    cross = t.both * t.neither - t.lost * t.gained
    if cross > 0:
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(margins) if margins else 0.0
    drop = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return drop - math.sqrt(max(below, 0.0)), drop + math.sqrt(max(above, 0.0))
