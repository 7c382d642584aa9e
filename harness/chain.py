"""The one table of stages: every stage list in forgebench (the chain's order, the build
stages, the served ones, what `executor.resources` may name, the llama.cpp programs a
stage runs) is read from `ROLES` below. A leaf: it imports nothing from harness, so the
spec, the keys and the planner can all read it.

A role is the stage's name except where one stage serves twice: `reference_base` runs
the reference stage on the untuned base and `drift_tuning` runs the drift stage on the
untuned F16. Each role is its own Ray task unless it is served (the served roles of a
cell run in one task that holds the deployment, which `executor.resources` calls `serve`).
"""

from __future__ import annotations

from dataclasses import dataclass

CONTROL = "base"
"""The adapter name of the control cells, which run the untuned base through the chain."""
MERGE, ADAPTER = "merge", "adapter"
"""The routes: the adapter merged in PyTorch, then converted and quantized; or the base
converted and quantized once per level, served with the adapter as a LoRA GGUF."""


@dataclass(frozen=True)
class Role:
    name: str
    stage: str
    """The module under harness/stages/ that runs this role (part of every cache key)."""
    kind: str
    """build (makes the cell's files), reference (scored in PyTorch), served (on the
    deployed model) or drift (llama-perplexity, offline)."""
    llama_cpp: tuple[str, ...] | None = None
    """The llama.cpp programs the stage runs (llama-server besides, when a served stage is
    served by it); None when it runs no llama.cpp code."""
    advisory: bool = False
    """Its failure leaves the cell unjudged (or a note missing), not failed."""

    @property
    def own_task(self) -> bool:
        """Whether the stage runs as a Ray task of its own (served roles share one)."""
        return self.kind != "served"


ROLES = (
    Role("resolve", "resolve", "build"),
    Role("train", "train", "build"),
    Role("adopt", "adopt", "build"),
    Role("merge", "merge", "build"),
    Role("convert", "convert", "build", ()),
    Role("convert_lora", "convert_lora", "build", ()),
    Role("imatrix", "imatrix", "build", ("llama-imatrix",)),
    Role("quantize", "quantize", "build", ("llama-quantize",)),
    Role("reference_base", "reference", "reference", advisory=True),
    Role("reference", "reference", "reference", advisory=True),
    Role("check", "check", "served", ()),
    Role("evaluate", "evaluate", "served", ()),
    Role("bench", "bench", "served", ("llama-bench",)),
    Role("load", "load", "served", ("llama-batched-bench",)),
    Role("drift_base", "drift_base", "drift", ("llama-perplexity",)),
    Role("drift", "drift", "drift", ("llama-perplexity",)),
    Role("drift_tuning", "drift", "drift", ("llama-perplexity",), advisory=True),
)
"""Every role in chain order."""


def _roles(kind: str) -> tuple[str, ...]:
    return tuple(role.name for role in ROLES if role.kind == kind)


STAGES = tuple(role.name for role in ROLES)
"""Every role, in the chain's order."""
BUILD = _roles("build")
REFERENCES = _roles("reference")
"""PyTorch scores of the untuned base and of the cell's own HF model: the chain's start."""
SERVED = _roles("served")
"""Stages that need the cell's model deployed on a backend."""
ADVISORY = tuple(role.name for role in ROLES if role.advisory)
"""Roles whose failure leaves the cell unjudged (or a note missing), not failed."""
TASKS = tuple(dict.fromkeys(role.stage for role in ROLES if role.own_task))
"""The stages that run as Ray tasks of their own: what `executor.resources` may name,
besides `serve`."""
LLAMA_CPP = {role.stage: role.llama_cpp for role in ROLES if role.llama_cpp is not None}
"""The stages that run llama.cpp code, and the programs each runs."""
MEASUREMENTS = ("check", "evaluate", "bench", "load", "drift")
"""What `measure` may name: the served stages a user picks, and drift."""
DEFAULT_MEASUREMENTS = ("check", "evaluate", "bench", "drift")
"""What a spec measures unless it says: the load benchmark is asked for by name, as it
drives each cell at several concurrencies and takes minutes a cell."""
SERVED_MEASUREMENTS = tuple(m for m in MEASUREMENTS if m in SERVED)
"""The measurements made on a deployed model; drift reads the GGUFs with llama-perplexity."""
ADAPTERS = ("train", "adopt")
"""The roles that give a cell its adapter: trained here, or taken from a peft folder."""
ROUTE_BUILD = tuple(s for s in BUILD if s not in ("resolve", *ADAPTERS))
"""The stages whose files differ between the routes (the adapter is the same for both)."""
