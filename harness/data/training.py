"""Training and held-out examples as chat conversations.

Two sources: the built-in arithmetic task (seeded, so a spec names its data
exactly) and a user's JSONL, one example a line, either
`{"messages": [{"role": ..., "content": ...}, ...]}` or
`{"prompt": ..., "completion": ...}`. The last message must be the
assistant's: it is the part the adapter learns.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from harness.errors import ForgebenchError

Conversation = list[dict[str, str]]


def arithmetic(n: int, seed: int, offset: int = 0) -> list[Conversation]:
    """`n` distinct two-operand problems with the bare number as the answer.

    Train and held-out examples come from one seeded stream of distinct
    problems (`offset` skips the first ones), so they never overlap.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    problems: list[tuple[int, str, int]] = []
    while len(problems) < offset + n:
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            problems.append((a, op, b))
    return [
        [
            {"role": "user", "content": f"What is {a} {op} {b}? Answer with the number only."},
            {"role": "assistant", "content": str(a + b if op == "+" else a - b)},
        ]
        for a, op, b in problems[offset:]
    ]


def read_jsonl(path: Path) -> list[Conversation]:
    return [conversation for _, conversation in numbered(path)]


def numbered(path: Path) -> list[tuple[int, Conversation]]:
    """Each row with its line number, for a message that names the row."""
    rows = [
        (lineno, _conversation(_parse(line, path, lineno), path, lineno))
        for lineno, line in lines(path)
        if line.strip()
    ]
    if not rows:
        raise ForgebenchError(f"{path}: no examples; give one JSON object per line")
    return rows


def lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, JSON's own encoding; a line that is not UTF-8 is
    named, rather than left to fail as a decoding traceback."""
    out = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            out.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise ForgebenchError(
                f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column "
                f"{exc.start + 1}); save the file as UTF-8"
            ) from None
    return out


def _parse(line: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ForgebenchError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None


ROLES = ("system", "user", "assistant")
"""The roles every chat template knows; a template meets any other as an error or, worse,
renders it as something else."""


def _conversation(row: Any, path: Path, lineno: int) -> Conversation:
    """One row as the trainer reads it, refused with the field that is wrong: what the
    trainer would otherwise learn from (an empty answer) or fail on (a number for text)."""
    where = f"{path}:{lineno}"
    if not isinstance(row, dict):
        raise ForgebenchError(f"{where}: a row is a JSON object, not {_kind(row)}")
    if "messages" in row:
        return _messages(row["messages"], where)
    if "prompt" in row and "completion" in row:
        for field in ("prompt", "completion"):
            if not isinstance(row[field], str):
                raise ForgebenchError(
                    f"{where}: {field}: expected a string, got {_kind(row[field])}; quote it"
                )
        if not row["completion"].strip():
            raise ForgebenchError(f"{where}: completion is empty: nothing to learn; drop the row")
        return [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    raise ForgebenchError(
        f"{where}: expected {{'messages': [...]}} ending with an assistant message, "
        "or {'prompt': str, 'completion': str}"
    )


def _messages(messages: Any, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise ForgebenchError(f"{where}: messages: expected a list of messages, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ForgebenchError(f"{where}: messages[{i}]: expected {{role, content}}")
        if m.get("role") not in ROLES:
            raise ForgebenchError(
                f"{where}: messages[{i}].role: {m.get('role')!r} is not one of {', '.join(ROLES)}"
            )
        if not isinstance(m.get("content"), str):
            raise ForgebenchError(
                f"{where}: messages[{i}].content: expected a string, got {_kind(m.get('content'))}"
            )
    if messages[-1]["role"] != "assistant":
        raise ForgebenchError(
            f"{where}: messages[{len(messages) - 1}]: the last message is the "
            f"{messages[-1]['role']}'s; end with the assistant's answer, which the adapter learns"
        )
    if not messages[-1]["content"].strip():
        raise ForgebenchError(
            f"{where}: messages[{len(messages) - 1}].content: the answer is empty: nothing to "
            "learn; drop the row"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _kind(value: Any) -> str:
    """A JSON value's kind in JSON's words, for messages about rows."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a value")


def training_set(data: dict[str, Any]) -> list[Conversation]:
    """The examples a `data:` block (as a plain dict) names, with its system prompt."""
    if data.get("task") == "arithmetic":
        conversations = arithmetic(data["n_train"], data["seed"])
    else:
        conversations = read_jsonl(Path(data["train"]))
    if data.get("system"):
        conversations = [[{"role": "system", "content": data["system"]}, *c] for c in conversations]
    return conversations


def held_out(data: dict[str, Any]) -> list[Conversation]:
    """Held-out examples of the built-in task, disjoint from the training set."""
    if data.get("task") != "arithmetic":
        raise ForgebenchError("held-out examples exist only for the built-in arithmetic task")
    return arithmetic(data["n_eval"], data["seed"], offset=data["n_train"])
