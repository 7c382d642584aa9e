"""The release gate as a user's CI runs it: a champion adapter registered in MLflow, then
a new build of that adapter trained on data whose labels were corrupted. The gate must
stop it (exit 1) and leave the alias alone; a build that is no worse passes and, with
--promote, becomes the champion. Real training, serving and scoring on SmolLM2-135M."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import release_gate, scratch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from harness import data
from harness.cli import app

pytestmark = pytest.mark.slow

SPEC = """\
name: {name}
base: {{model: smollm2-135m}}
data: {data}
train: {{epochs: 1, lr: 3.0e-4, batch_size: 8, max_seq_len: 128, seed: 0}}
lora:
  - {lora}
quant: [{quant}]
control: false
measure: [check, evaluate, bench]
serve: {{backend: llamacpp, slots: 2}}
evaluate: {{tasks: [{{name: sums, path: {heldout}}}], concurrency: 2}}
bench: {{warmup: 1, repeats: 1, max_tokens: 32}}
budgets: {{tolerance: 0.1}}  # 80 items show 0.1 at the disagreement HF and served have
tracking: {{uri: "sqlite:///{db}"}}
"""
MAIN = "{name: main, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}"
MODEL = "release-math"
LOOSE = ["--speed-drop-pct", "50", "--memory-rise-pct", "50"]  # a shared CI box is noisy


def corrupted_rows(conversations: list, rng: random.Random) -> list[dict]:
    """prompt/completion rows, every answer off by 1 to 9."""
    out = []
    for conversation in conversations:
        answer = int(conversation[-1]["content"]) + rng.choice([-1, 1]) * rng.randint(1, 9)
        out.append({"prompt": conversation[0]["content"], "completion": str(answer)})
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory, e2e):
    """The champion is the e2e spec's `main` adapter (its data and training, so the e2e
    store already holds its build); the candidate is the same adapter trained on the same
    questions with every answer corrupted."""
    with scratch(tmp_path_factory, "release") as folder:
        train = data.arithmetic(400, seed=3)
        heldout = [
            {"question": c[0]["content"], "answer": c[-1]["content"]}
            for c in data.arithmetic(80, seed=3, offset=400)
        ]
        corrupted = write_jsonl(folder / "corrupted.jsonl", corrupted_rows(train, random.Random(0)))
        heldout_path = write_jsonl(folder / "heldout.jsonl", heldout)
        db = folder / "mlflow.db"

        def run(name: str, data_line: str, quant: str) -> None:
            spec = folder / f"{name}.yaml"
            spec.write_text(
                SPEC.format(
                    name=name, data=data_line, quant=quant, heldout=heldout_path, db=db, lora=MAIN
                )
            )
            result = CliRunner().invoke(app, ["run", str(spec), "--store", str(e2e.store.root)])
            assert result.exit_code == 0, result.output

        run("release", "{task: arithmetic, n_train: 400, n_eval: 80, seed: 3}", "f16, q8_0")
        registered = CliRunner().invoke(
            app,
            [
                "best",
                "release",
                "--tracking-uri",
                f"sqlite:///{db}",
                "--register",
                MODEL,
                "--alias",
                "champion",
            ],
        )
        assert registered.exit_code == 0, registered.output
        run("release-corrupted", f"{{train: {corrupted}}}", "f16")
        yield f"sqlite:///{db}"


def check(uri: str, candidate: str, *extra: str):
    return release_gate(uri, candidate, f"{MODEL}@champion", *LOOSE, *extra)


def champion(uri: str) -> str:
    return MlflowClient(uri).get_model_version_by_alias(MODEL, "champion").run_id


def test_an_adapter_trained_on_corrupted_labels_fails_the_gate(release):
    before = champion(release)
    result = check(release, "release-corrupted:main-f16", "--promote")
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("## forgebench check: FAIL")
    assert "sums: " in result.output.split("Regressions:")[1]
    assert champion(release) == before  # a failed gate promotes nothing


def test_an_adapter_saved_by_a_plain_peft_script_goes_through_the_gate_as_ours(
    release, e2e, tmp_path
):
    """The build's `main` adapter loaded and saved again by a plain peft script, not by
    forgebench, then named by `lora: [{name: main, path: ...}]`: nothing is trained, its
    chain is built anew under other keys (adopt, merge, convert, scoring), and the gate
    judges it as it judges ours. The weights are the same, so every answer is the same item
    by item, and it passes against the build it came from."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = MlflowClient(release)
    ours = client.search_runs(
        [client.get_experiment_by_name("release").experiment_id],
        "tags.`forgebench.cell` = 'main-f16'",
    )[0].data.tags
    store = e2e.store.root
    base = AutoModelForCausalLM.from_pretrained(
        store / "resolve" / ours["forgebench.key.resolve"] / "model", dtype=torch.float32
    )
    trained = store / "train" / ours["forgebench.key.train"] / "adapter"
    PeftModel.from_pretrained(base, trained).save_pretrained(tmp_path / "from-a-script")

    built = Path(release.removeprefix("sqlite:///")).parent  # the fixture's folder
    spec = tmp_path / "adopted.yaml"
    spec.write_text(
        SPEC.format(
            name="release-adopted",
            data="{task: arithmetic, n_train: 400, n_eval: 80, seed: 3}",
            quant="f16",
            heldout=built / "heldout.jsonl",
            db=built / "mlflow.db",
            lora=f'{{name: main, path: "{tmp_path / "from-a-script"}"}}',
        )
    )
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(store)])
    assert result.exit_code == 0, result.output

    adopted = client.search_runs(
        [client.get_experiment_by_name("release-adopted").experiment_id],
        "tags.`forgebench.cell` = 'main-f16'",
    )[0]
    assert "forgebench.key.train" not in adopted.data.tags
    assert adopted.data.tags["forgebench.key.convert"] != ours["forgebench.key.convert"]
    passed = release_gate(release, "release-adopted:main-f16", "release:main-f16", *LOOSE)
    assert passed.exit_code == 0, passed.output
    assert passed.stdout.startswith("## forgebench check: PASS")
    against_champion = check(release, "release-adopted:main-f16")
    assert against_champion.exit_code == check(release, "release:main-f16").exit_code


