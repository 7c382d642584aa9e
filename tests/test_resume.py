"""kill -9 at several points of a real run, then run again: finished stages are reused,
the interrupted one restarts cleanly, nothing partial is taken as output, and MLflow
closes the dead run as KILLED. The points: resolving a GGUF base, training, merging,
conversion (of a merged model, and of a LoRA on the adapter route), quantization, the
PyTorch reference, the drift (llama-perplexity), and each served stage (check, evaluate,
bench), where only the run's own process is killed, as `kill -9 PID` does, and the
llama-server it started must not outlive it. None of it needs a model that can add, so it
runs on the suite's tiny model (conftest's `tiny_base`) through the real chain: peft, the
converter, the quantizer, llama-server and lm-eval."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from conftest import scratch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from harness import chain, hashing, pipeline, spec
from harness.plan import cells as planning
from harness.plan.store import Store
from harness.run import executor, outcomes

pytestmark = pytest.mark.slow

SPEC = """\
name: resume
base: {base}
data: {{task: arithmetic, n_train: 96, seed: 5}}
train: {{epochs: 1, lr: 3.0e-4, batch_size: 8, max_seq_len: 128, seed: 0, checkpoint_every: 4}}
lora:
  - {{name: a, r: {r}, alpha: 16, target_modules: [q_proj, v_proj]}}
quant: [{quant}]
route: [{route}]
control: false
measure: [{measure}]
serve: {{backend: llamacpp, slots: 2}}
evaluate: {{tasks: [arithmetic], limit: {limit}, concurrency: 2}}
bench: {{repeats: 5, max_tokens: 16}}
drift: {{ctx: 128, chunks: 2}}
budgets: {{tolerance: 0.2}}  # 40 items cannot show less than 0.063
tracking: {{uri: "sqlite:///{db}"}}
"""


LEVELS = "f16, q8_0, q4_k_m"


def base_of(folder: Path) -> Path:
    """Where the module's folder links the tiny base the specs name."""
    return folder / "base"


def tiny_base_of(folder: Path) -> str:
    """The spec's `base:` naming the tiny base's folder."""
    return f'{{path: "{base_of(folder)}"}}'


def write(
    folder: Path,
    name: str,
    r: int,
    measure: str = "",
    quant: str = LEVELS,
    limit: int = 40,
    route: str = "merge",
    base: str | None = None,
) -> Path:
    """The spec, on the tiny base's folder unless `base` names another (YAML)."""
    path = folder / name
    db = folder / "mlflow.db"
    base = base or tiny_base_of(folder)
    text = SPEC.format(
        r=r, db=db, measure=measure, quant=quant, limit=limit, base=base, route=route
    )
    path.write_text(text)
    return path


def kill_when(spec_path: Path, store: Path, ready, group: bool = True) -> None:
    """Start `forgebench run` and kill -9 it as soon as `ready()` is true: with its whole
    process group, or (`group=False`) the run alone, as `kill -9 PID` does."""
    scratch_tmp = spec_path.parent / "tmp"  # what a kill -9 leaves of TemporaryDirectory
    scratch_tmp.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "run", str(spec_path), "--store", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(scratch_tmp)},
    )
    try:
        deadline = time.monotonic() + 600
        while not ready():
            assert process.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
    finally:
        (os.killpg if group else os.kill)(process.pid, signal.SIGKILL)
        process.wait()


