"""How the MLflow UI shows forgebench's runs: the experiment's kind, forgebench's saved
view of the cells, and the command or address that opens it. The writer declares the
view on each experiment it logs to; the command line prints where to look.
"""

from __future__ import annotations

from typing import Any

from harness.spec import Spec
from harness.track import connect, schema

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
"""MLflow's tag for what an experiment is: model training ("Machine learning" in the UI), not
the GenAI apps the UI otherwise assumes for an experiment without traces."""
VIEW = "forgebench"
"""The experiment's saved runs view, kept as the MLflow UI keeps the views it saves (an
experiment tag `mlflow.sharedViewState.<id>`; the UI's Views menu lists it)."""
VIEW_TAG = f"mlflow.sharedViewState.{VIEW}"


def ui_command(uri: str, experiment: str | None = None) -> str:
    """How to look at the results; given the experiment, also the address that opens it in
    MLflow's model-training view on forgebench's view of the cells (`mlflow ui` serves at
    127.0.0.1:5000). MLflow 3.17's UI takes the view kind from the address (`workflowType`)
    before the experiment's kind tag."""
    server = uri.startswith(("http://", "https://"))
    command = f"open {uri}" if server else f"mlflow ui --backend-store-uri {uri}"
    found = connect.client(uri).get_experiment_by_name(experiment) if experiment else None
    if found is None:
        return command
    where = uri.rstrip("/") if server else "http://127.0.0.1:5000"
    link = (
        f"{where}/#/experiments/{found.experiment_id}/runs"
        f"?viewStateShareKey={VIEW}&workflowType=machine_learning"
    )
    return f"open {link}" if server else f"{command}, then open {link}"


def view_state(spec: Spec) -> dict[str, Any]:
    """What forgebench's view shows: the cells alone, flat (sorted by name, MLflow does not
    nest them under their invocation's run), the verdict, each task's accuracy (primary
    first), speed, size and memory, then the verdict's reasons."""
    tasks = [t if isinstance(t, str) else t.name for t in spec.evaluate.all_tasks]
    columns = [
        f"tags.`{schema.VERDICT}`",
        *(f"metrics.`accuracy_{task}`" for task in tasks),
        "metrics.`decode_tps_p50`",
        "metrics.`gguf_mb`",
        "metrics.`memory_mb`",
        f"tags.`{schema.VERDICT_REASONS}`",
    ]
    return {
        "searchFilter": f"tags.`{schema.RUN_KIND}` = 'cell'",
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {f"tags.`{schema.VERDICT}`": 230},
    }
