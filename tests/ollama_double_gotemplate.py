"""The part of Go's text/template that Ollama model templates use, for the Ollama double.

A small interpreter (text, actions, if/else if/else, range, variables, eq, trim markers as
Go's lexer applies them) and template/template.go's Execute: a template using .Messages
gets the collated conversation, an older .System/.Prompt/.Response one runs once per turn.
Anything else is a TemplateError, never a guess.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

SAMPLE = [{"role": r, "content": r} for r in ("system", "user", "assistant", "user")]
"""A conversation every chat template must render (checked at /api/create)."""


class TemplateError(ValueError):
    """A template this interpreter cannot render, or that Go itself would reject."""


# --- the Go text/template subset that Ollama model templates use ---------------------------

ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s"]+')
SPACE = " \t\r\n"  # what Go's trim markers remove


@dataclass
class Block:
    kind: str
    """"if" (branch conditions, None for else) or "range" (one branch: what it ranges over)."""
    branches: list[tuple[str | None, list]]


def parse(source: str) -> list:
    """Text (str), actions (one-item tuples) and if/range Blocks; trim markers applied as
    Go's lexer applies them."""
    root: list = []
    stack: list[tuple[Block | None, list]] = [(None, root)]
    pos, trim = 0, False
    for match in ACTION.finditer(source):
        text = source[pos : match.start()].lstrip(SPACE if trim else "")
        if text := text.rstrip(SPACE if match.group(1) else ""):
            stack[-1][1].append(text)
        pos, trim = match.end(), bool(match.group(3))
        expr = match.group(2).strip()
        head, _, rest = expr.partition(" ")
        block, body = stack[-1]
        if head in ("if", "range"):
            body.append(Block(head, [(rest, [])]))
            stack.append((body[-1], body[-1].branches[0][1]))
        elif head == "else" and block and block.kind == "if" and rest[:3] in ("", "if "):
            block.branches.append((rest[3:] or None, []))
            stack[-1] = (block, block.branches[-1][1])
        elif head == "end" and block:
            stack.pop()
        elif head in ("else", "end", "with", "define", "template", "block", "break", "continue"):
            raise TemplateError(f"{{{{ {expr} }}}} here is not supported by the test double")
        elif not expr.startswith("/*"):
            body.append((expr,))
    if len(stack) > 1:
        raise TemplateError("unexpected EOF: missing {{ end }}")
    text = source[pos:].lstrip(SPACE if trim else "")
    return [*root, text] if text else root


class _Cut(Exception):
    """Reached {{ .Response }} in the last turn: Ollama drops everything after it."""


def _value(token: str, dot: Any, scope: dict) -> Any:
    """A string, true/false, or a field path from `.`, `$` or a variable."""
    if token.startswith('"'):
        return json.loads(token)
    if token in ("true", "false"):
        return token == "true"
    name, _, path = token.partition(".")
    if name and name not in scope:
        raise TemplateError(f"{token!r} is not supported by the test double (or undefined)")
    value = scope[name] if name else dot
    for key in filter(None, path.split(".")):
        if not isinstance(value, dict) or key not in value:
            raise TemplateError(f"can't evaluate field {key}")
        value = value[key]
    return value


def _evaluate(expr: str, dot: Any, scope: dict) -> Any:
    """A value; `eq a b...`; or `$x := v` / `$x = v`, which print nothing."""
    tokens = TOKEN.findall(expr)
    if not tokens:
        raise TemplateError("missing value for command")
    if len(tokens) > 2 and tokens[1] in (":=", "="):
        if tokens[1] == "=" and tokens[0] not in scope:
            raise TemplateError(f'undefined variable "{tokens[0]}"')
        scope[tokens[0]] = _evaluate(" ".join(tokens[2:]), dot, scope)
        return None
    if tokens[0] == "eq" and len(tokens) > 2:
        first, *others = (_value(t, dot, scope) for t in tokens[1:])
        return any(first == other for other in others)
    if len(tokens) == 1:
        return _value(tokens[0], dot, scope)
    raise TemplateError(f"{{{{ {expr} }}}}: only values, variables and eq are supported")


def _render(nodes: list, dot: Any, scope: dict, out: list[str], cut: bool) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, tuple):
            value = _evaluate(node[0], dot, scope)
            if value is not None:
                out.append(str(value).lower() if isinstance(value, bool) else str(value))
            if cut and ".Response" in TOKEN.findall(node[0]):
                raise _Cut
        elif node.kind == "range":
            for item in _evaluate(node.branches[0][0] or "", dot, scope) or []:
                _render(node.branches[0][1], item, scope, out, cut)
        else:
            for condition, body in node.branches:
                if condition is None or _evaluate(condition, dot, scope):
                    _render(body, dot, scope, out, cut)
                    break


def execute(nodes: list, root: dict, cut: bool = False) -> str:
    out: list[str] = []
    with contextlib.suppress(_Cut):
        _render(nodes, root, {"$": root}, out, cut)
    return "".join(out)


def render_prompt(template: str, messages: list[dict]) -> str:
    """template.go Execute: a template using .Messages gets the collated conversation; an
    older .System/.Prompt/.Response one runs once per turn, the last cut at .Response."""
    nodes, think = parse(template), {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    turns: list[dict] = []
    for m in messages:  # collate: consecutive messages of one role are joined
        if turns and turns[-1]["Role"] == m["role"] != "tool":
            turns[-1]["Content"] += "\n\n" + m["content"]
        else:
            turns.append({"Role": m["role"], "Content": m["content"], "Thinking": ""})
    if any(re.search(r"\.Messages\b", m.group(2)) for m in ACTION.finditer(template)):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        return execute(nodes, {"System": system, "Messages": turns, "Tools": [], **think})
    keys = {"system": "System", "user": "Prompt", "assistant": "Response"}
    out, values = "", dict.fromkeys(keys.values(), "")
    for turn in turns:
        role = turn["Role"]
        if (role == "system" and (values["Prompt"] or values["Response"])) or (
            role == "user" and values["Response"]
        ):
            out += execute(nodes, values | think)
            values = dict.fromkeys(keys.values(), "")
        if role in keys:
            values[keys[role]] = turn["Content"]
    return out + execute(nodes, values | think, cut=True)
