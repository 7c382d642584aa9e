"""The suite leaves a user's things alone: run from a shell whose MLFLOW_TRACKING_URI and
FORGEBENCH_STORE point at the user's tracking store and stage store (tox passes both through),
a test session logs to MLflow and plans with the defaults, and nothing lands at those places
or in the folder it was started from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

INNER = """\
import os
from pathlib import Path

from typer.testing import CliRunner

from harness import spec
from harness import track
from harness.cli import app

SPEC = '''\\
name: isolated
base: {model: smollm2-135m}
data: {task: arithmetic, n_train: 40, n_eval: 20}
lora: [{name: a, r: 4, alpha: 8, target_modules: [q_proj]}]
quant: [q8_0]
budgets: {tolerance: 0.3}
'''


def test_defaults_point_into_the_session(tmp_path):
    path = tmp_path / "isolated.yaml"
    path.write_text(SPEC)
    loaded = spec.load(path)
    assert track.tracking_uri(loaded) == track.DEFAULT_URI
    assert "FORGEBENCH_STORE" not in os.environ
    assert Path.cwd() != Path(os.environ["STARTED_IN"])
    with track.Experiment(loaded, path):  # a parent run with the spec as its artifact
        pass
    planned = CliRunner().invoke(app, ["plan", str(path)])
    assert planned.exit_code == 0, planned.output
"""


def test_a_session_writes_nothing_where_the_users_shell_points(tmp_path):
    user, started, inner = tmp_path / "user", tmp_path / "clone", tmp_path / "inner"
    for folder in (user, started, inner):
        folder.mkdir()
    (inner / "test_inner.py").write_text(INNER)
    env = dict(os.environ)
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{user / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "theirs",
        "FORGEBENCH_STORE": str(user / "store"),
        "STARTED_IN": str(started),
        "PYTHONPATH": str(HERE),  # the suite's conftest, loaded as a plugin
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
         f"--basetemp={inner / 'tmp'}", str(inner / "test_inner.py")],
        cwd=started,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(user.iterdir()) == [], "the user's tracking store and stage store are untouched"
    # pytest-benchmark makes its (empty) .benchmarks folder where pytest starts, as it does
    # in any session; what forgebench writes must land elsewhere
    left = sorted(p.name for p in started.iterdir() if p.name != ".benchmarks")
    assert left == [], "no mlflow.db, mlruns or store in the folder the user started in"
