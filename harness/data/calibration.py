"""Calibration text for an importance matrix, and the check that it holds nothing scored.

An imatrix records which weights matter on the text it was computed on, and quantization
then spends its bits there. Calibrated on an eval item (or on the drift text), a level
is tuned to the very test that judges it, and its score says nothing about the task, so
`first_leak` refuses such a text before anything runs. Lines match after whitespace is
collapsed and case folded, as `hygiene` matches training rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from harness.data import training
from harness.data.hygiene import normal

SHORTEST = 24
"""A drift-text line shorter than this ("#### 18") is too common to be a leak."""


@functools.cache
def general_text() -> str:
    """`imatrix: text`: CPython's language and library reference topics (pydoc_data), which
    every Python install carries: about 465,000 characters of English prose and code, the
    same on every machine with the same Python, and in no eval task."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def general_text_sha256() -> str:
    return hashlib.sha256(general_text().encode()).hexdigest()


def needles(tasks: Mapping[str, Path], drift_text: Path) -> dict[str, str]:
    """What a calibration text must not hold, normalized, each with what it is: every
    question of the scored tasks (question/answer JSONL files, task name -> file) and every
    drift-text line long enough to be its own."""
    out: dict[str, str] = {}
    for task, path in tasks.items():
        for _, line in training.lines(path):
            if line.strip():
                question = json.loads(line)["question"]
                out.setdefault(normal(question), f"{task}'s item {_shown(question)!r}")
    for line in drift_text.read_text().splitlines():
        if len(text := normal(line)) >= SHORTEST:
            out.setdefault(text, f"the drift text's line {_shown(line)!r}")
    return out


def first_leak(lines: Iterable[tuple[str, int, str]], needles: Mapping[str, str]) -> str | None:
    """Where the first of `lines` ((where, line number, text)) holds a needle (normalized
    text -> what it is), as "WHERE:LINE holds TASK's item 'QUESTION'"; None when none
    does. One regex over all needles, so a large calibration file is read once at C speed."""
    if not needles:
        return None
    pattern = re.compile("|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
    for where, lineno, line in lines:
        if found := pattern.search(normal(line)):
            return f"{where}:{lineno} holds {needles[found.group(0)]}"
    return None


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."
