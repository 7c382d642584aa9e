"""Evaluation tasks: lm-eval task configs for the items one experiment scores.

The tasks are defined once, in lm-eval's own YAML format, in `evals/` (plain
lm-eval runs them unchanged with `--include_path evals`). What changes from one
experiment to the next is only where the items are: the arithmetic task's
held-out split follows the spec's seed and sizes, and a spec can name its own
question/answer JSONL. For each task, then, a small YAML is generated that
`include:`s the task's definition and sets `dataset_kwargs` to an absolute data
path. `include:` is lm-eval's own way to derive a task, so prompt, stops and
scoring stay defined in one place; absolute paths matter because HF datasets
resolves relative `data_files` against the working directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.data import training
from harness.errors import ForgebenchError

EVALS = Path(os.environ.get("FORGEBENCH_EVALS") or Path(__file__).resolve().parents[2] / "evals")
"""The repository's evals/ folder (task YAML, GSM8K, bench prompts, drift text): forgebench
runs from a clone (tox installs it editable); FORGEBENCH_EVALS points elsewhere."""
QA_TEMPLATE = EVALS / "_qa_template_yaml"
"""Base of question/answer tasks: exact match of the stripped reply."""
QA_CONTAINS = EVALS / "_qa_contains_yaml"
"""Base of question/answer tasks scored by "the reply contains the answer"."""
BUILTIN = {
    "arithmetic": EVALS / "forgebench_arithmetic.yaml",
    "gsm8k": EVALS / "forgebench_gsm8k.yaml",
    "capitals": EVALS / "forgebench_capitals.yaml",
}
BUILTIN_SCORER = {"arithmetic": "exact", "gsm8k": "last_number", "capitals": "contains"}
GSM8K_DATA = EVALS / "data" / "gsm8k" / "test.jsonl"
CAPITALS_DATA = EVALS / "data" / "capitals" / "test.jsonl"
SCORERS = ("exact", "contains", "last_number", "regex")
"""How a question/answer task's reply is scored, each an lm-eval filter before exact match:
the whole stripped reply, the answer found in it as whole words, the reply's last number,
or the first group (else the whole match) of a regex of the task's own."""
LAST_NUMBER = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)"
PRIMARY_FILTER = {"gsm8k": "flexible-extract"}
"""The filter a task's accuracy is read from, where it has several. For GSM8K the last
number in the reply: a small model rarely keeps the "#### N" format, so strict match
would score format adherence alone and leave nothing for a paired comparison."""


@dataclass(frozen=True)
class EvalTask:
    """One task as the evaluate stage runs it."""

    name: str
    """The spec's name for it (`arithmetic`, `gsm8k` or a user task's name)."""
    config: Path
    """The lm-eval task YAML to load."""
    primary_filter: str | None = None
    """The filter whose score is the task's accuracy; None when it has only one."""
    scorer: str = "exact"
    """How a reply is scored (one of SCORERS), recorded beside every score."""

    @property
    def lm_eval_name(self) -> str:
        return lm_eval_name(self.name)


def scorer_of(task: str | Any) -> tuple[str, str]:
    """(name, scorer) of a spec's task entry: a built-in name or a user task."""
    if isinstance(task, str):
        return task, BUILTIN_SCORER.get(task, "exact")
    return task.name, task.scorer


def lm_eval_name(name: str) -> str:
    return f"forgebench_{name}"


