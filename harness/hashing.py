"""Files by content: what a cache key sees of a file or folder that settings name.

Key machinery, not stage logic: harness.plan.keys leaves this module out of the sources
a stage's VERSION answers for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from harness import env
from harness.errors import ForgebenchError


def digest(path: Path) -> str:
    """The sha256 of a file's bytes, read now."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


PERSIST_BYTES = 32 << 20
"""Files at least this big keep their hash across processes (a multi-GB base would
otherwise be read at every plan); smaller ones are hashed again in each process."""
_memo: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """`digest`, remembered while the file's size, mtime and inode stay put (the check
    git's index makes): a file copied elsewhere is hashed once more, to the same value."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    memo = (str(path), *stamp)
    if memo in _memo:
        return _memo[memo]
    big = st.st_size >= PERSIST_BYTES
    entry = _persisted().get(str(path)) if big else None
    if entry and entry[:-1] == stamp:
        found = entry[-1]
    else:
        found = digest(path)
        if big:
            _persist(str(path), [*stamp, found])
    _memo[memo] = found
    return found


def tree_sha256(folder: Path) -> str:
    """One sha256 over every file in a folder: relative names (sorted) and contents.

    Dot-files and dot-folders are left out: `hf download --local-dir` keeps download
    metadata with timestamps in `.cache/`, which no model loader reads."""
    folder = Path(folder)
    lines = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(root) / name
                lines.append(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def content_sha256(path: Path, what: str = "file") -> str:
    """A file's or a folder's content hash; `what` names it in the error when it is missing."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        return tree_sha256(path)
    raise ForgebenchError(f"{what}: file not found: {path}")


def _cache_file() -> Path:
    return env.cache_root() / "sha256.json"


def _persisted() -> dict[str, list]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _persist(path: str, entry: list) -> None:
    """Add one entry; written whole to a temporary file and renamed, so a reader never
    sees half a file (two writers at once may lose an entry: it is hashed again)."""
    cache = {p: e for p, e in _persisted().items() if os.path.exists(p)} | {path: entry}
    target = _cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only cache only costs hashing again
