"""How often the verdicts are right: the real rule (`harness.judge.verdict.judge`) on simulated
paired items, so a user knows what "ok" and "stupid" promise at the item counts they run.

Each simulated run is shaped like the quickstart: two adapters, levels f16, q4_k_m and
q2_k, a target task and a guard task, every model of the chain scored on the same items
(untuned HF -> tuned HF -> F16 -> level). Training gains `--gain` on the target task and
keeps the guard task; export and quantization each make the two models disagree on
`--disagreement` of the items. One link, the quantization of the first adapter's q4_k_m,
carries a true drop of 0, half the tolerance, the tolerance or twice it; the table shows,
per item count, how often that cell comes out ok, stupid and unjudged, and how often a run
with no true loss anywhere calls any cell stupid.

    python benchmarks/verdict_power.py [--runs 400] [--items 100 200 400] [--tolerance 0.1]

`--guard-items` and `--guard-tolerance` give the guard task its own item count and
tolerance (the quickstart's 80 capitals at 0.15); the "guard held" column is then the
probe's quantization link on the guard task.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from harness.judge.verdict import Figures, Scores, judge
from harness.spec import BudgetSpec

TARGET, GUARD = "target", "guard"
LEVELS = ("f16", "q4_k_m", "q2_k")
ADAPTERS = ("a", "b")
PROBE = "a-q4_k_m"


def step(rng: random.Random, items: list[bool], disagreement: float, drop: float) -> list[bool]:
    """The next model of the chain: on `disagreement` of the items (at least `drop`) it
    answers otherwise, losing (disagreement + drop) / 2 of them and gaining the rest."""
    disagreement = max(disagreement, abs(drop))
    right = sum(items) / len(items)
    lose = min(1.0, (disagreement + drop) / 2 / max(right, 1e-9))
    gain = min(1.0, max(0.0, (disagreement - drop) / 2 / max(1 - right, 1e-9)))
    return [(rng.random() >= lose) if x else (rng.random() < gain) for x in items]


def simulate(rng: random.Random, args: argparse.Namespace, n: int, probe_drop: float) -> dict:
    """One quickstart-shaped run: every cell's verdict."""
    base = {
        TARGET: [rng.random() < args.base_target for _ in range(n)],
        GUARD: [rng.random() < args.base_guard for _ in range(args.guard_items or n)],
    }
    references = {"base": scores("untuned HF", base)}
    cells = []
    for adapter in ADAPTERS:
        tuned = {
            TARGET: step(rng, base[TARGET], args.gain, -args.gain),
            GUARD: step(rng, base[GUARD], args.disagreement, 0.0),
        }
        references[adapter] = scores("tuned HF", tuned)
        f16 = {t: step(rng, v, args.disagreement, 0.0) for t, v in tuned.items()}
        for level in LEVELS:
            name = f"{adapter}-{level}"
            got = f16
            if level != "f16":
                drop = probe_drop if name == PROBE else 0.0
                got = {t: step(rng, v, args.disagreement, drop) for t, v in f16.items()}
            cells.append(figures(name, adapter, level, got))
    budgets = BudgetSpec(
        tolerance={"default": args.tolerance, GUARD: args.guard_tolerance or args.tolerance},
        confidence=args.confidence,
    )
    return judge(cells, budgets, references, [TARGET, GUARD], [GUARD])


def scores(label: str, items: dict[str, list[bool]]) -> Scores:
    out = Scores(label, items={t: {str(i): x for i, x in enumerate(v)} for t, v in items.items()})
    out.accuracy = {t: sum(v) / len(v) for t, v in items.items()}
    return out


def figures(cell: str, adapter: str, level: str, items: dict[str, list[bool]]) -> Figures:
    fig = Figures(cell, adapter, level, evaluated=True)
    fig.items = {t: {str(i): x for i, x in enumerate(v)} for t, v in items.items()}
    fig.accuracy = {t: sum(v) / len(v) for t, v in items.items()}
    return fig


def state(verdict: str) -> str:
    return "ok" if verdict == "ok" else "stupid" if "stupid" in verdict else "unjudged"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="simulated runs per row")
    parser.add_argument("--items", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--guard-items", type=int, help="the guard task's items (default: --items)")
    parser.add_argument("--guard-tolerance", type=float, help="(default: --tolerance)")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--disagreement", type=float, default=0.10, help="per export/quant step")
    parser.add_argument("--gain", type=float, default=0.30, help="training's true gain")
    parser.add_argument("--base-target", type=float, default=0.05)
    parser.add_argument("--base-guard", type=float, default=0.65)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tol = args.tolerance
    print(
        f"tolerance {tol:g}, confidence {args.confidence:g}, {args.disagreement:.0%} "
        f"disagreement per export/quant step, training gain {args.gain:g}, {args.runs} runs "
        "per row; the probed cell is a-q4_k_m\n"
    )
    print(
        "| items | true drop | link held | link lost | guard held | cell ok | cell stupid "
        "| cell unjudged | any stupid in the run |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.items:
        for drop in (0.0, tol / 2, tol, 2 * tol):
            cell, link, guard, any_stupid = Counter(), Counter(), Counter(), 0
            for _ in range(args.runs):
                verdicts = simulate(rng, args, n, drop)
                probe = verdicts[PROBE]
                cell[state(probe.verdict)] += 1
                quantization = [x for x in probe.links if x.step == "quantization"]
                link.update(x.state for x in quantization if x.task == TARGET)
                guard.update(x.state for x in quantization if x.task == GUARD)
                any_stupid += any(state(v.verdict) == "stupid" for v in verdicts.values())
            rate = {k: cell[k] / args.runs for k in ("ok", "stupid", "unjudged")}
            clean = f"{any_stupid / args.runs:.3f}" if drop == 0 else "-"
            print(
                f"| {n}{f'/{args.guard_items}' if args.guard_items else ''} | {drop:g} | "
                f"{link['held'] / args.runs:.3f} | "
                f"{link['lost'] / args.runs:.3f} | {guard['held'] / args.runs:.3f} | "
                f"{rate['ok']:.3f} | {rate['stupid']:.3f} | "
                f"{rate['unjudged']:.3f} | {clean} |"
            )


if __name__ == "__main__":
    main()
