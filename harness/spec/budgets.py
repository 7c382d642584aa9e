"""The spec's budgets: when a cell is slow or stupid, and the tolerance a task may lose.

Apart from the other sections because the judge reads them (the verdict, the gate) and
because the default tolerance is shared with those who report on a run.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from harness.spec.sections import Strict

DEFAULT_TOLERANCE = 0.05
"""The accuracy drop a task may lose when the spec does not say: five points, which a few
hundred items can show at the disagreement rates quantized small models have."""

RENAMED_BUDGETS = {
    "accuracy_drop_max": "a drop is judged against budgets.tolerance (per task) with an "
    "interval, not a point estimate; write tolerance: <fraction>",
    "significance": "bounds are stated by budgets.confidence (0.95 for significance 0.05)",
}


class Goodput(Strict):
    """The share of requests served within latency targets (the goodput of DistServe and
    vLLM's serving benchmark): a request counts when its time to first token and its time
    per output token after the first are both within the targets named."""

    share_min: float = Field(
        gt=0, le=1, description="slow if the share of requests meeting the targets is surely below"
    )
    ttft_ms_max: float | None = Field(None, gt=0, description="a request's time to first token")
    tpot_ms_max: float | None = Field(
        None, gt=0, description="a request's time per output token after its first"
    )

    @model_validator(mode="after")
    def _a_target(self) -> Goodput:
        if self.ttft_ms_max is None and self.tpot_ms_max is None:
            raise ValueError("name ttft_ms_max or tpot_ms_max: the targets a request must meet")
        return self


class LoadBudget(Strict):
    """Budgets at a stated load, which the load stage drives (`measure: [load]`): `users`
    concurrent streams, or `rate` requests per second arriving at random (Poisson), so
    "slow" can mean slow at the load a deployment serves."""

    users: int | None = Field(None, gt=0, description="concurrent streams the budgets hold at")
    rate: float | None = Field(
        None, gt=0, description="requests per second, arriving at random, the budgets hold at"
    )
    decode_tps_min: float | None = Field(
        None, gt=0, description="slow if each user's median decode tok/s is surely below"
    )
    ttft_ms_p95_max: float | None = Field(
        None, gt=0, description="slow if the p95 time to first token is surely above"
    )
    goodput: Goodput | None = Field(
        None, description="{share_min, ttft_ms_max, tpot_ms_max}: requests within targets"
    )

    @model_validator(mode="after")
    def _a_load_and_a_budget(self) -> LoadBudget:
        if (self.users is None) == (self.rate is None):
            raise ValueError("name the load as users (concurrent streams) or rate (requests/s)")
        if self.decode_tps_min is None and self.ttft_ms_p95_max is None and not self.goodput:
            raise ValueError("name decode_tps_min, ttft_ms_p95_max or goodput to hold at this load")
        return self

    @property
    def at(self) -> str:
        """`at 4 users`, `at 2 requests/s`: the load, as reasons say it."""
        return f"at {self.users} users" if self.users else f"at {self.rate:g} requests/s"


class BudgetSpec(Strict):
    """When a cell is "slow" (misses a speed or memory budget) or "stupid" (loses accuracy
    beyond a task's tolerance, shown at the stated confidence, or drifts from its F16)."""

    decode_tps_min: float | None = Field(
        None,
        gt=0,
        description="slow if the median decode tok/s of the bench's fixed-length requests is "
        "surely below (its upper bound at the stated confidence is)",
    )
    decode_speedup_min: float | None = Field(
        None,
        gt=0,
        description="slow if the median decode is surely below this many times the median of "
        "the F16 of the same adapter and route, measured in the same run (means the same on "
        "every CPU)",
    )
    ttft_ms_p95_max: float | None = Field(
        None,
        gt=0,
        description="slow if the p95 time to first token of the bench's requests is surely "
        "above (its lower bound at the stated confidence is); bounding a p95 at 95% takes 59 "
        "requests",
    )
    memory_mb_max: float | None = Field(None, gt=0, description="slow if peak memory is above")
    tolerance: float | dict[str, float] = Field(
        DEFAULT_TOLERANCE,
        description="the accuracy drop a task may lose, as a fraction: one for every task, "
        "or per task name ({arithmetic: 0.1, default: 0.05})",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1,
        description="of every one-sided bound: an ok link's drop is below its tolerance, a "
        "stupid cell's beyond it, at this confidence (run-wide, by Holm, for stupid)",
    )
    min_gain: float = Field(
        0.0, ge=0, lt=1, description="training must surely raise a target task by more"
    )
    kld_max: float | None = Field(None, gt=0, description="stupid if mean KLD from F16 is above")
    load: LoadBudget | None = Field(
        None,
        description="speed budgets at a stated load: {users or rate, decode_tps_min, "
        "ttft_ms_p95_max, goodput}",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for old, new in RENAMED_BUDGETS.items():
                if old in raw:
                    raise ValueError(f"budgets.{old} is gone: {new}")
        return raw

    @field_validator("tolerance")
    @classmethod
    def _fractions(cls, tolerance: float | dict[str, float]) -> float | dict[str, float]:
        values = tolerance.values() if isinstance(tolerance, dict) else [tolerance]
        if any(not 0 < v < 1 for v in values):
            raise ValueError("a tolerance is a fraction of the items, above 0 and below 1")
        return tolerance

    def tolerance_of(self, task: str) -> float:
        if isinstance(self.tolerance, dict):
            return self.tolerance.get(task, self.tolerance.get("default", DEFAULT_TOLERANCE))
        return self.tolerance