def test_a_build_no_worse_passes_and_is_promoted(release):
    client = MlflowClient(release)
    before = champion(release)
    cells = {
        run.data.tags["forgebench.cell"]: run.info.run_id
        for run in client.search_runs(
            [client.get_experiment_by_name("release").experiment_id],
            "tags.`forgebench.kind` = 'cell'",
        )
    }
    other = next(cell for cell, run_id in cells.items() if run_id != before)
    result = check(release, f"release:{other}", "--promote")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("## forgebench check: PASS")
    assert result.stderr.startswith("promoted: release-math@champion -> version 2")
    assert champion(release) == cells[other]


# --- the release loop: three nights through `forgebench release` and the Ollama double ---

NIGHTLY = "web4-agent"


def nights_data(folder: Path, heldout: set[str]) -> tuple[Path, Path]:
    """Night 2's new correct rows and night 3's same questions with corrupted answers: 160
    problems not among the held-out items (validate refuses a row that repeats one)."""
    rows = [c for c in data.arithmetic(400, seed=11) if c[0]["content"] not in heldout][:160]
    correct = [{"prompt": c[0]["content"], "completion": c[-1]["content"]} for c in rows]
    return (
        write_jsonl(folder / "night2.jsonl", correct),
        write_jsonl(folder / "night3.jsonl", corrupted_rows(rows, random.Random(1))),
    )


def night_spec(
    folder: Path, built: Path, night: int, data_line: str, lora: str, quant: str = "f16"
) -> Path:
    """Nights 2 and 3 at F16 alone, to keep the suite short: the pick is then the F16,
    judged against the tuned HF model like any level."""
    path = folder / f"night{night}.yaml"
    text = SPEC.format(
        name="nightly",
        data=data_line,
        quant=quant,
        heldout=built / "heldout.jsonl",
        db=folder / "mlflow.db",
        lora=lora,
    )
    # the champion answers 11-14 of the 80 items, so a tolerance of 0.2 would call even
    # losing them all "within tolerance"; at 0.15 night 2 holds (drop +0.037, upper bound
    # 0.093 on the EPYC) and night 3 does not (+0.138 [+0.076, +0.213])
    path.write_text(text.replace("tolerance: 0.1}", "tolerance: 0.15}"))
    return path