def task_config(name: str, items: Path, base: Path, cache_dir: Path | None = None) -> dict:
    """An lm-eval task config deriving `base` with its test items read from `items`.

    `cache_dir` keeps HF datasets' Arrow copy of the items out of the user's HF cache.
    """
    dataset_kwargs: dict[str, Any] = {"data_files": {"test": str(items.resolve())}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(cache_dir)
    return {
        "include": str(base.resolve()),
        "task": lm_eval_name(name),
        "dataset_kwargs": dataset_kwargs,
    }


def user_task_config(
    name: str,
    items: Path,
    cache_dir: Path | None = None,
    scorer: str = "exact",
    regex: str | None = None,
) -> dict:
    """The config of a spec's own question/answer task, after checking its rows."""
    check_qa_jsonl(items, scorer, regex)
    if scorer == "contains":
        return task_config(name, items, QA_CONTAINS, cache_dir)
    config = task_config(name, items, QA_TEMPLATE, cache_dir)
    if scorer == "last_number":
        config["filter_list"] = [_regex_filter("last_number", LAST_NUMBER, group_select=-1)]
    elif scorer == "regex":
        if not regex:
            raise ForgebenchError(f"evaluate task {name}: scorer regex needs a `regex:` pattern")
        config["filter_list"] = [_regex_filter("regex", regex)]
    return config


def _regex_filter(name: str, pattern: str, group_select: int = 0) -> dict:
    """lm-eval's regex filter: the first (or, with group_select -1, the last) match's group;
    a reply with no match scores wrong ("[invalid]", lm-eval's fallback)."""
    return {
        "name": name,
        "filter": [
            {"function": "regex", "regex_pattern": pattern, "group_select": group_select},
            {"function": "take_first"},
        ],
    }


def write_task(config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config['task']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def check_qa_jsonl(path: Path, scorer: str = "exact", regex: str | None = None) -> int:
    """Rows must be {"question": str, "answer": str}, the fields the task's doc_to_text and
    doc_to_target read: say where one is not, before any server starts, rather than as a
    template error deep inside lm-eval (or an Arrow error when one row's answer is a number).
    With scorer last_number, a reply that is exactly the answer must score right (an answer
    "4 apples" never equals the number read from it); a regex that matches an empty reply
    makes lm-eval read "" from replies that do not start with the answer. Returns the count."""
    if not path.is_file():
        raise ForgebenchError(f"{path}: evaluation file not found")
    if scorer == "regex" and regex is not None and _extractor(regex, 0)("") != "[invalid]":
        raise ForgebenchError(
            f'scorer regex {regex!r} matches an empty reply, so lm-eval reads "" from '
            "most replies; make it need at least one character (+ rather than *)"
        )
    extract = _extractor(LAST_NUMBER, -1) if scorer == "last_number" else None
    count = 0
    for lineno, line in training.lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ForgebenchError(f"{where}: not valid JSON: {exc.msg}") from None
        if not (isinstance(row, dict) and "question" in row and "answer" in row):
            raise ForgebenchError(f'{where}: expected {{"question": str, "answer": str}}')
        for field in ("question", "answer"):
            if not isinstance(row[field], str):
                raise ForgebenchError(
                    f"{where}: expected a string as {field}, got {json.dumps(row[field])}; "
                    f'write it quoted ("{row[field]}")'
                )
            if not row[field].strip():
                raise ForgebenchError(f"{where}: {field} is empty; fill it in or drop the row")
        if extract is not None and (got := extract(row["answer"])) != row["answer"].strip():
            read = "no number" if got == "[invalid]" else repr(got)
            raise ForgebenchError(
                f"{where}: answer {row['answer']!r}: scorer {scorer} reads {read} from a reply "
                "that is exactly the answer, so such a reply would score wrong; "
                "write the answer as a number or use scorer: exact or contains"
            )
        count += 1
    if count == 0:
        raise ForgebenchError(f"{path}: no evaluation items")
    return count


def _extractor(pattern: str, group: int):
    """What lm-eval's regex filter, the one the task config names, makes of a reply."""
    from lm_eval.filters.extraction import RegexFilter

    found = RegexFilter(pattern, group_select=group)
    return lambda reply: next(iter(found.apply([[reply]], [{}])))[0]


def arithmetic_items(data_spec: dict[str, Any]) -> list[dict[str, str]]:
    """The held-out arithmetic problems of a `data:` block as question/answer rows."""
    return [
        {"question": conversation[0]["content"], "answer": conversation[-1]["content"]}
        for conversation in training.held_out(data_spec)
    ]


def qa_items(task: str | dict[str, str], data_spec: dict[str, Any]) -> list[dict[str, str]]:
    """The question/answer rows an `evaluate.tasks` entry is scored on."""
    if task == "arithmetic":
        return arithmetic_items(data_spec)
    files = {"gsm8k": GSM8K_DATA, "capitals": CAPITALS_DATA}
    path = Path(task["path"]) if isinstance(task, dict) else files.get(task)
    if path is None:
        raise ForgebenchError(f"evaluate.tasks: unknown task {task!r}")
    return [json.loads(line) for _, line in training.lines(path) if line.strip()]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def prepare(
    tasks: list[str | dict[str, str]], data_spec: dict[str, Any], folder: Path
) -> list[EvalTask]:
    """Task YAMLs (and the arithmetic items) for the `evaluate.tasks` of a spec, in `folder`."""
    names = [task if isinstance(task, str) else task["name"] for task in tasks]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ForgebenchError(f"evaluate.tasks: task named twice: {', '.join(dupes)}")
    cache_dir = folder / "hf-datasets"
    prepared = []
    for task in tasks:
        if isinstance(task, dict):
            scorer = task.get("scorer") or "exact"
            config = user_task_config(
                task["name"], Path(task["path"]), cache_dir, scorer, task.get("regex")
            )
            prepared.append(EvalTask(task["name"], write_task(config, folder), scorer=scorer))
            continue
        if task == "arithmetic":
            items = write_jsonl(arithmetic_items(data_spec), folder / "arithmetic.jsonl")
        elif task == "gsm8k":
            items = GSM8K_DATA
        elif task == "capitals":
            items = CAPITALS_DATA
        else:
            raise ForgebenchError(f"evaluate.tasks: unknown task {task!r}")
        config = task_config(task, items, BUILTIN[task], cache_dir)
        prepared.append(
            EvalTask(
                task,
                write_task(config, folder),
                PRIMARY_FILTER.get(task),
                BUILTIN_SCORER[task],
            )
        )
    return prepared
