"""Runs named the ways a user names them (`NAME@ALIAS`, `EXPERIMENT:CELL`, a run id), and
the adapter such a run trained, found in the store: what `check` compares and what
`lora: [{resume_from: NAME@champion}]` continues, so a nightly spec never has to spell out
a store path that changes every night.
"""

from __future__ import annotations

from pathlib import Path

from harness.chain import ADAPTERS
from harness.errors import ForgebenchError, InputError
from harness.sources import adapters
from harness.spec import Spec
from harness.spec.sections import names_a_run
from harness.track import connect, results, schema
from harness.track.reader import resolve_run


def run_of(uri: str, ref: str) -> str:
    """EXPERIMENT:CELL -> that cell's run in the latest invocation; else a run id or alias."""
    if ":" in ref and "@" not in ref and not ref.startswith("models:/"):
        experiment, cell = ref.split(":", 1)
        rows = {r.cell: r for r in results.load(uri, experiment).rows}
        if cell not in rows:
            raise ForgebenchError(
                f"no cell {cell!r} in the latest run of {experiment!r}; cells: {', '.join(rows)}"
            )
        return rows[cell].run_id
    return resolve_run(uri, ref)


def adapter_folder(uri: str, ref: str, store: Path) -> Path:
    """The adapter the run `ref` names was built from, in `store` (a trained or adopted one)."""
    run_id = run_of(uri, ref)
    tags = connect.reader(uri).get_run(run_id).data.tags
    for stage in ADAPTERS:
        if key := tags.get(f"{schema.KEY}.{stage}"):
            folder = store / stage / key / "adapter"
            if not folder.is_dir():
                raise ForgebenchError(
                    f"{ref} (run {run_id}) trained its adapter as {stage}/{key}, which is not "
                    f"in the store {store}: run with the store it was built in (--store) or "
                    "name the adapter's folder"
                )
            return folder
    raise ForgebenchError(f"{ref} (run {run_id}) has no adapter: it is an untuned control cell")


def with_parents(spec: Spec, uri: str, store: Path) -> tuple[Spec, list[str]]:
    """The spec with every `resume_from` that names a run replaced by that run's adapter
    folder, which is what training reads and the key counts by content; and notes for the
    user. A `NAME@ALIAS` whose model is not registered yet is the first night: the entry
    trains from the base with its own r, alpha and target modules, which it must then give
    (and which, once a parent exists, must agree with the parent's)."""
    loras, notes = [], []
    for i, lora in enumerate(spec.lora):
        ref = lora.resume_from
        if ref is None or not names_a_run(ref):
            loras.append(lora)
            continue
        where = spec.where("lora", i, "resume_from")
        try:
            folder = None if _unregistered(uri, ref) else adapter_folder(uri, ref, store)
        except ForgebenchError as exc:
            raise InputError(f"{where}: {exc}") from None
        own = {k: getattr(lora, k) for k in SHAPE if k in lora.model_fields_set}
        if folder is None:
            if missing := [k for k in ("r", "alpha", "target_modules") if k not in own]:
                raise InputError(
                    f"{where}: {ref} is not registered yet, so this first build trains from "
                    f"the base and needs {', '.join(missing)}; give them beside resume_from"
                )
            notes.append(f"{ref} is not registered yet: {lora.name} trains from the base")
            loras.append(lora.model_copy(update={"resume_from": None}))
            continue
        parent = adapters.read(folder)
        theirs = {
            "r": parent.r,
            "alpha": parent.alpha,
            "target_modules": sorted(parent.target_modules),
            "bias": parent.bias,
        }
        for key, value in own.items():
            mine = sorted(value) if key == "target_modules" else value
            if key in theirs and mine != theirs[key]:
                raise InputError(
                    f"{where}: {ref}'s adapter has {key} {theirs[key]} where lora[{i}] gives "
                    f"{mine}; continuing keeps the parent's, so drop {key} or make it agree"
                )
        loras.append(lora.model_copy(update={"resume_from": str(folder)}))
    return spec.model_copy(update={"lora": loras}), notes


SHAPE = ("r", "alpha", "target_modules", "bias", "dropout")
"""What a LoRA entry may give beside a `resume_from` that names a run: used on the first
night, checked against the parent's on every later one."""


def _unregistered(uri: str, ref: str) -> bool:
    """`NAME@ALIAS` whose model is not registered (or nothing was ever logged at `uri`)."""
    if "@" not in ref:
        return False
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return True
    name = ref.removeprefix("models:/").split("@", 1)[0]
    try:
        connect.reader(uri).get_registered_model(name)
    except Exception:  # mlflow's RestException: RESOURCE_DOES_NOT_EXIST
        return True
    return False
