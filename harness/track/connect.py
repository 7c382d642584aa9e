"""Where runs are logged and how to reach it: the tracking URI a spec logs to, MLflow
clients set up to fail fast, and what a failure of the tracking store looks like. The
writer and the readers of runs both open their clients here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import requests
from filelock import FileLock

from harness import services
from harness.errors import InputError
from harness.spec import Spec

DEFAULT_URI = "sqlite:///mlflow.db"

# MLflow announces a new sqlite store at INFO ("Creating initial MLflow database tables...",
# "Updating database tables") on the console of whichever command opens it first; nobody asked
# for that. Its warnings and errors still show.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""MLflow's client retries a failed request 7 times with a backoff factor of 2 and waits 120 s
for each answer: a run whose tracking server stopped sat silent for 8 minutes, then died. With
these, a request to a stopped server fails in about 3 s (two retries, 1 and 2 s apart) and one
to a server that hangs in about 33 s. And with a tracking server, MLflow prints two lines
("View run ... at", "View experiment at") for every run it closes, into the middle of the
progress display; the run prints its own link at the end. A value the user set wins (MLflow
reads them per request)."""


def tracking_uri(spec: Spec) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri or DEFAULT_URI


@contextlib.contextmanager
def first_use_lock(uri: str):
    """Two runs started together on a new sqlite store would both create its tables and
    the experiment, and one would fail; an OS lock beside the database file serializes
    that first use (released by the kernel if its holder dies)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        yield


def client(uri: str):
    from mlflow.tracking import MlflowClient

    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(uri)


def tracking_failure(error: BaseException) -> bool:
    """An error of the tracking store (MLflow's own, or the HTTP client's underneath it),
    rather than a bug of ours."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException | requests.RequestException)


def answers(uri: str) -> bool:
    """Whether a tracking server answers at all, asked as `validate` asks it (the same
    timeout, and the certificate settings MLflow's client uses)."""
    try:
        services.answers(f"{uri.rstrip('/')}/health", "MLflow", "", services.mlflow_tls())
    except InputError:
        return False
    return True


def reader(uri: str):
    """A client for reading what runs logged: a sqlite store that does not exist is refused,
    where MLflow would create an empty database (and ./mlruns) on the way to an empty answer."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(
            f"no MLflow database at {uri}: run a spec first, or pass --tracking-uri (or "
            "MLFLOW_TRACKING_URI) where it logged"
        )
    return client(uri)
