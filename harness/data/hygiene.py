"""Training rows that repeat an evaluation item: a model that saw an item in training can
answer it from memory, so its score on that item says nothing about the task, and a paired
comparison against the untuned base credits training with a gain it did not make. Incremental
data (a night's new rows, gathered from production logs) picks up eval items easily, so each
is refused before anything runs, naming the file and line.

Items match after whitespace is collapsed and case folded: the same question retyped is the
same item to a model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from harness.data import training
from harness.hashing import digest


def normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def first_repeat(train: Path, tasks: Mapping[str, Path]) -> str | None:
    """Where the first row of `train` (a training JSONL) repeats an item of `tasks` (task
    name -> question/answer JSONL) with its answer, as "FILE:LINE repeats TASK's item
    'QUESTION'"; None when no row does. A row that asks an item's question and answers it
    otherwise teaches no answer to recall (the suite's blame test trains on swapped ones)."""
    items: dict[str, tuple[str, str]] = {}
    for task, path in tasks.items():
        for _, line in training.lines(path):
            if line.strip():
                row = json.loads(line)
                items.setdefault(normal(row["question"]), (task, normal(row["answer"])))
    for lineno, conversation in training.numbered(train):
        answer = normal(conversation[-1]["content"])
        for message in conversation:
            if message["role"] != "user":
                continue
            task, expected = items.get(normal(message["content"]), ("", ""))
            if task and expected in answer:
                question = " ".join(message["content"].split())
                shown = question if len(question) <= 80 else question[:77] + "..."
                return f"{train}:{lineno} repeats {task}'s item {shown!r} with its answer"
    return None


def seen_before(conversations: list, parent: Path) -> int | None:
    """How many of these training rows an earlier night already trained on: the data of the
    adapter `parent` continues, and of its own parents, walked back while each is a
    forgebench output (`.../train/KEY/adapter`, whose manifest names its data) and that data
    is still on disk as it was. None when not even the parent's data is known. A night that
    mostly repeats earlier rows teaches little new and overweights them: worth a look."""
    earlier: set[tuple] = set()
    known, folder, visited = False, parent, set()
    while folder is not None and folder not in visited:
        visited.add(folder)
        manifest = folder.parent / "manifest.json"
        if folder.name != "adapter" or not manifest.is_file():
            break
        settings = json.loads(manifest.read_text()).get("settings") or {}
        data = settings.get("data") or {}
        file = Path(data["train"]) if data.get("train") else None
        if file is not None and not (file.is_file() and digest(file) == data.get("train_sha256")):
            break  # gone or edited since: its rows are not what that night trained on
        earlier |= {_row(c) for c in training.training_set(data)}
        known = True
        parent_of = (settings.get("lora") or {}).get("resume_from")
        folder = Path(parent_of) if parent_of else None
    return sum(_row(c) in earlier for c in conversations) if known else None


def _row(conversation: list) -> tuple:
    return tuple((m["role"], normal(m["content"])) for m in conversation)