def test_three_nights_promote_continue_and_stop_a_corrupted_one(
    release, e2e, tmp_path, monkeypatch
):
    """Night 1 (the build above, all cached) becomes the champion and is deployed as
    web4-agent:latest; night 2 continues from web4-agent@champion on new correct rows and is
    killed (-9) right after Ollama's name moved and before the alias did, and the rerun
    leaves the new build in both places, its lineage naming night 1's adapter; night 3
    continues on corrupted rows and is rejected with the champion and the deployed model
    untouched (their digests read before and after)."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from ollama_double import OllamaDouble

    from harness.hashing import file_sha256

    built = Path(release.removeprefix("sqlite:///")).parent
    heldout = {json.loads(line)["question"] for line in (built / "heldout.jsonl").open()}
    night2_rows, night3_rows = nights_data(tmp_path, heldout)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = str(e2e.store.root)
    continued = f"{{name: main, resume_from: {NIGHTLY}@champion}}"
    first_data = "{task: arithmetic, n_train: 400, n_eval: 80, seed: 3}"
    night1 = night_spec(tmp_path, built, 1, first_data, MAIN, quant="f16, q8_0")
    night2 = night_spec(tmp_path, built, 2, f"{{train: {night2_rows}}}", continued)
    night3 = night_spec(tmp_path, built, 3, f"{{train: {night3_rows}}}", continued)

    def nightly(spec: Path):
        command = ["release", str(spec), "--model", NIGHTLY, "--store", store, *LOOSE]
        return CliRunner().invoke(app, command)

    def champion() -> str:
        return MlflowClient(uri).get_model_version_by_alias(NIGHTLY, "champion").run_id

    with OllamaDouble() as double:
        monkeypatch.setenv("OLLAMA_HOST", double.host)
        first = nightly(night1)
        assert first.exit_code == 0, first.output
        assert f"no {NIGHTLY}@champion yet: this build becomes it" in first.stdout
        night1_run = champion()
        served = double.models[f"{NIGHTLY}:latest"]
        night1_gguf = MlflowClient(uri).get_run(night1_run).data.tags["forgebench.gguf"]
        assert served.digest == f"sha256:{file_sha256(Path(night1_gguf))}"

        moved = threading.Event()
        double.copied = lambda source, destination: moved.set()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harness",
                "release",
                str(night2),
                "--model",
                NIGHTLY,
                "--store",
                store,
                *LOOSE,
            ],
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert moved.wait(900), "night 2 never reached the deployment"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        double.copied = lambda source, destination: None
        assert champion() == night1_run  # killed between the name and the alias
        assert double.models[f"{NIGHTLY}:latest"].digest != served.digest

        second = nightly(night2)
        assert second.exit_code == 0, second.output
        assert f"## forgebench release {NIGHTLY}: PROMOTED" in second.stdout
        night2_run = champion()
        tags = MlflowClient(uri).get_run(night2_run).data
        assert night2_run != night1_run
        night1_train = MlflowClient(uri).get_run(night1_run).data.tags["forgebench.key.train"]
        assert tags.params["lora.resume_from_key"] == f"train/{night1_train}"
        latest = double.models[f"{NIGHTLY}:latest"]
        assert latest.digest == f"sha256:{file_sha256(Path(tags.tags['forgebench.gguf']))}"
        assert f"{NIGHTLY}:candidate" not in double.models

        third = nightly(night3)
        assert third.exit_code == 1, third.output
        assert f"## forgebench release {NIGHTLY}: REJECTED" in third.stdout, third.stdout
        assert "sums" in third.stdout.split("Regressions:")[1], third.stdout
        assert f"{NIGHTLY}@champion and {NIGHTLY}:latest are unchanged." in third.stdout
        assert champion() == night2_run
        assert double.models[f"{NIGHTLY}:latest"].digest == latest.digest
