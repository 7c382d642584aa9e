"""Reading a spec file: YAML with line numbers, pydantic's errors made one line that
names the file, the line and the field (`quickstart.yaml:12: lora[1].r: ...`), and
relative paths taken from the spec's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness.errors import SpecError
from harness.families import FAMILIES
from harness.spec.lines import dotted, line_of
from harness.spec.recipes import QuantRecipe
from harness.spec.schema import Spec
from harness.spec.sections import names_a_run


def load(path: Path | str) -> Spec:
    """Read and validate a spec; relative paths in it are taken from the spec's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text; save the spec as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}:1: a spec is a YAML mapping with name, base, data, lora and quant")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        errors = _meant(exc.errors(), raw)
        err = errors[0]
        loc = tuple(part for part in err["loc"] if not _union_member(part))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = err["msg"].removeprefix("Value error, ")
        raise SpecError(
            f"{path}:{line_of(root, loc)}: {dotted(loc) or 'spec'}: {message}{more}"
        ) from None
    spec = _resolve_paths(spec, path.parent)
    spec._source = (path, root)
    return spec


def _resolve_paths(spec: Spec, folder: Path) -> Spec:
    def absolute(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (folder / p).resolve()

    base = spec.base.model_copy(
        update={"path": absolute(spec.base.path), "gguf": absolute(spec.base.gguf)}
    )
    data = spec.data.model_copy(update={"train": absolute(spec.data.train)})

    def tasks(items: list) -> list:
        return [
            t if isinstance(t, str) else t.model_copy(update={"path": absolute(t.path)})
            for t in items
        ]

    evaluate = spec.evaluate.model_copy(
        update={"tasks": tasks(spec.evaluate.tasks), "guard": tasks(spec.evaluate.guard)}
    )
    template = spec.serve.chat_template
    if template is not None and template not in FAMILIES:  # a file, relative to the spec
        template = str(absolute(Path(template)))
    serve = spec.serve.model_copy(update={"chat_template": template})
    loras = [
        lora.model_copy(
            update={
                "replay": absolute(lora.replay),
                "path": absolute(lora.path),
                "resume_from": lora.resume_from
                if lora.resume_from is None or names_a_run(lora.resume_from)
                else str(absolute(Path(lora.resume_from))),
            }
        )
        for lora in spec.lora
    ]
    recipes = [
        e.model_copy(update={"imatrix": absolute(e.imatrix)})
        if isinstance(e, QuantRecipe) and isinstance(e.imatrix, Path)
        else e
        for e in spec.quant
    ]
    return spec.model_copy(
        update={
            "base": base,
            "data": data,
            "evaluate": evaluate,
            "serve": serve,
            "lora": loras,
            "quant": recipes,
        }
    )


def _union_member(part: str | int) -> bool:
    """A location part pydantic adds for one member of a union: `literal['arithmetic',...]`,
    `function-after[_regex_given(), EvalTaskSpec]`, `EvalTaskSpec`, `str`."""
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or part == "str")


def _meant(errors: list[dict], raw: Any) -> list[dict]:
    """Of a union's members' errors, those of the member the input was written as: a task
    given as a mapping is a task of one's own, so "should be 'arithmetic'" would mislead."""

    def written_as(err: dict) -> bool:
        value = raw
        for part in err["loc"]:
            if _union_member(part):
                return part.startswith(("literal[", "str")) == isinstance(value, str)
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                return True
        return True

    return [err for err in errors if written_as(err)] or errors
