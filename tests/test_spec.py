"""Spec validation through the CLI: every shipped spec is valid, and a bad one
gets exactly one line naming file, line and field, with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("room_on_disk")
GOOD = """\
name: t
base: {model: smollm2-135m}
data: {task: arithmetic}
lora:
  - {name: a, r: 8, alpha: 16, target_modules: [q_proj]}
quant: [f16, q4_k_m]
"""


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_specs_validate(path):
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_text().startswith("# Run it:"), "each spec opens with the command that runs it"


BAD = {
    "unknown key": (
        GOOD.replace("data: {task: arithmetic}", "data: {task: arithmetic, colour: 1}"),
        ":3: data.colour: Extra inputs are not permitted",
    ),
    "wrong type": (
        GOOD.replace("r: 8", "r: eight"),
        ":5: lora[0].r: Input should be a valid integer",
    ),
    "unknown quant": (
        GOOD.replace("q4_k_m", "q4_k_mm"),
        "unknown quant level 'q4_k_mm': did you mean",
    ),
    "duplicate lora": (
        GOOD.replace("quant:", "  - {name: a, r: 4, alpha: 8, target_modules: [q]}\nquant:"),
        "LoRA name used twice: a",
    ),
    "two base sources": (
        GOOD.replace("{model: smollm2-135m}", "{model: x, hf: y/z}"),
        ":2: base: give exactly one of model, hf, path or gguf",
    ),
    "missing field": (GOOD.replace("name: t\n", ""), ":1: name: Field required"),
    "bad yaml": (GOOD.replace("quant: [f16, q4_k_m]", "quant: [f16, q4_k_m"), "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "a spec is a YAML mapping"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_spec_is_one_line_with_exit_code_2(tmp_path, case):
    text, expected = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in ("validate", "plan", "run"):
        result = invoke(command, str(path))
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {path}:")
        assert expected in lines[0]


def test_missing_spec_file(tmp_path):
    result = invoke("plan", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "cannot read spec" in result.output


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("r: 8", "r: -1"))
    result = invoke("--debug", "validate", str(path))
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "SpecError"


def plan_json(name: str, store: Path) -> dict:
    result = invoke("plan", str(ROOT / "experiments" / name), "--store", str(store), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_plan_json_lists_every_cell_and_stage(tmp_path):
    plan = plan_json("quickstart.yaml", tmp_path)
    assert len(plan["cells"]) == 2 * 3  # 2 LoRA configs x 3 levels (control: false)
    assert plan["todo"] == {
        "resolve": 1,
        "train": 2,
        "merge": 2,
        "convert": 2,
        "quantize": 4,
        "reference": 3,  # the untuned base and each tuned model, in PyTorch
        "check": 6,
        "evaluate": 6,
        "bench": 6,
    }
    tuned = next(c for c in plan["cells"] if c["cell"] == "r16-qkvo-q8_0")
    assert list(tuned["stages"]) == [
        "resolve",
        "train",
        "merge",
        "convert",
        "quantize",
        "reference_base",
        "reference",
        "check",
        "evaluate",
        "bench",
    ]
    assert not any(s["cached"] for s in tuned["stages"].values())


def test_drift_is_planned_against_each_adapters_f16_and_the_untuned_one(tmp_path):
    plan = plan_json("gsm8k-quant-sweep.yaml", tmp_path)  # measures drift; 1 LoRA, 7 levels
    assert plan["todo"]["convert"] == 2  # the untuned F16 too: the tuned F16's drift needs it
    assert plan["todo"]["drift_base"] == 2  # each F16's logits, saved once
    assert (
        plan["todo"]["drift"] == 13
    )  # 12 levels against their F16, the tuned F16 against the untuned
    stages = {c["cell"]: list(c["stages"]) for c in plan["cells"]}
    assert stages["r16-qkvo-q8_0"][-2:] == ["drift_base", "drift"]
    assert "drift_tuning" in stages["r16-qkvo-f16"] and "drift" not in stages["r16-qkvo-f16"]


def test_plan_loads_no_torch():
    """Planning and validating stay fast: torch is imported only by stages that train."""
    code = (
        "import sys; from harness import pipeline, spec; "
        "from harness.plan import cells as planning; "
        f"planning.plan(spec.load({str(ROOT / 'experiments' / 'quickstart.yaml')!r})); "
        "print('torch' in sys.modules, 'mlflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
