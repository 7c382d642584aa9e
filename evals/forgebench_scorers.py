"""Scorers for forgebench's question/answer tasks, as lm-eval `custom` filters.

A filter turns each reply into the string that lm-eval's `exact_match` then compares
with the answer, so a scorer stays in lm-eval's own terms (filter, then metric) and a
plain `lm_eval --include_path evals` run scores the same way.
"""

from __future__ import annotations

import re
import unicodedata


def _fold(text: str) -> str:
    """Case- and accent-insensitive form: "Brasília" and "brasilia" match."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def contains(reply: str, answer: str) -> bool:
    """The answer occurs in the reply as whole words ("Paris" in "The capital is Paris.",
    not "Rome" in "Romeo")."""
    return re.search(rf"(?<!\w){re.escape(_fold(answer.strip()))}(?!\w)", _fold(reply)) is not None


def contains_answer(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval custom filter: a reply that contains the item's answer becomes the answer
    (so exact match scores it right); any other reply is left as it is."""
    return [
        [doc["answer"] if contains(reply, doc["answer"]) else reply for reply in replies]
        for replies, doc in zip(resps, docs, strict=True)
    ]
