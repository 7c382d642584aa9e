"""evaluate: accuracy of the served model, scored by lm-eval through its OpenAI endpoint.

Spec keys: `evaluate.*` (`tasks`, `limit`, `concurrency`) and `data` (the
arithmetic task's held-out split). Each task runs through
`lm_eval.simple_evaluate` with lm-eval's `local-chat-completions` model against
the deployment's `/v1/chat/completions`: the server applies the model's own
chat template, as it does for users, so no tokenizer is loaded (none could be
downloaded anyway) and requests go out as chat messages, `num_concurrent` at a
time into the server's parallel slots. Per task and filter the result is the
exact-match score with a 95% Wilson interval on the per-item scores, under
MLflow-safe names; every item's prompt, reply, extracted answer and score goes
to `samples_<task>.jsonl`, keyed by lm-eval's doc id, so that two cells can be
compared item by item.

A server that dies mid-scoring ends the stage at the first request that cannot reach
it, with the backend's account of how it stopped (`ServerStopped`), instead of lm-eval
retrying every pending request three times and logging a traceback for each.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.backends import ServerStopped
from harness.data import evals
from harness.data.evals import EvalTask
from harness.stages import Progress

VERSION = 2  # bump when this stage's outputs change: tests/test_keys.py checks it

METRIC = "exact_match"
Z_95 = 1.959963984540054
UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/ ]")
"""Characters MLflow refuses in a metric name."""


def wilson(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike the normal approximation it stays
    inside [0, 1] and is honest at 0/n and n/n, which small evals often hit."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # mathematically low <= p <= high; min/max keep it so in floating point at 0/n and n/n
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def short_filter(name: str) -> str:
    """lm-eval's filter name, shortened: "strict-match" -> "strict"."""
    return name.split("-")[0]


def metric_name(task: str, key: str, several_filters: bool) -> str | None:
    """An lm-eval result key ("exact_match,strict-match") as a forgebench metric name
    ("gsm8k_exact_match_strict"); None for keys that are not scores (alias, sample_len).
    The filter is named only where a task has several, so a one-filter task's score
    keeps one stable name."""
    metric, comma, filter_name = key.partition(",")
    if not comma:
        return None
    stderr = metric.endswith("_stderr")
    name = f"{task}_{metric.removesuffix('_stderr')}"
    if several_filters:
        name += f"_{short_filter(filter_name)}"
    return UNSAFE.sub("_", name + ("_stderr" if stderr else ""))


def model_args(openai_base_url: str, model_name: str, concurrency: int) -> dict[str, Any]:
    """lm-eval's chat-completions client with no tokenizer: the server renders the chat
    template, and lm-eval needs a tokenizer only for loglikelihood tasks, which chat
    endpoints cannot serve."""
    return {
        "base_url": f"{openai_base_url}/chat/completions",
        "model": model_name,
        "tokenizer_backend": None,
        "tokenized_requests": False,
        "num_concurrent": concurrency,
    }


class _Gone(BaseException):
    """Carries a dead server's `ServerStopped` out of lm-eval's request loop. tenacity
    retries any Exception (three tries with backoff, per request); a BaseException is what
    it lets through at once. `evaluate` turns it back into the ServerStopped."""

    def __init__(self, stopped: ServerStopped) -> None:
        super().__init__(stopped.how)
        self.stopped = stopped


