"""The names of the tags forgebench's runs carry in MLflow, in one place: the writer sets
them, readers of results look them up. Their values are stored in every MLflow database
a run has logged to, so they never change.
"""

from __future__ import annotations

PARENT = "mlflow.parentRunId"
"""MLflow's own tag naming a child run's parent: a cell's run names its invocation's."""

# -- every run --------------------------------------------------------------------------------
RUN_KIND = "forgebench.kind"
"""What a run is: "invocation" (one per forgebench run of a spec) or "cell"."""

# -- an invocation's run ----------------------------------------------------------------------
VERSION = "forgebench.version"
SPEC_PATH = "forgebench.spec_path"
PID = "forgebench.pid"
HOST = "forgebench.host"
RESUMES = "forgebench.resumes"
"""The runs of killed invocations this one closed, comma separated."""
FAILED_CELLS = "forgebench.failed_cells"

# -- a cell's run, as built and measured ------------------------------------------------------
CELL = "forgebench.cell"
ADAPTER = "forgebench.adapter"
QUANT = "forgebench.quant"
ROUTE = "forgebench.route"
SETTING = "forgebench.setting"
"""A serving setting's name (`ctx8192-np4`), empty at the spec's own setting."""
STATUS = "forgebench.status"
BACKEND = "forgebench.backend"
LLAMA_CPP = "forgebench.llama_cpp"
LINEAGE = "forgebench.lineage"
"""Prefix: the cell's lineage, one tag per entry (`forgebench.lineage.gguf_sha256`)."""
KEY = "forgebench.key"
"""Prefix: each stage's key (`forgebench.key.train`)."""
CACHED = "forgebench.cached"
"""Prefix: whether each stage came from the store (`forgebench.cached.train`)."""
ERROR_DETAIL = "forgebench.error_detail"
"""Prefix: a failed stage's reason in full (`forgebench.error_detail.serve`)."""
ERROR = "forgebench.error"
DEPLOYED = "forgebench.deployed"
CHAT_TEMPLATE_SOURCE = "forgebench.chat_template.source"
CHAT_TEMPLATE_SHA256 = "forgebench.chat_template.sha256"
GGUF = "forgebench.gguf"

# -- a cell's run, as judged once every cell is known -----------------------------------------
MACHINE = "forgebench.machine"
CONFIDENCE = "forgebench.confidence"
PRIMARY_TASK = "forgebench.primary_task"
GUARD_TASKS = "forgebench.guard_tasks"
SCORER = "forgebench.scorer"
"""Prefix: how each task is scored (`forgebench.scorer.arithmetic`)."""
VERDICT = "forgebench.verdict"
VERDICT_REASONS = "forgebench.verdict_reasons"
VERDICT_NOTES = "forgebench.verdict_notes"
STEPS_LOST = "forgebench.steps_lost"
LOAD = "forgebench.load"
"""The load a load budget names (`users=4`, `rate=2`), at which the verdicts were judged."""

# -- a cell's run, marked after the run -------------------------------------------------------
BEST = "forgebench.best"
REGISTERED = "forgebench.registered"
