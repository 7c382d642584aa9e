"""What goes into a stage's cache key besides the spec's settings.

A cached output may be reused only if nothing it was made from has changed, so a
key covers, beyond the settings: forgebench's own logic for the stage (an explicit
`VERSION` per stage module, kept honest by tests/test_keys.py against a record of
the sources), the evals/ files the stage reads (by content), the Ollama server that
serves it, the llama.cpp tools that run it, and `precision: auto` as it resolves on
this machine. (Files that the settings name count by content, never by absolute path:
harness.plan.store.portable does that for every key, so moving a checkout keeps every key.)

Planning must stay light: nothing here imports torch or a stage module that does.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from harness import toolchain
from harness.chain import LLAMA_CPP, SERVED
from harness.data import evals
from harness.env import ollama_host
from harness.errors import ForgebenchError
from harness.hashing import file_sha256
from harness.stages import bench, drift

HARNESS = Path(__file__).resolve().parents[1]
STAGES = HARNESS / "stages"
VERSION_LINE = re.compile(r"^VERSION = (\d+)\b", re.MULTILINE)

# --- forgebench's own logic ------------------------------------------------------


def stage_names() -> list[str]:
    """Every stage module in harness/stages, so a new stage is covered the day it lands."""
    return sorted(p.stem for p in STAGES.glob("*.py") if p.stem != "__init__")


def stage_version(stage: str) -> dict[str, str]:
    """The stage's logic identity: the `VERSION = N` of its module, read without importing
    it (a stage module may import torch)."""
    path = STAGES / f"{stage}.py"
    found = VERSION_LINE.search(path.read_text()) if path.is_file() else None
    if found is None:
        raise ForgebenchError(
            f"harness/stages/{stage}.py has no `VERSION = N` line: add `VERSION = 1` near its "
            "top and record it (python scripts/stage_record.py > tests/stage_versions.json)"
        )
    return {f"forgebench.{stage}": found.group(1)}


KEY_MACHINERY = {
    HARNESS / "errors.py",
    HARNESS / "hashing.py",
    HARNESS / "plan" / "store.py",
    HARNESS / "plan" / "keys.py",
}
"""Modules a stage imports that decide how outputs are cached or failures worded, not what
a stage produces: left out of its sources, so editing them asks for no VERSION bump."""


def stage_sources(stage: str) -> list[Path]:
    """The stage module and every harness module it imports, directly or not, at the top or
    inside a function: the code whose change may change the stage's outputs. A served stage
    also runs on the backend that `harness.run.deployment` hands it, so the backends count too."""
    seen: set[Path] = set()
    todo = [STAGES / f"{stage}.py"]
    if stage in SERVED:
        todo.append(HARNESS / "backends" / "__init__.py")
    while todo:
        path = todo.pop()
        if path not in seen and path not in KEY_MACHINERY:
            seen.add(path)
            todo += _harness_imports(path)
    return sorted(seen)


def _harness_imports(path: Path) -> list[Path]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    files = []
    for name in names:
        if name == "harness" or name.startswith("harness."):
            parts = name.split(".")[1:]
            module, package = HARNESS.joinpath(*parts), HARNESS.joinpath(*parts, "__init__.py")
            files += [p for p in (module.with_suffix(".py"), package) if parts and p.is_file()]
    return files


def stage_record() -> dict[str, dict[str, Any]]:
    """What tests/stage_versions.json holds: per stage, its VERSION and the sha256 of each
    source it depends on (`python scripts/stage_record.py > tests/stage_versions.json`)."""
    root = HARNESS.parent
    record = {}
    for stage in stage_names():
        version = VERSION_LINE.search((STAGES / f"{stage}.py").read_text())
        record[stage] = {
            "version": int(version.group(1)) if version else None,
            "sources": {
                p.relative_to(root).as_posix(): file_sha256(p) for p in stage_sources(stage)
            },
        }
    return record


# --- what a stage reads besides its settings ------------------------------------


def evals_identity(stage: str, tasks: Sequence[Any] = ()) -> dict[str, Any]:
    """sha256 of each evals/ file the stage reads, by its name inside evals/ (not where
    the checkout is). `tasks` are evaluate.tasks entries (names, or user tasks)."""
    files: list[Path] = []
    if stage in ("bench", "load"):
        files.append(bench.PROMPTS)
    elif stage in ("drift", "drift_base"):
        files.append(drift.TEXT)
    for task in tasks:
        if isinstance(task, str):
            files.append(evals.BUILTIN[task])
        else:  # a user's task derives one of the question/answer bases
            files += sorted(evals.EVALS.glob("_qa_*"))
    read = _with_references(files, evals.EVALS)
    if not read:
        return {}
    return {"evals": {_evals_name(p, evals.EVALS): file_sha256(p) for p in read}}


def _with_references(files: Iterable[Path], root: Path) -> list[Path]:
    """The files and what task YAML among them pulls in: `include:`s, `!function` modules
    and the data files it names (lm-eval reads relative ones from the repository root)."""
    seen: dict[Path, None] = {}
    todo = list(files)
    while todo:
        path = todo.pop(0)
        if path in seen:
            continue
        if not path.is_file():
            raise ForgebenchError(f"{path}: evaluation file not found")
        seen[path] = None
        if path.suffix == ".yaml" or path.name.endswith("_yaml"):
            todo += _yaml_references(path, root)
    return sorted(seen)


def load_task_yaml(text: str) -> Any:
    """lm-eval task YAML, loaded safely: yaml's SafeLoader (plain data, never a Python
    object) taught one more tag, `!function module.name`, which it keeps as the marker
    {"!function": "module.name"} for the walk below instead of importing anything."""

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_constructor("!function", lambda loader, node: {"!function": node.value})
    return yaml.load(text, Loader=TaskLoader)  # safe: TaskLoader is the SafeLoader above


def _yaml_references(path: Path, root: Path) -> list[Path]:
    config = load_task_yaml(path.read_text()) or {}
    includes = config.get("include") or []
    out = [path.parent / name for name in ([includes] if isinstance(includes, str) else includes)]
    out += [path.parent / f"{fn.rsplit('.', 1)[0]}.py" for fn in _functions(config)]
    data_files = (config.get("dataset_kwargs") or {}).get("data_files") or []
    for name in _strings(data_files):  # "evals/data/...": relative to the repository root
        candidates = [root.parent / name, root / name] if not Path(name).is_absolute() else []
        out.append(next((c for c in candidates if c.is_file()), Path(name)))
    return out


def _functions(node: Any) -> list[str]:
    if isinstance(node, dict):
        if set(node) == {"!function"}:
            return [node["!function"]]
        return [f for value in node.values() for f in _functions(value)]
    if isinstance(node, list):
        return [f for item in node for f in _functions(item)]
    return []


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    values = node.values() if isinstance(node, dict) else node
    return [s for value in values for s in _strings(value)]


def _evals_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def served_identity(backend: str) -> dict[str, str]:
    """The server a served stage runs on: Ollama's version (a new release may template,
    sample or count differently). llama-server is the llama.cpp tools' identity."""
    if backend != "ollama":
        return {}
    return {"ollama": _ollama_version(ollama_host())}


