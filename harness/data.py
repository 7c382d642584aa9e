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
    conversations = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                conversations.append(_conversation(_parse(line, path, lineno), path, lineno))
    if not conversations:
        raise ForgebenchError(f"{path}: no examples; give one JSON object per line")
    return conversations


def _parse(line: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ForgebenchError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None


def _conversation(row: Any, path: Path, lineno: int) -> Conversation:
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
        if ok and messages and messages[-1]["role"] == "assistant":
            return [{"role": m["role"], "content": m["content"]} for m in messages]
    elif (
        isinstance(row, dict)
        and isinstance(row.get("prompt"), str)
        and isinstance(row.get("completion"), str)
    ):
        return [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    raise ForgebenchError(
        f"{path}:{lineno}: expected {{'messages': [...]}} ending with an assistant message, "
        "or {'prompt': str, 'completion': str}"
    )


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
