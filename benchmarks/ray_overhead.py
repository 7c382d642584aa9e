"""What the Ray executor costs on one machine, and how a spec's work would divide on K.

Runs one spec three times from an empty store each time: serially, on a local Ray with
one CPU (one task at a time, as the serial run: the ratio of the two wall times is Ray's
overhead), and on a local Ray with every CPU of this machine (independent builds side by
side). Then, from the serial run's recorded stage times (the store's manifests), the
task graph's critical path against its total work: with K nodes a run takes at least
max(critical path, total / K).

    python benchmarks/ray_overhead.py [--spec path.yaml]

The default spec is small (2 adapters x 3 levels on SmolLM2, a short training, check and
evaluate) so that the three runs take minutes, not an hour.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # a token of this run's, none left in ~/.ray
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import ray
from rich.console import Console
from rich.table import Table

from harness import chain, host, pipeline, spec
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.run import outcomes
from harness.run.executor import Serial
from harness.run.ray import RayExecutor

SPEC = """\
name: ray-overhead
base: {model: smollm2-135m}
data: {task: arithmetic, n_train: 96, n_eval: 24, seed: 5}
train: {epochs: 1, lr: 3.0e-4, batch_size: 8, max_seq_len: 96, seed: 0}
lora:
  - {name: a, r: 4, alpha: 8, target_modules: [q_proj]}
  - {name: b, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
quant: [f16, q8_0, q4_k_m]
control: false
measure: [check, evaluate]
serve: {backend: llamacpp, slots: 1}
evaluate: {tasks: [arithmetic], concurrency: 1}
"""


def timed(loaded: spec.Spec, path: Path, folder: Path, executor) -> tuple[float, Store]:
    store = Store(folder / "store")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.perf_counter()
    summary = pipeline.run(loaded, path, store, outcomes.Quiet(), executor=executor)
    assert not summary.failed, [(c.cell, c.error) for c in summary.failed]
    return time.perf_counter() - started, store


def local_ray(cpus: int) -> RayExecutor:
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return RayExecutor()  # uses the connection above; shuts it down only if it started it


def critical_path(cells: list[planning.Cell], store: Store) -> tuple[float, float]:
    """The longest chain of dependent tasks and the sum of all of them, in recorded seconds:
    one task a build call, one a cell's served stages (after its builds), as the Ray
    executor submits them."""
    seconds = {
        key: store.manifest(call)["seconds"]
        for key, call in planning.unique_calls(cells).items()
        if store.has(call)
    }
    finish: dict[str, float] = {}

    def done(call) -> float:
        if call.key not in finish:
            ready = max((done(dep) for dep in call.inputs.values()), default=0.0)
            finish[call.key] = ready + seconds.get(call.key, 0.0)
        return finish[call.key]

    ends: dict[str, float] = {}  # a served call's key -> when its cell's task ends
    for cell in cells:
        served = [c for r, c in cell.calls.items() if r in chain.SERVED]
        starts = [done(c) for r, c in cell.calls.items() if r not in chain.SERVED]
        starts += [ends[dep.key] for c in served for dep in c.inputs.values() if dep.key in ends]
        end = max(starts) + sum(seconds.get(c.key, 0.0) for c in served)
        ends |= {c.key: end for c in served}
        ends[cell.name] = end
    return max(ends.values()), sum(seconds.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, help="a spec to run instead of the small default")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="forgebench-ray-") as tmp:
        root = Path(tmp)
        os.environ["RAY_TMPDIR"] = tmp  # Ray's sessions and sockets go with the rest
        path = args.spec or root / "ray-overhead.yaml"
        if args.spec is None:
            path.write_text(SPEC)
        loaded = spec.load(path)
        cells = planning.plan(loaded)
        console.print(f"{host.machine()}; {len(cells)} cells")
        walls = {}
        walls["serial"], serial = timed(loaded, path, root / "serial", Serial())
        for cpus in (1, os.cpu_count() or 1):
            name = f"ray, {cpus} CPU"
            walls[name], _ = timed(loaded, path, root / f"ray-{cpus}", local_ray(cpus))
            ray.shutdown()
            shutil.rmtree(root / f"ray-{cpus}", ignore_errors=True)
        critical, total = critical_path(cells, serial)

    table = Table(title=f"wall time, {loaded.name}")
    table.add_column("executor")
    table.add_column("seconds", justify="right")
    table.add_column("vs serial", justify="right")
    for name, wall in walls.items():
        table.add_row(name, f"{wall:.0f}", f"{wall / walls['serial']:.2f}")
    console.print(table)
    nodes = Table(title="task graph, from the serial run's stage times")
    nodes.add_column("K nodes")
    nodes.add_column("at least, s", justify="right")
    nodes.add_column("vs 1 node", justify="right")
    for k in (1, 2, 4, 8):
        bound = max(critical, total / k)
        nodes.add_row(str(k), f"{bound:.0f}", f"{bound / total:.2f}")
    console.print(nodes)
    console.print(f"critical path {critical:.0f} s of {total:.0f} s of work")


if __name__ == "__main__":
    main()
