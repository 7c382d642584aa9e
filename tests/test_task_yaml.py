"""lm-eval task YAML is read for the cache key with a safe loader: plain data and the
`!function` marker, never a Python object. Nothing here runs a task."""

from __future__ import annotations

import pytest
import yaml

from harness.data import evals
from harness.plan import keys


def test_function_tag_is_kept_as_a_marker():
    text = "include: _qa.yaml\nprocess_results: !function utils.score\nx: [1, {y: 2}]\n"
    assert keys.load_task_yaml(text) == {
        "include": "_qa.yaml",
        "process_results": {"!function": "utils.score"},
        "x": [1, {"y": 2}],
    }


def test_python_objects_are_refused():
    with pytest.raises(yaml.constructor.ConstructorError):
        keys.load_task_yaml("x: !!python/object/apply:os.system ['true']\n")


def test_shipped_tasks_parse_as_plain_safe_yaml_plus_markers():
    for path in sorted(evals.EVALS.glob("*.yaml")):
        text = path.read_text()
        plain = text.replace("!function ", "")
        loaded = keys.load_task_yaml(text)
        assert isinstance(loaded, dict), path
        if plain == text:
            assert loaded == yaml.safe_load(text), path
