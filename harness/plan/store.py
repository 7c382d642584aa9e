"""A content-addressed store of stage outputs.

A stage's output folder is named by its key, the hash of everything the output
depends on (stage name, its settings, with the files they name taken by content,
its inputs' keys and the versions of the code it runs: harness.plan.keys). A folder is
built under a temporary name and renamed into place only when complete, with its
manifest written last, so a folder that exists is a finished output and a crash
leaves nothing that could be mistaken for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from filelock import FileLock

from harness.hashing import content_sha256, digest

MANIFEST = "manifest.json"
DEFAULT_ROOT = Path(".forgebench") / "store"


@dataclass(frozen=True)
class StageCall:
    """One stage applied to its settings and inputs: the unit the store caches."""

    stage: str
    settings: dict[str, Any]
    inputs: dict[str, StageCall] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    """Options that change how the stage runs but not what it produces (not in the key)."""

    @cached_property
    def key(self) -> str:
        """Files the settings name count by content, not by path (`portable`)."""
        payload = {
            "stage": self.stage,
            "settings": portable(self.settings),
            "inputs": {name: call.key for name, call in sorted(self.inputs.items())},
            "versions": self.versions,
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StageCall) and other.key == self.key


class Store:
    def __init__(self, root: Path | str = DEFAULT_ROOT):
        self.root = Path(root).absolute()

    def path(self, call: StageCall) -> Path:
        return self.root / call.stage / call.key

    def scratch(self, call: StageCall) -> Path:
        """A folder that survives a killed run (checkpoints), removed once the call is built."""
        return self.root / "scratch" / call.stage / call.key

    def has(self, call: StageCall) -> bool:
        return (self.path(call) / MANIFEST).is_file()

    def manifest(self, call: StageCall) -> dict[str, Any]:
        return json.loads((self.path(call) / MANIFEST).read_text())

    @contextmanager
    def lock(self, call: StageCall) -> Iterator[None]:
        """Hold the call's lock: a second process building the same key waits, then reuses.

        An OS file lock (flock, through filelock) is released by the kernel when its
        holder dies, so a killed run never leaves a stale lock behind.
        """
        folder = self.root / call.stage
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / f".{call.key}.lock"):
            yield

    @contextmanager
    def building(self, call: StageCall) -> Iterator[Path]:
        """Yield an empty temporary folder; on success it becomes the call's output.
        Hold `lock(call)` around it.

        The manifest records the inputs, a sha256 of every output file, the
        time taken and the versions used; it is written last, inside the
        temporary folder, and the folder is renamed into place atomically.
        """
        final = self.path(call)
        # Call it holding the key's lock: every other builder of this key is then dead,
        # and what a killed one left half-written is only taking up disk.
        for stale in final.parent.glob(f".tmp-{call.key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".tmp-{call.key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        started = time.time()
        try:
            yield tmp
            manifest = {
                "stage": call.stage,
                "key": call.key,
                "settings": call.settings,
                "inputs": {name: dep.key for name, dep in call.inputs.items()},
                "versions": call.versions,
                "seconds": round(time.time() - started, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "outputs": {
                    str(p.relative_to(tmp)): digest(p)
                    for p in sorted(tmp.rglob("*"))
                    if p.is_file()
                },
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            if final.exists():  # a concurrent builder finished first; theirs is as good
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
            shutil.rmtree(self.scratch(call), ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


PATH_SETTINGS = (
    ("base", "path"),
    ("base", "gguf"),
    ("base", "resolved", "path"),  # an Ollama model's local HF copy
    ("data", "train"),
    ("lora", "replay"),
    ("lora", "resume_from"),  # a peft adapter folder, by its content
    ("adapter",),  # the adopt stage's adapter folder
    ("calibration", "path"),  # an imatrix recipe's calibration file
    ("task_text", "task", "path"),  # drift.task on a task of the user's own
    ("evaluate", "tasks", "*", "path"),
    ("evaluate", "guard", "*", "path"),
)
"""Where stage settings name a user's file or folder (absolute once a spec is loaded)."""


def portable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as a key sees them: every file they name replaced by "sha256:<content>".

    The stage itself still gets the paths (it has to read them); only the key drops them,
    so the same spec copied to another folder, or a moved checkout, keeps its keys while
    an edited file changes them."""
    out = json.loads(json.dumps(settings, default=str))
    for location in PATH_SETTINGS:
        _replace(out, location)
    return out


def _replace(node: Any, location: tuple[str, ...], where: str = "") -> None:
    head, *rest = location
    if head == "*":
        for i, item in enumerate(node if isinstance(node, list) else []):
            _replace(item, tuple(rest), f"{where}[{i}]")
        return
    if not isinstance(node, dict) or node.get(head) is None:
        return
    here = f"{where}.{head}" if where else head
    if rest:
        _replace(node[head], tuple(rest), here)
    elif isinstance(node[head], str):
        node[head] = f"sha256:{content_sha256(Path(node[head]), here)}"
