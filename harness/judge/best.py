"""Which quant level (and route) to ship, per adapter, and why.

On each route the spec ran (merged, or the base GGUF with a LoRA GGUF, whose size counts
both files), the levels are walked in a fixed order, largest to smallest (a level's recipes
just before the plain level: `quant.rank`), and the walk
stops at the first level whose accuracy was not shown within tolerance (a verdict other
than "ok" or "slow"): testing in a fixed order and stopping at the first failure keeps
the family-wise error of the whole walk at the spec's confidence, so the pick carries it
(choosing the best-looking level among all would not). Among the walked cells whose
verdict is exactly "ok", the smallest file (or, with `by="speed"`, the fastest decode
for one user; with `by="throughput"`, the most aggregate tok/s under load, at the users a
load budget names, else at the concurrency each cell did best); beside it, the Pareto
front of accuracy against decode speed and size, so the trade-off the choice makes is
visible. A cell not judged ok is never shipped; with a load budget, "ok" was judged at
its load, and the choice says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness import quant
from harness.chain import CONTROL
from harness.errors import InputError
from harness.track import RunView, primary_task, schema

BY = ("size", "speed", "throughput")


@dataclass
class Choice:
    adapter: str
    row: RunView | None
    why: str
    front: list[RunView] = field(default_factory=list)


def dominates(a: RunView, b: RunView, task: str | None) -> bool:
    """a is at least as accurate, as fast and as small as b, and better in one."""
    pairs = [
        (a.accuracy(task), b.accuracy(task)),
        (a.decode_tps, b.decode_tps),
        (-(a.size_mb or 0), -(b.size_mb or 0)),
    ]
    if any(x is None or y is None for x, y in pairs):
        return False
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def pareto_front(rows: list[RunView], task: str | None) -> list[RunView]:
    done = [r for r in rows if r.status == "done"]
    return [r for r in done if not any(dominates(o, r, task) for o in done if o is not r)]


def is_ok(row: RunView) -> bool:
    return row.status == "done" and row.verdict == "ok"


def walked(rows: list[RunView]) -> tuple[list[RunView], list[RunView]]:
    """Per route, the levels from the largest down to the first whose accuracy was not
    shown within tolerance, at the spec's own serving setting: (the cells walked, with the
    serving settings of each level walked, and the cells the walks stopped at). A setting
    is a way to serve a level, not a step of the walk: one that loses answers is not ok,
    and stops nothing."""
    out, stops = [], []
    for route in dict.fromkeys(r.route for r in rows):
        mine = [r for r in rows if r.route == route]
        plain = sorted((r for r in mine if not r.setting), key=lambda r: quant.rank(r.quant))
        for row in plain:
            if row.status != "done" or row.verdict not in ("ok", "slow"):
                stops.append(row)
                break
            out += [row, *(r for r in mine if r.setting and r.level == row.quant)]
    return out, stops


def memory(row: RunView) -> float:
    """The cell's peak serving memory as the bench measured it; unmeasured sorts last."""
    found = row.metrics.get("memory_mb") or row.metrics.get("ollama_ps_size_mb")
    return found if found is not None else float("inf")


def rejection(row: RunView) -> str:
    """`main-q2_k: stupid (quantization): accuracy 0.41 < 0.60`; a cell that did not finish
    says its status too."""
    verdict = row.verdict or "no verdict"
    status = "" if row.status == "done" else f" (status {row.status or 'unknown'})"
    return f"{row.cell}: {verdict}{status}: {row.reasons or 'no reasons recorded'}"


def stated_load(rows: list[RunView]) -> tuple[str, float] | None:
    """The load a load budget named for the run, as verdicts were judged at it:
    ("users", 4) or ("rate", 2)."""
    for row in rows:
        if named := row.tags.get(schema.LOAD):
            kind, value = named.split("=")
            return kind, float(value)
    return None


