"""What `tox -e forgebench -- WHAT [ARGS]` runs: `tests` (the default), `quickstart` or `bench`.

One tox environment serves every README command. tox 4 records the environment's name in
.tox/forgebench/.tox-info.json and rebuilds the virtualenv from scratch ("env type changed")
when an environment of another name uses the same folder, so two named environments sharing
one folder reinstalled everything whenever a user switched between them. Here the name stays
the same and the command is chosen by the first positional argument; the rest go to pytest
(`tests`) or to `forgebench run` (`quickstart`); `bench` takes none.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

QUICKSTART = "experiments/quickstart.yaml"
BIN = Path(sys.executable).parent
"""The environment's own scripts, whatever PATH holds."""


def tool(name: str, *args: str) -> list[str]:
    return [str(BIN / name), *args]


def commands(what: str, extra: list[str]) -> list[list[str]]:
    """The command lines for `what`, run in order; the first that fails stops the rest."""
    if what == "tests":
        return [
            tool("ruff", "check", "harness", "tests", "benchmarks"),
            tool("forgebench", "setup"),
            tool("pytest", *extra),
        ]
    if what == "quickstart":
        return [
            tool("forgebench", "setup"),
            tool("forgebench", "run", QUICKSTART, *extra),
            tool("forgebench", "best", QUICKSTART),
            tool("forgebench", "report", QUICKSTART),
        ]
    if what == "bench" and not extra:
        return [
            tool("forgebench", "setup"),
            tool("python", "benchmarks/train_throughput.py"),
            tool("python", "benchmarks/serving.py"),
            tool("python", "benchmarks/ray_overhead.py"),
            tool("python", "benchmarks/routes.py"),
        ]
    raise KeyError(what)


def main(argv: list[str]) -> int:
    what, extra = (argv[0], argv[1:]) if argv else ("tests", [])
    try:
        lines = commands(what, extra)
    except KeyError:
        print(
            f"tox -e forgebench -- {' '.join(argv)}: not a command; use `tests [pytest args]`, "
            "`quickstart [forgebench run args]` or `bench`",
            file=sys.stderr,
        )
        return 2
    for line in lines:
        print("$", shlex.join([Path(line[0]).name, *line[1:]]), flush=True)
        code = subprocess.run(line, check=False).returncode
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
