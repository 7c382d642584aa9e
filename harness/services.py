"""Whether a service a run talks to (a tracking server, an Ollama host) answers at all,
asked with a short timeout: a server that accepts and never replies would otherwise hold
a run for minutes of client retries."""

from __future__ import annotations

import os
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import httpx

from harness.errors import InputError

SERVICE_TIMEOUT_S = 3.0
"""How long a tracking server or Ollama host may take to answer before the command stops."""


def answers(url: str, what: str, fix: str, verify: Any = True) -> None:
    """Stop with one line when `url` does not answer an HTTP request in SERVICE_TIMEOUT_S: a
    server that accepts and never replies would otherwise hold the run for minutes of
    client retries. Any HTTP answer counts; what it says is the client's business."""
    parts = urlsplit(url)  # the address without any user:password@ it may carry
    address = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    try:
        httpx.get(url, timeout=SERVICE_TIMEOUT_S, verify=verify)
    except httpx.TimeoutException:
        raise InputError(
            f"{what}: {address} did not answer within {SERVICE_TIMEOUT_S:g} s; {fix}"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        reason = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)) or type(exc).__name__
        raise InputError(f"{what}: {address} does not answer ({reason}); {fix}") from None


def mlflow_tls() -> Any:
    """How the MLflow client verifies a tracking server's certificate, from its own settings
    (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH), for `answers`."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    if not cert:
        return True
    try:
        return ssl.create_default_context(cafile=cert)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(
            f"MLFLOW_TRACKING_SERVER_CERT_PATH: cannot read certificates from {cert} "
            f"({getattr(exc, 'strerror', None) or exc}); point it at a PEM file"
        ) from None
