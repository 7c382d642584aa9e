"""The llama.cpp toolchain: one revision for converter, quantizer and runtime.

A GGUF written by one llama.cpp revision and read by another can differ in
tokenizer handling and tensor layout, so the converter is taken from the very
llama.cpp tree that the installed llama-cpp-python was built from: its source
distribution carries that tree (`vendor/llama.cpp`). `ensure_source()` fetches
that source distribution once with pip into a per-version cache folder. Users
with their own matching llama.cpp checkout point `FORGEBENCH_LLAMA_CPP` at it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from harness import env
from harness.errors import ForgebenchError, StageError
from harness.hashing import file_sha256

PACKAGE = "llama-cpp-python"
CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
TOOLS = (
    "llama-server",
    "llama-bench",
    "llama-batched-bench",
    "llama-perplexity",
    "llama-quantize",
    "llama-imatrix",
)
PORTABLE_FLAGS = (
    # A native build (-march=native) segfaults on quantized models on CPUs that
    # advertise AMX; these flags run on any x86-64 with AVX2.
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
)


def runtime_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ForgebenchError(
            f"{PACKAGE} is not installed; install forgebench with its dependencies "
            "(see the README: tox -e forgebench -- quickstart does it for you)"
        ) from None


def source_dir() -> Path:
    """Where the llama.cpp tree is (or will be once `ensure_source` ran)."""
    if own := os.environ.get("FORGEBENCH_LLAMA_CPP"):
        return Path(own)
    return env.cache_root() / "llama.cpp" / f"{PACKAGE}-{runtime_version()}"


def revision() -> str:
    """A name for the llama.cpp revision, recorded in stage keys and lineage.

    The source distribution carries no git metadata, so the vendored tree is
    named by the llama-cpp-python release that pins it.
    """
    if own := os.environ.get("FORGEBENCH_LLAMA_CPP"):
        head = _git_head(Path(own))
        if head:
            return f"llama.cpp@{head}"
        # not a git checkout: name it by its converter, never by where it is
        return f"llama.cpp with {CONVERTER} sha256:{file_sha256(converter())[:16]}"
    return f"llama.cpp vendored in {PACKAGE}=={runtime_version()}"


def identity(tools: tuple[str, ...] = ()) -> dict[str, str]:
    """What a stage key records of llama.cpp: the revision, and when the user's own
    programs run (FORGEBENCH_LLAMA_CPP_BIN) the content of those it runs and of the shared
    libraries beside them, which a rebuild in place changes without any version showing.
    Tools built by `build_tools()` are the revision's own, so the revision names them."""
    out = {"llama.cpp": revision()}
    own = os.environ.get("FORGEBENCH_LLAMA_CPP_BIN")
    if own and tools:
        folder = Path(own)
        files = {name: tool(name) for name in tools}
        files |= {p.name: p for p in folder.glob("lib*.so*") if p.is_file()}
        files |= {p.name: p for p in folder.glob("lib*.dylib") if p.is_file()}
        out["llama.cpp-bin"] = ", ".join(
            f"{name} {file_sha256(path)[:16]}" for name, path in sorted(files.items())
        )
    return out


def _git_head(folder: Path) -> str | None:
    if not (folder / ".git").exists() or shutil.which("git") is None:
        return None
    done = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def converter(name: str = CONVERTER) -> Path:
    """One of the tree's converters: the model's (default) or LORA_CONVERTER."""
    path = ensure_source() / name
    if not path.is_file():
        raise ForgebenchError(
            f"{path} is missing: FORGEBENCH_LLAMA_CPP must be a llama.cpp checkout"
        )
    return path


def ensure_source(log=print) -> Path:
    """Return the llama.cpp tree, fetching the pinned source distribution once."""
    target = source_dir()
    if (target / CONVERTER).is_file() or "FORGEBENCH_LLAMA_CPP" in os.environ:
        return target
    version = runtime_version()
    log(f"fetching the llama.cpp source of {PACKAGE}=={version} (once) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{PACKAGE}=={version}",
                "--dest",
                tmp,
            ],
            capture_output=True,
            text=True,
        )
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no archive"
            raise ForgebenchError(
                f"could not fetch the {PACKAGE}=={version} source distribution with pip "
                f"({reason}); "
                "set FORGEBENCH_LLAMA_CPP to a llama.cpp checkout of the same revision instead"
            )
        staged = Path(tmp) / "llama.cpp"
        _extract_vendored_tree(archives[0], staged)
        if not (staged / CONVERTER).is_file():
            raise ForgebenchError(f"{archives[0].name} carries no vendor/llama.cpp/{CONVERTER}")
        os.rename(staged, target)
    return target


def _extract_vendored_tree(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp"):
                member.name = str(Path(*parts[3:]))
                members.append(member)
        tar.extractall(dest, members=members, filter="data")


def tool(name: str) -> Path:
    """A llama.cpp program of the pinned revision: PATH or FORGEBENCH_LLAMA_CPP_BIN when the
    user has one, else the one `build_tools()` made."""
    if own := os.environ.get("FORGEBENCH_LLAMA_CPP_BIN"):
        path = Path(own) / name
    else:
        path = build_dir() / "bin" / name
    if not path.is_file():
        raise ForgebenchError(f"{name} not found at {path}: run `forgebench setup` first")
    return path


def build_dir() -> Path:
    return source_dir() / "build"


def build_tools(log=print, jobs: int | None = None) -> Path:
    """Build the llama.cpp programs forgebench runs (`TOOLS`) once, with portable CPU flags."""
    if "FORGEBENCH_LLAMA_CPP_BIN" in os.environ:
        return Path(os.environ["FORGEBENCH_LLAMA_CPP_BIN"])
    bin_dir = build_dir() / "bin"
    if all((bin_dir / name).is_file() for name in TOOLS):
        return bin_dir
    if shutil.which("cmake") is None:
        raise ForgebenchError(
            "cmake is needed to build llama-server: install it (apt install cmake)"
            " or set FORGEBENCH_LLAMA_CPP_BIN to a folder with llama-server"
        )
    source = ensure_source(log)
    log(f"building {', '.join(TOOLS)} from {source} (once; a few minutes)")
    configure = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build_dir()),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        *PORTABLE_FLAGS,
    ]
    build = [
        "cmake",
        "--build",
        str(build_dir()),
        "--config",
        "Release",
        "-j",
        str(jobs or os.cpu_count() or 1),
        "--target",
        *TOOLS,
    ]
    log_file = source.parent / f"{source.name}-build.log"
    with log_file.open("w") as fh:
        for command in (configure, build):
            if subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                raise ForgebenchError(f"building llama.cpp failed; see {log_file}")
    return bin_dir


def run_tool(name: str, args: list[str], log: Path) -> str:
    """Run a llama.cpp program with its output in `log`, returning that output; a failure is
    a StageError quoting its first error line (else its last line) and naming the log."""
    with log.open("w") as fh:
        done = subprocess.run([str(tool(name)), *args], stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text()
    if done.returncode != 0:
        lines = text.strip().splitlines() or ["(no output)"]
        reason = next((li for li in lines if "error" in li.lower()), lines[-1])
        raise StageError(f"{name} failed (exit {done.returncode}): {reason}; see {log}")
    return text