class _DropGone(logging.Filter):
    """asyncio logs every request task that ended on `_Gone` and was never awaited (the
    ones in flight beside the first to fail) with a traceback of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Gone))


_DROP_GONE = _DropGone()


def watched_model(
    args: dict[str, Any],
    stopped: Callable[[], ServerStopped | None],
    request_fields: dict[str, Any] | None = None,
) -> Any:
    """lm-eval's chat-completions client that, when a request cannot connect, asks
    `stopped` whether the server is gone; once it is, every request, retries included,
    raises `_Gone` without being sent. `answered` counts the requests that got an answer.
    Every request carries the deployment's `request_fields` (the adapter it applies)."""
    import aiohttp
    import requests
    from lm_eval.models.openai_completions import LocalChatCompletion

    unreachable = (aiohttp.ClientConnectionError, requests.ConnectionError)
    logging.getLogger("asyncio").addFilter(_DROP_GONE)

    class Watched(LocalChatCompletion):
        gone: ServerStopped | None = None
        answered = 0

        def _failed(self, exc: Exception) -> None:
            # once gone, any failure is the death's (aiohttp's "Session is closed" included)
            if self.gone is None and isinstance(exc, unreachable):
                self.gone = stopped()
            if self.gone is not None:
                raise _Gone(self.gone) from None

        def _create_payload(self, *args: Any, **kwargs: Any) -> dict:
            return super()._create_payload(*args, **kwargs) | (request_fields or {})

        def model_call(self, *args: Any, **kwargs: Any) -> Any:
            if self.gone is not None:
                raise _Gone(self.gone)
            try:
                reply = super().model_call(*args, **kwargs)
            except Exception as exc:
                self._failed(exc)
                raise
            self.answered += 1
            return reply

        async def amodel_call(self, *args: Any, **kwargs: Any) -> Any:
            if self.gone is not None:
                raise _Gone(self.gone)
            try:
                reply = await super().amodel_call(*args, **kwargs)
            except Exception as exc:
                self._failed(exc)
                raise
            self.answered += 1
            return reply

    return Watched(**args)


def sample_rows(samples: list[dict[str, Any]], primary: str | None) -> list[dict[str, Any]]:
    """lm-eval's logged samples (one per item and filter) as one row per item."""
    by_doc: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for sample in samples:
        by_doc[sample["doc_id"]][sample["filter"]] = sample
    rows = []
    for doc_id in sorted(by_doc):
        filters = by_doc[doc_id]
        main = filters[primary or next(iter(filters))]
        row = {
            "doc_id": doc_id,
            "prompt": _prompt(main["arguments"][0][0]),
            "response": main["resps"][0][0],
            "target": main["target"],
            "extracted": main["filtered_resps"][0],
            "correct": bool(main[METRIC]),
        }
        if len(filters) > 1:
            row["filters"] = {
                short_filter(name): {
                    "extracted": s["filtered_resps"][0],
                    "correct": bool(s[METRIC]),
                }
                for name, s in filters.items()
            }
        rows.append(row)
    return rows


def _prompt(context: Any) -> Any:
    """The request as sent: chat messages for an API model (lm-eval logs its JSON string
    wrapped in a one-field tuple), the rendered text for an in-process one."""
    return context if isinstance(context, str) else json.loads(context[0])


