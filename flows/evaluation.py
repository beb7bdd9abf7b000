"""The external validation of a labelled batch: ``serve.evaluate``'s result as the monitor reads
it, its headline numbers, and their time series in the Evidently workspace (one project beside
the drift checks' own, a line per input mode over the evaluated batches). No Prefect here;
:mod:`flows.monitor` runs ``serve.evaluate`` and calls these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.report import mode_label
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA

__all__ = [
    "EVALUATION_FILE",
    "EVALUATION_KEYS",
    "add_evaluation_to_workspace",
    "evaluation_project",
    "evaluation_values",
    "read_evaluation",
]

EVALUATION_FILE = "evaluation.json"  # beside drift.json: serve.evaluate's output for a labelled batch
# The metrics of serve.evaluate shown per input mode (artifact) and recorded (Evidently), in order.
EVALUATION_KEYS = (
    "n_images",
    "share_metadata",
    "macro_auc",
    "lesion_macro_auc",
    "malignant_auc",
    "test_malignant_recall",
    "lesion_test_malignant_recall",
    "test_specificity",
    "test_ppv",
    "referrals_per_100",
    "balanced_accuracy_decision",
    "ece_after",
    "threshold",
)
# The Evidently dashboard's panels: one line per input mode over the evaluated batches.
EVALUATION_PANELS = (
    ("Malignant recall on labelled batches", "test_malignant_recall"),
    ("Specificity on labelled batches", "test_specificity"),
    ("Macro AUC on labelled batches", "macro_auc"),
    ("Balanced accuracy of the decisions on labelled batches", "balanced_accuracy_decision"),
)


def read_evaluation(path: Path) -> dict[str, Any]:
    """``serve.evaluate``'s result (``{"bundle", "folder", "n_images", "n_skipped", "skipped",
    "modes": {mode: metrics}}``), checked for what the monitor reads; ValueError names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable evaluation result ({e})") from None
    modes = data.get("modes") if isinstance(data, dict) else None
    if not isinstance(modes, dict) or not modes or not all(isinstance(m, dict) for m in modes.values()):
        raise ValueError(f"{path}: not an evaluation result (no 'modes' mapping of metrics)")
    return data


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def evaluation_values(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluation, flat: ``<metric>_<mode>`` (``macro_auc_image_only``);
    what is missing or not a finite number is left out."""
    out: dict[str, float] = {}
    for mode, m in evaluation["modes"].items():
        for key in EVALUATION_KEYS:
            v = _number(m.get(key))
            if v is not None:
                out[f"{key}_{mode}"] = v
    return out


def evaluation_project(drift_project: str) -> str:
    """The Evidently project of the external validations, beside the drift checks' own."""
    return f"{drift_project}: external validation"


def add_evaluation_to_workspace(
    evaluation: Mapping[str, Any], workspace: Path, project_name: str, run_name: str
) -> str:
    """One snapshot of the headline numbers (:func:`evaluation_values`, each an Evidently
    ``MeanValue`` of a one-row table) in the workspace's project ``project_name``, created with a
    dashboard plotting them per input mode over the batches. Returns the project's id."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel
    from evidently.ui.workspace import Workspace

    values = evaluation_values(evaluation)
    if not values:
        raise ValueError("no headline metric in the evaluation result")
    columns = list(values)
    data = Dataset.from_pandas(
        pd.DataFrame([values]), data_definition=DataDefinition(numerical_columns=columns)
    )
    snapshot = Report(
        [MeanValue(column=c) for c in columns], metadata={"batch": run_name, "kind": "external validation"}
    ).run(data, None)
    ws = Workspace(str(workspace))
    found = ws.search_project(project_name)
    if found:
        project = found[0]
    else:
        project = ws.create_project(project_name, description="Labelled batches scored by the bundle")
        for title, key in EVALUATION_PANELS:
            project.dashboard.add_panel(
                line_plot_panel(
                    title=title,
                    values=[
                        PanelMetric(
                            legend=mode_label(mode),
                            metric="MeanValue",
                            metric_labels={"column": f"{key}_{mode}"},
                        )
                        for mode in (METADATA, IMAGE_ONLY)
                    ],  # fmt: skip
                ),
                tab="External validation",
            )
    ref = ws.add_run(project.id, snapshot, include_data=False, name=run_name)
    return str(project.id) if ref is None else str(getattr(ref, "project_id", project.id))
