"""The stage table (harness/chain.py) is the one list of stages: the spec's choices, the
planner's roles, the key's llama.cpp programs and the Ray tasks are read from it, so a
stage the chain runs as its own task can be given resources. Nothing here runs a stage."""

from __future__ import annotations

from pathlib import Path

import yaml

from harness import chain, spec
from harness.plan import cells as planning
from harness.plan import keys

ROOT = Path(__file__).resolve().parents[1]


def test_every_role_runs_a_stage_module():
    assert set(keys.stage_names()) == {role.stage for role in chain.ROLES}


def test_executor_resources_accept_every_own_task_and_serve(tmp_path):
    raw = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    raw["executor"] = {
        "kind": "ray",
        "resources": {task: {"cpus": 1} for task in (*chain.TASKS, "serve")},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    loaded = spec.load(path)
    assert "convert_lora" in loaded.executor.resources


def test_planned_roles_are_the_tables():
    raw = spec.load(ROOT / "experiments" / "quickstart-routes.yaml")
    roles = {role for cell in planning.plan(raw) for role in cell.calls}
    assert roles <= set(chain.STAGES)
    assert {"convert_lora", "train", "quantize"} <= roles
