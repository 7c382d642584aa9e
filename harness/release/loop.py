"""One release, as a scheduler runs it: the spec's run (done by the caller), its pick, the
gate against the champion, and only on a pass the deployment and the alias.

The order makes a kill harmless. Nothing that users are served changes before the gate has
passed and the new model has passed the chat check on Ollama under a name of its own; the
stable name then moves to it in one step, and the alias last. A kill between the two leaves
Ollama serving the new build and the alias on the old one, and the rerun (every stage
cached) passes the same gate on the same figures and moves the alias: both places then
name the new build. When no champion exists yet, the first build judged "ok" becomes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness import quant, track
from harness.errors import InputError
from harness.judge import gate
from harness.judge.best import choose
from harness.plan.cells import Cell
from harness.plan.store import Store
from harness.release.ship import STABLE, NotShipped, ship
from harness.run.outcomes import RunSummary
from harness.spec import Spec
from harness.track import RunView, connect, results, schema


@dataclass
class Outcome:
    promoted: bool
    lines: list[str] = field(default_factory=list)
    """The Markdown summary for the job log."""

    @property
    def markdown(self) -> str:
        return "\n".join(self.lines) + "\n"


def release(
    spec: Spec,
    cells: list[Cell],
    store: Store,
    summary: RunSummary,
    model: str,
    alias: str = "champion",
    by: str = "size",
    tolerances: gate.Tolerances | None = None,
) -> Outcome:
    """Gate the spec's pick against MODEL@ALIAS and, on a pass, ship and promote it. When no
    cell can ship, its largest finished level is still gated, so the summary says what
    regressed against the champion and by how much, not only that the build is not ok."""
    uri = summary.tracking_uri
    adapter = shipped_adapter(spec)
    rows = results.load(uri, summary.experiment, summary.parent_run_id).rows
    [choice] = [c for c in choose(rows, by) if c.adapter == adapter]
    head = f"## forgebench release {model}"
    candidate = choice.row or _largest_done(rows, adapter)
    lines = [] if choice.row else [f"No cell of `{adapter}` can ship: {choice.why}"]
    if candidate is None:
        return _rejected(head, lines, model, alias)
    picked = choice.why if choice.row else "gated for the record"
    lines.append(
        f"candidate `{summary.experiment}:{candidate.cell}` (run `{candidate.run_id}`): {picked}"
    )
    if parent := candidate.params.get("lora.resume_from_key"):
        lines.append(f"continues the adapter {parent} (`lora.resume_from`)")
    champion = _champion(uri, model, alias)
    if champion is not None:
        result, baseline = gate.against(uri, candidate, champion, tolerances or gate.Tolerances())
        lines += ["", result.markdown(candidate, baseline).rstrip()]
        if not result.passed:
            return _rejected(head, lines, model, alias)
    if choice.row is None:
        return _rejected(head, lines, model, alias)
    if champion is None:
        lines.append(f"no {model}@{alias} yet: this build becomes it")
    cell = next(c for c in cells if c.name == candidate.cell)
    try:
        shipped = ship(spec, cell, store, model)
    except NotShipped as refused:
        return _rejected(head, [*lines, "", str(refused)], model, alias)
    gguf = candidate.tags.get(schema.GGUF)
    version = track.set_alias(uri, model, alias, candidate.run_id, Path(gguf) if gguf else None)
    lines += [
        "",
        f"deployed: Ollama `{shipped.name}` (digest {shipped.digest}, was "
        f"{shipped.replaced or 'absent'})",
        f"promoted: {model}@{alias} -> version {version}",
    ]
    return Outcome(True, [f"{head}: PROMOTED", "", *lines])


def _largest_done(rows: list[RunView], adapter: str) -> RunView | None:
    """The adapter's finished cell at the largest level: what a rejected build is gated on."""
    done = [r for r in rows if r.adapter == adapter and r.status == "done"]
    return min(done, key=lambda r: quant.rank(r.quant), default=None)


def _rejected(head: str, lines: list[str], model: str, alias: str) -> Outcome:
    unchanged = f"{model}@{alias} and {model}:{STABLE} are unchanged."
    return Outcome(False, [f"{head}: REJECTED", "", *lines, "", unchanged])


def shipped_adapter(spec: Spec) -> str:
    """The one adapter a release ships (a nightly spec trains one); checked before the run."""
    names = [lora.name for lora in spec.lora]
    if len(names) != 1:
        raise InputError(
            f"{spec.where('lora')}: a release ships one adapter and this spec has "
            f"{len(names)} ({', '.join(names)}); keep one"
        )
    return names[0]


def _champion(uri: str, model: str, alias: str) -> str | None:
    """The run MODEL@ALIAS names, None when the model or the alias does not exist yet."""
    client = connect.reader(uri)
    try:
        return client.get_model_version_by_alias(model, alias).run_id
    except Exception:  # mlflow's RestException: no such model, or no such alias
        return None