def building(store: Path, stage: str) -> bool:
    return any((store / stage).glob(".tmp-*"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_base):
    with scratch(tmp_path_factory, "resume") as out:
        (out / "store").mkdir()
        base_of(out).symlink_to(tiny_base, target_is_directory=True)
        yield out


def servers_of(store: Path) -> list[psutil.Process]:
    """llama-server processes serving a model from this store."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["name"] == "llama-server" and str(store) in cmdline:
            found.append(process)
    return found


@pytest.mark.parametrize(
    ("stage", "r", "measure", "quant", "limit"),
    [
        ("train", 4, "", LEVELS, 40),
        ("merge", 8, "", LEVELS, 40),
        # from a GGUF of the tiny model (a converted one): dequantizing it takes seconds,
        # where a model folder is linked in milliseconds, too quick to be killed in
        ("resolve", 4, "", "f16", 40),
        ("convert", 6, "", LEVELS, 40),
        ("quantize", 10, "", LEVELS, 40),
        ("evaluate", 4, "evaluate", LEVELS, 40),
        # the r=4 adapter again, one level each: nothing to train, only the killed stage
        # and what follows it. 32 items, so the PyTorch reference is a new key.
        ("reference", 4, "evaluate", "q4_k_m", 32),
        ("convert_lora", 4, "", "q4_k_m", 40),  # the adapter route: the base converted anew
        ("drift", 4, "drift", "q4_k_m", 40),
        ("check", 4, "check", "q4_k_m", 40),
        ("bench", 4, "bench", "q4_k_m", 40),
    ],
)
def test_kill_and_rerun(folder, stage, r, measure, quant, limit):
    store = folder / "store"
    route = chain.ADAPTER if stage == "convert_lora" else chain.MERGE
    base = None
    if stage == "resolve":
        base = f'{{gguf: "{next((folder / "store" / "convert").glob("*/model.gguf"))}"}}'
    spec_path = write(folder, f"{stage}.yaml", r, measure, quant, limit, route, base)
    servers: list[psutil.Process] = []
    if stage == "train":
        scratch = store / "scratch" / "train"
        kill_when(spec_path, store, lambda: any(scratch.glob("*/checkpoint-*/trainer_state.json")))
    elif stage in chain.SERVED:  # killed while a model is served and measured

        def scoring() -> bool:
            servers[:] = servers_of(store)
            return building(store, stage) and bool(servers)

        kill_when(spec_path, store, scoring, group=False)
        _, alive = psutil.wait_procs(servers, timeout=10)
        for orphan in alive:
            orphan.kill()
        assert not alive, f"the killed run left its llama-server running: {alive}"
    else:
        kill_when(spec_path, store, lambda: building(store, stage))
    cells = planning.plan(spec.load(spec_path))
    assert not Store(store).has(cells[-1].calls[stage]), "a killed stage left an output"

    summary = pipeline.run(spec.load(spec_path), spec_path, Store(store), outcomes.Quiet())
    assert [c.status for c in summary.cells] == ["done"] * len(cells)
    assert summary.executed.get(stage, 0) >= 1
    assert not list(store.glob(f"{stage}/.tmp-*")), "the killed build's folder was left behind"
    for cell in summary.cells:  # every output is whole: its files match the manifest
        for outcome in cell.stages.values():
            assert outcome.error is None
    if stage == "train":
        assert summary.cells[0].stages["train"].metrics["train_resumed_from_step"] >= 4

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = client.get_run(summary.parent_run_id)
    killed = parent.data.tags["forgebench.resumes"].split(",")
    assert killed and all(client.get_run(k).info.status == "KILLED" for k in killed)


def test_resumed_training_matches_an_uninterrupted_one(folder, tmp_path):
    resumed = folder / "store"
    straight = tmp_path / "store"
    straight.mkdir()
    spec_path = write(folder, "train.yaml", 4)
    loaded = spec.load(spec_path)
    train = planning.plan(loaded)[0].calls["train"]
    if not Store(resumed).has(train):
        pytest.skip("needs test_kill_and_rerun[train] first")
    executor.ensure(train, Store(straight), outcomes.Quiet())
    a = load_file(Store(resumed).path(train) / "adapter" / "adapter_model.safetensors")
    b = load_file(Store(straight).path(train) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_two_runs_on_one_store_do_each_stage_once(folder, tmp_path):
    """Started together on one store and one fresh MLflow database: both finish, every
    stage is built once between them (the second waits on the key's lock, then reuses),
    and every output matches its manifest."""
    store = tmp_path / "store"
    store.mkdir()
    spec_path = tmp_path / "twice.yaml"
    db = tmp_path / "mlflow.db"
    text = SPEC.format(
        r=12, db=db, measure="", quant=LEVELS, limit=40, base=tiny_base_of(folder), route="merge"
    )
    spec_path.write_text(text)
    command = [sys.executable, "-m", "harness", "run", str(spec_path), "--store", str(store)]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=1200)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs

    done = Counter()
    for output in outputs:
        line = next(x for x in output.splitlines() if x.startswith("work done:"))
        done.update({s: int(n) for s, n in re.findall(r"(\w+) (\d+)", line)})
    assert (done["train"], done["merge"], done["convert"], done["quantize"]) == (1, 1, 1, 2)

    loaded = Store(store)
    for call in {c for cell in planning.plan(spec.load(spec_path)) for c in cell.calls.values()}:
        manifest = loaded.manifest(call)
        for name, sha in manifest["outputs"].items():
            assert hashing.digest(loaded.path(call) / name) == sha, (call.stage, name)
    assert not list(store.glob("*/.tmp-*"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume").experiment_id
    parents = client.search_runs([experiment], "tags.`forgebench.kind` = 'invocation'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "FINISHED"]