def throughput(row: RunView, load: tuple[str, float] | None) -> tuple[float, int] | None:
    """(aggregate tok/s, concurrency): at the users a load budget names, else the
    concurrency the cell's load did best at; None where its load measured none."""
    if load is not None and load[0] == "users":
        users = int(load[1])
        found = row.throughput.get(users)
        return None if found is None else (found, users)
    return max(((v, c) for c, v in row.throughput.items()), default=None)


def check_by(rows: list[RunView], by: str) -> None:
    """`by` names a way to choose that the run measured (an InputError, one line, if not)."""
    if by not in BY:
        raise InputError(f"--by {by}: choose by one of {', '.join(BY)}")
    if by != "throughput":
        return
    if (load := stated_load(rows)) is not None and load[0] == "rate":
        raise InputError(
            f"--by throughput: the load budget names a rate ({load[1]:g} requests/s), at "
            "which every cell that keeps up serves the same tok/s; choose --by size or "
            "speed, or name users in budgets.load"
        )
    if not any(row.throughput for row in rows):
        raise InputError("--by throughput: no cell of the run measured a load: add load to measure")


def choose(rows: list[RunView], by: str = "size", route: str | None = None) -> list[Choice]:
    """One choice per adapter; with `route`, among that route's cells only (the untuned
    base has no route to choose)."""
    check_by(rows, by)
    task, load = primary_task(rows), stated_load(rows)
    if route is not None:
        rows = [r for r in rows if r.route == route or r.adapter == CONTROL]
    choices = []
    for adapter in dict.fromkeys(r.adapter for r in rows):
        mine = [r for r in rows if r.adapter == adapter]
        passed, stops = walked(mine)
        ok = [r for r in passed if is_ok(r)]
        front = pareto_front(mine, task)
        if not ok:
            rejected = "; ".join(rejection(r) for r in mine)
            why = f"no cell is ok: {rejected}"
            if any(is_ok(r) for r in mine):
                stopped = ", ".join(r.cell for r in stops)
                why = (
                    f"no cell is ok before the walk from the largest level stops (at "
                    f"{stopped}): a smaller level judged ok after a larger one that was not "
                    f"would not carry the stated confidence; {rejected}"
                )
            choices.append(Choice(adapter, None, why, front))
            continue
        if by == "speed":
            row = max(ok, key=lambda r: r.decode_tps or 0)
            reason = f"fastest decode ({row.decode_tps or 0:.0f} tok/s p50)"
        elif by == "throughput":
            measured = {r.cell: found for r in ok if (found := throughput(r, load))}
            if not measured:
                why = f"no cell judged ok measured its throughput under load{at(load)}"
                choices.append(Choice(adapter, None, why, front))
                continue
            row = max((r for r in ok if r.cell in measured), key=lambda r: measured[r.cell])
            tps, c = measured[row.cell]
            reason = f"most aggregate throughput ({tps:.0f} tok/s at {c} concurrent streams)"
        else:  # a level's settings share its file: the spec's own first, then the least memory
            row = min(ok, key=lambda r: (r.size_mb or float("inf"), bool(r.setting), memory(r)))
            reason = f"smallest file ({row.size_mb or 0:.1f} MB)"
        accuracy = row.accuracy(task)
        detail = f", {task} {accuracy:.2f}" if accuracy is not None and task else ""
        routes = {r.route for r in mine}
        named = len(routes) > 1 or route is not None
        shipped = f"{row.quant} by route {row.route}" if named else row.quant
        if row.setting:
            shipped = f"{row.level} served at {row.setting}" + shipped.removeprefix(row.quant)
        choices.append(
            Choice(
                adapter,
                row,
                f"{shipped}: {reason} among the {len(ok)} cells judged ok{at(load)}, "
                f"walking the levels largest first{detail}",
                front,
            )
        )
    return choices


def at(load: tuple[str, float] | None) -> str:
    if load is None:
        return ""
    kind, value = load
    return f" at {value:g} users" if kind == "users" else f" at {value:g} requests/s"