def task_metrics(
    task: EvalTask, results: dict[str, Any], samples: list[dict[str, Any]]
) -> dict[str, float]:
    """Scores under forgebench names, each with its Wilson interval, and the task's
    accuracy (its primary filter's score) as `accuracy_<task>`."""
    filters = sorted({s["filter"] for s in samples})
    several = len(filters) > 1
    out: dict[str, float] = {f"{task.name}_items": float(len(samples) // len(filters))}
    for key, value in results.items():
        name = metric_name(task.name, key, several)
        if name is not None and isinstance(value, int | float):
            out[name] = float(value)
    for filter_name in filters:
        scores = [bool(s[METRIC]) for s in samples if s["filter"] == filter_name]
        low, high = wilson(sum(scores), len(scores))
        name = metric_name(task.name, f"{METRIC},{filter_name}", several)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        if filter_name == (task.primary_filter or filters[0]):
            out[f"accuracy_{task.name}"] = sum(scores) / len(scores)
            out[f"accuracy_{task.name}_ci_low"] = out[f"{name}_ci_low"]
            out[f"accuracy_{task.name}_ci_high"] = out[f"{name}_ci_high"]
    return out


def write_samples(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _quiet_git_hash() -> str | None:
    """lm-eval's own `get_git_commit_hash` runs `git describe` and lets git's "fatal: not a
    git repository" through to the console whenever the working folder is not a checkout;
    this asks the same and keeps git's stderr. forgebench records its lineage itself."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always"], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return None
    return done.stdout.strip() or None


def score(
    model: Any,
    tasks: list[EvalTask],
    limit: int | None,
    out: Path,
    model_args: dict[str, Any] | None = None,
    system: str | None = None,
    only: dict[str, list[int]] | None = None,
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """Score `tasks` with an lm-eval model (a registry name with `model_args`, or an `LM`);
    metrics per task and filter, and one row per item, also written to `out`.

    All tasks go through one `simple_evaluate` call: each call also collects torch's
    environment report (seconds of subprocesses), which per task would weigh on the
    items/s of a small eval. `system` is the system prompt, sent as a chat message the way
    the backends' own chat requests send it. `only` restricts a task to some doc ids.
    """
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash

    # with no tokenizer lm-eval cannot name the EOS string and says so per request batch
    # (the server stops at the model's own end-of-generation token regardless), and it
    # logs every failed attempt of a request ("Exception: ..., retrying."), whose last
    # failure is raised anyway and becomes the stage's error
    logging.getLogger("lm_eval.models.api_models").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    result = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[str(task.config) for task in tasks],
        limit=None if only else limit,
        samples={evals.lm_eval_name(name): ids for name, ids in only.items()} if only else None,
        apply_chat_template=True,
        system_instruction=system,
        log_samples=True,
        task_manager=TaskManager(include_path=str(evals.EVALS), include_defaults=False),
    )
    seconds = time.perf_counter() - started
    metrics: dict[str, float] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        samples = result["samples"][task.lm_eval_name]
        rows[task.name] = sample_rows(samples, task.primary_filter)
        write_samples(rows[task.name], out / f"samples_{task.name}.jsonl")
        metrics |= task_metrics(task, result["results"][task.lm_eval_name], samples)
    items = sum(metrics[f"{task.name}_items"] for task in tasks)
    metrics["eval_seconds"] = round(seconds, 3)
    metrics["eval_items_per_s"] = round(items / seconds, 4)
    return metrics, rows


def evaluate(
    openai_base_url: str,
    model_name: str,
    tasks: list[EvalTask],
    limit: int | None,
    concurrency: int,
    out: Path,
    system: str | None = None,
    only: dict[str, list[int]] | None = None,
    stopped: Callable[[], ServerStopped | None] = lambda: None,
    request_fields: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Score `tasks` on a served model through its OpenAI endpoint, `concurrency` at a time,
    each request with `request_fields` (the deployment's). `stopped` is the backend's word
    on whether the server is gone (asked when a request cannot connect); a dead server
    raises its `ServerStopped`, saying how far scoring got."""
    model = watched_model(
        model_args(openai_base_url, model_name, concurrency), stopped, request_fields
    )
    try:
        metrics, _ = score(model, tasks, limit, out, system=system, only=only)
    except _Gone as gone:
        raise gone.stopped.after(model.answered) from None
    return metrics


def stopped_of(served: Any) -> Callable[[], ServerStopped | None]:
    """The served deployment's `Backend.stopped`, asked only after a request failed."""
    return lambda: served.backend.stopped(served.deployment)


def scored_tasks(settings: dict[str, Any]) -> list:
    """The spec's tasks and then its guard tasks, as the stage settings hold them."""
    spec = settings["evaluate"]
    return [*spec["tasks"], *spec.get("guard", [])]


def run(
    settings: dict[str, Any], inputs: dict[str, Path], out: Path, progress: Progress, served
) -> dict:
    """The task files are made (and a user's JSONL checked) before the model is deployed;
    they live in a temporary folder because they name absolute paths, which would not
    survive this output folder's move into the store."""
    spec = settings["evaluate"]
    with tempfile.TemporaryDirectory(prefix="forgebench-eval-") as folder:
        tasks = evals.prepare(scored_tasks(settings), settings["data"], Path(folder))
        served.deploy()
        progress(f"lm-eval: {', '.join(t.name for t in tasks)}", None)
        deployment = served.deployment
        return evaluate(
            deployment.openai_base_url,
            deployment.model_name,
            tasks,
            spec["limit"],
            spec["concurrency"],
            out,
            system=settings["serve"].get("system"),
            stopped=stopped_of(served),
            request_fields=deployment.request_fields,
        )