@functools.cache
def _ollama_version(host: str) -> str:
    import httpx

    try:
        reply = httpx.get(f"{host}/api/version", timeout=2.0)
        reply.raise_for_status()
        return str(reply.json()["version"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ForgebenchError(
            f"Ollama at {host} did not answer GET /api/version ({reason}): start it "
            "(`ollama serve`), point OLLAMA_HOST at it, or set serve.backend: llamacpp"
        ) from None


def llama_cpp_identity(stage: str, backend: str = "") -> dict[str, str]:
    """The llama.cpp revision, and with FORGEBENCH_LLAMA_CPP_BIN the tools this stage runs."""
    if stage not in LLAMA_CPP:
        return {}
    served = ("llama-server",) if backend == "llamacpp" and stage in SERVED else ()
    return toolchain.identity((*LLAMA_CPP[stage], *served))


def resolved_precision(precision: str) -> str:
    """`auto` as harness.stages.train.use_bf16 decides it here ("bf16" or "fp32"), found
    without importing torch (1.7 s and 220 MB on the 2-core CPU box, at every plan):
    a CUDA/ROCm build of torch with a GPU visible means bf16, as torch.cuda.is_bf16_supported
    says of any GPU it can emulate bf16 on; else the CPU's avx512_bf16 / amx_bf16 flags,
    unless ATen is held below its AVX-512 kernels (`ATEN_CPU_CAPABILITY`, which torch reads)."""
    if precision != "auto":
        return precision
    if gpu_visible():
        return "bf16"
    if os.environ.get("ATEN_CPU_CAPABILITY", "avx512").lower() != "avx512":
        return "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"


def gpu_visible() -> bool:
    """torch was built for CUDA (or ROCm) and such a device is there and not hidden: what
    torch.cuda.is_available() would say, read from torch's build file and /dev instead."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    try:
        build = (Path(folders[0]) / "version.py").read_text() if folders else ""
    except OSError:
        build = ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("HIP_VISIBLE_DEVICES"))
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if re.search(r"^cuda\b[^=\n]*=\s*['\"]", build, re.MULTILINE):
        return any(Path("/dev").glob("nvidia[0-9]*"))
    if re.search(r"^hip\b[^=\n]*=\s*['\"]", build, re.MULTILINE):
        return Path("/dev/kfd").exists()
    return False


def versions(stage: str, backend: str = "", tasks: Sequence[Any] = ()) -> dict[str, Any]:
    """Everything above that applies to `stage`, for its StageCall's versions. `backend` only
    for the served stages; `tasks` only for the stages that score evaluate.tasks."""
    out: dict[str, Any] = dict(stage_version(stage))
    out |= evals_identity(stage, tasks)
    out |= llama_cpp_identity(stage, backend)
    if stage in SERVED:
        out |= served_identity(backend)
    return out


def differs_here(call: Any) -> str | None:
    """What this machine would build `call` with that its key does not say (a package, a
    stage's logic, the llama.cpp tools), as a one-line refusal; None when all agree. A
    worker on another node checks this before building, so a key never names an output
    that other versions made."""
    from importlib import metadata

    backend = call.settings.get("backend", "")
    here: dict[str, Any] = stage_version(call.stage) | llama_cpp_identity(call.stage, backend)
    if call.stage in SERVED:
        here |= served_identity(backend)
    for name, wanted in call.versions.items():
        if name == "evals":  # by content, where this node's evals/ has the file
            changed = [
                file
                for file, sha in wanted.items()
                if (evals.EVALS / file).is_file() and file_sha256(evals.EVALS / file) != sha
            ]
            if changed:
                return (
                    f"{call.stage}: this node's evals/ differs from the plan's "
                    f"({', '.join(changed)}): "
                    "install the driver's forgebench on every node"
                )
            continue
        if name not in here:
            try:
                here[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                here[name] = "not installed"
        if here[name] != wanted:
            return (
                f"{call.stage}: this node has {name} {here[name]} where the plan has {wanted}: "
                "install the driver's versions on every node"
            )
    return None
