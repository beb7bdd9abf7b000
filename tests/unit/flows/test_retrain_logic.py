# Long: the retrain flow's decisions (gate, plan, overrides, report), one short test each, on shared fixtures.
"""The retrain flow's decisions on small values: the gate, the transient-error classifier, the
stage plan, the params overrides, the device list and the report (no Prefect engine needed)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

import flows.retrain as retrain_mod
from flows.dvcops import (
    DvcError,
    Layout,
    Pipeline,
    StageFailed,
    diff_metrics,
    is_transient,
    parse_dot,
    set_params,
)
from flows.gate import (
    GateError,
    committed_params,
    compare_data,
    data_versions,
    decide,
    gate_metrics,
    resolve_gate,
)
from flows.gate_report import render_retrain_summary
from flows.report import RunReport, diff_table, fmt, render_summary
from flows.retrain import (
    apply_params,
    gate_and_promote,
    gpu_devices,
    parse_set,
    retry_if_transient,
)
from skinlesion.core.errors import ParamsError
from skinlesion.params.load import load_params

CANDIDATE = {"test_malignant_recall": 0.96, "malignant_auc": 0.90, "macro_auc": 0.85}
PRODUCTION = {"test_malignant_recall": 0.95, "malignant_auc": 0.91, "macro_auc": 0.86}


# --------------------------------------------------------------------------- the gate


def test_gate_promotes_within_tolerance():
    d = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert d.promote
    assert [c.passed for c in d.checks] == [True, True, True]
    assert "malignant_auc 0.900 vs production 0.910 (-0.010; drop allowed 0.020): ok" in d.reason


def test_gate_rejects_recall_below_target():
    d = decide(
        {**CANDIDATE, "test_malignant_recall": 0.949}, PRODUCTION, target_recall=0.95, max_auc_drop=0.02
    )
    assert not d.promote
    assert d.reason == "test_malignant_recall 0.949 < target 0.950"


def test_gate_rejects_auc_drop_beyond_tolerance():
    d = decide({**CANDIDATE, "macro_auc": 0.83}, PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert not d.promote
    assert d.reason == "macro_auc 0.830 vs production 0.860 (-0.030; drop allowed 0.020): too low"
    # exactly at the tolerance passes (float noise must not flip it)
    ok = decide({**CANDIDATE, "macro_auc": 0.86 - 0.02}, PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert ok.promote


def test_gate_negative_tolerance_demands_an_improvement():
    d = decide(CANDIDATE, CANDIDATE, target_recall=0.95, max_auc_drop=-0.01)
    assert not d.promote
    assert "malignant_auc 0.900 vs production 0.900 (+0.000; gain required 0.010): too low" in d.reason


def test_gate_without_production_checks_recall_only():
    d = decide({**CANDIDATE, "macro_auc": 0.1}, None, target_recall=0.95, max_auc_drop=0.0)
    assert d.promote
    assert d.reason == "no production model yet; test_malignant_recall 0.960 >= target 0.950"
    bad = decide({**CANDIDATE, "test_malignant_recall": 0.5}, None, target_recall=0.95, max_auc_drop=0.0)
    assert not bad.promote


@pytest.mark.parametrize("value", [None, float("nan"), "0.9", True])
def test_gate_rejects_missing_or_non_numeric_metrics(value):
    d = decide({**CANDIDATE, "malignant_auc": value}, PRODUCTION, target_recall=0.95, max_auc_drop=1.0)
    assert not d.promote
    assert d.reason == "malignant_auc missing or not a number in the candidate"


# --------------------------------------------------------------------------- the gate, two input modes

# A bundle fusing metadata: every gate key again for images served without metadata.
FUSION = {
    **CANDIDATE,
    "test_malignant_recall_image_only": 0.955,
    "malignant_auc_image_only": 0.88,
    "macro_auc_image_only": 0.83,
}
FUSION_PRODUCTION = {
    **PRODUCTION,
    "test_malignant_recall_image_only": 0.95,
    "malignant_auc_image_only": 0.89,
    "macro_auc_image_only": 0.84,
}


@pytest.mark.parametrize("production", [None, PRODUCTION, FUSION_PRODUCTION])
def test_gate_refuses_a_fusion_candidate_that_finds_melanomas_only_with_metadata(production):
    cand = {**FUSION, "test_malignant_recall": 0.97, "test_malignant_recall_image_only": 0.30}
    d = decide(cand, production, target_recall=0.95, max_auc_drop=0.02)
    assert not d.promote
    assert d.reason.startswith("test_malignant_recall_image_only (image only) 0.300 < target 0.950")
    first, second = d.checks[:2]
    assert (first.name, first.passed) == ("test_malignant_recall", True)
    assert first.detail == "test_malignant_recall (with metadata) 0.970 >= target 0.950"
    assert (second.name, second.passed) == ("test_malignant_recall_image_only", False)
    # a missing or broken image-only recall of a fusion candidate fails by name, too
    broken = decide({**FUSION, "test_malignant_recall_image_only": None}, None, target_recall=0.95,
                    max_auc_drop=0.02)  # fmt: skip
    assert (
        broken.reason
        == "test_malignant_recall_image_only (image only) missing or not a number in the candidate"
    )


def test_gate_promotes_a_fusion_candidate_comparing_each_mode_with_productions_same_mode():
    d = decide(FUSION, FUSION_PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert d.promote and all(c.passed for c in d.checks)
    assert [c.name for c in d.checks] == [
        "test_malignant_recall", "test_malignant_recall_image_only", "malignant_auc", "macro_auc",
        "malignant_auc_image_only", "macro_auc_image_only",
    ]  # fmt: skip
    assert "test_malignant_recall_image_only (image only) 0.955 >= target 0.950" in d.reason
    assert "macro_auc (with metadata) 0.850 vs production 0.860 (-0.010; drop allowed 0.020): ok" in d.reason
    assert (
        "macro_auc_image_only (image only) 0.830 vs production 0.840 (-0.010; drop allowed 0.020): ok"
        in d.reason
    )
    # image-only against image-only: an image-only AUC that fell too far refuses the candidate
    worse = decide({**FUSION, "macro_auc_image_only": 0.80}, FUSION_PRODUCTION, target_recall=0.95,
                   max_auc_drop=0.02)  # fmt: skip
    assert not worse.promote
    assert worse.reason == (
        "macro_auc_image_only (image only) 0.800 vs production 0.840 (-0.040; drop allowed 0.020): too low"
    )
    first = decide(FUSION, None, target_recall=0.95, max_auc_drop=0.0)
    assert first.promote and first.reason == (
        "no production model yet; test_malignant_recall (with metadata) 0.960 >= target 0.950; "
        "test_malignant_recall_image_only (image only) 0.955 >= target 0.950"
    )


def test_gate_against_a_one_mode_production_compares_what_both_have_and_says_so():
    note = (
        "production has no image-only metrics (a one-mode bundle): only the AUCs with metadata are "
        "compared, the image-only ones are not"
    )
    d = decide(FUSION, PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert d.promote and d.reason.endswith(note)
    checks = {c.name: c for c in d.checks}
    assert checks["macro_auc_image_only"].passed
    assert checks["macro_auc_image_only"].detail == (
        "macro_auc_image_only (image only) 0.830 (not compared: production has no image-only numbers)"
    )
    assert checks["macro_auc"].detail.startswith("macro_auc (with metadata) 0.850 vs production 0.860")
    bad = decide({**FUSION, "macro_auc": 0.80}, PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert not bad.promote
    assert bad.reason == (
        f"macro_auc (with metadata) 0.800 vs production 0.860 (-0.060; drop allowed 0.020): too low; {note}"
    )
    # the other way round: a one-mode candidate after a fusion production
    back = decide(CANDIDATE, FUSION_PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert back.promote and [c.name for c in back.checks] == [
        "test_malignant_recall", "malignant_auc", "macro_auc"
    ]  # fmt: skip
    assert back.reason.endswith(
        "the candidate has one input mode, production two: its AUCs are compared with production's "
        "with metadata, production's image-only ones are not"
    )


def test_gate_of_a_one_mode_candidate_is_unchanged():
    d = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=0.02)
    assert [(c.name, c.detail) for c in d.checks] == [
        ("test_malignant_recall", "test_malignant_recall 0.960 >= target 0.950"),
        ("malignant_auc", "malignant_auc 0.900 vs production 0.910 (-0.010; drop allowed 0.020): ok"),
        ("macro_auc", "macro_auc 0.850 vs production 0.860 (-0.010; drop allowed 0.020): ok"),
    ]
    assert d.reason == "; ".join(c.detail for c in d.checks)


def test_gate_metrics_take_the_image_only_keys_where_the_files_have_them(tmp_path):
    layout = Layout(tmp_path)
    one = {
        "metrics/calibration.json": {"test_malignant_recall": 0.96, "threshold": 0.2},
        "metrics/ensemble.json": {"malignant_auc": 0.9, "macro_auc": 0.85, "macro_auc_ci_low": 0.8},
    }
    assert gate_metrics(one, layout) == {
        "test_malignant_recall": 0.96,
        "malignant_auc": 0.9,
        "macro_auc": 0.85,
    }
    image_only = {"malignant_auc_image_only": 0.88, "macro_auc_image_only": 0.83}
    two = {
        "metrics/calibration.json": {
            **one["metrics/calibration.json"],
            "test_malignant_recall_image_only": 0.3,
        },
        "metrics/ensemble.json": {**one["metrics/ensemble.json"], **image_only},
    }
    assert gate_metrics(two, layout) == {
        "test_malignant_recall": 0.96, "malignant_auc": 0.9, "macro_auc": 0.85,
        "test_malignant_recall_image_only": 0.3, **image_only,
    }  # fmt: skip


# --------------------------------------------------------------------------- transient errors

LOCK = (
    "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated "
    "abruptly. Check the page <https://dvc.org/doc/user-guide/troubleshooting#lock-issue>"
)


@pytest.mark.parametrize(
    "text",
    [
        LOCK,
        "ERROR: 'data/prepared' is busy, it is being blocked by:\n  (PID 4242): dvc repro train@a",
        "ProtocolError: ('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer'))",
        "error: download failed: <urlopen error [Errno -3] Temporary failure in name resolution>",
        "requests.exceptions.ReadTimeout: HTTPSConnectionPool(host='dataverse.harvard.edu'): Read timed out.",
        "error: HTTP Error 503: Service Unavailable",
        "ERROR: failed to push data to the cloud - 502 Bad Gateway",
    ],
)
def test_transient_errors_are_retried(text):
    assert is_transient(text)


@pytest.mark.parametrize(
    "text",
    [
        "validation FAILED: metadata: 3 rows with dx not in [akiec, ...]: ISIC_0024306 (row 2)\n"
        "ERROR: failed to reproduce 'validate': failed to run: python -m stages.validate, exited with 1",
        "error: params.yaml: download.dataverse.timeout_s: -1.0 is below the minimum 0.1",
        "ERROR: failed to reproduce 'train@a': failed to run: python -m stages.train, exited with -9",
        "ValueError: Input contains NaN",
        "ERROR: unexpected error - [Errno 28] No space left on device",
    ],
)
def test_permanent_errors_are_not_retried(text):
    assert not is_transient(text)


class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


def test_retry_condition_reads_the_tasks_exception():
    assert retry_if_transient(None, None, _State(StageFailed("download", 255, LOCK)))
    assert not retry_if_transient(None, None, _State(StageFailed("validate", 1, "validation FAILED")))
    assert not retry_if_transient(None, None, _State(ValueError("Unable to acquire lock")))  # not from dvc
    assert retry_if_transient(None, None, _State(DvcError("`dvc push` timed out", transient=True)))


# --------------------------------------------------------------------------- the plan

DOT = """strict digraph {
"download";
"split";
"validate";
"prepare";
"train@b1";
"train@b2";
"evaluate@b1";
"evaluate@b2";
"ensemble";
"calibrate";
"drift";
"download" -> "split";
"split" -> "validate";
"validate" -> "prepare";
"prepare" -> "train@b1";
"prepare" -> "train@b2";
"train@b1" -> "evaluate@b1";
"train@b2" -> "evaluate@b2";
"evaluate@b1" -> "ensemble";
"evaluate@b2" -> "ensemble";
"ensemble" -> "calibrate";
"calibrate" -> "drift";
}
"""


@pytest.fixture
def pipeline() -> Pipeline:
    nodes, edges = parse_dot(DOT)
    return Pipeline(tuple(nodes), frozenset(edges))


def test_parse_dot_reads_dvc_dag_output(pipeline):
    assert pipeline.stages[:5] == ("download", "split", "validate", "prepare", "train@b1")
    assert ("prepare", "train@b2") in pipeline.edges and len(pipeline.edges) == 11


def test_default_plan_is_everything_but_drift_in_waves(pipeline):
    waves = pipeline.levels(pipeline.resolve(None, exclude=["drift"]))
    assert waves == [
        ["download"], ["split"], ["validate"], ["prepare"], ["train@b1", "train@b2"],
        ["evaluate@b1", "evaluate@b2"], ["ensemble"], ["calibrate"],
    ]  # fmt: skip


def test_named_stages_bring_their_upstream_and_groups_expand(pipeline):
    assert pipeline.resolve(["validate"]) == ["download", "split", "validate"]
    assert pipeline.levels(pipeline.resolve(["evaluate@b2"]))[-2:] == [["train@b2"], ["evaluate@b2"]]
    assert set(pipeline.resolve(["train"])) >= {"train@b1", "train@b2"}
    assert "drift" in pipeline.resolve(["drift"])
    with pytest.raises(DvcError, match=r"unknown stage 'trian'; dvc.yaml has: download, split"):
        pipeline.resolve(["trian"])


# --------------------------------------------------------------------------- params overrides


def test_set_params_changes_only_the_overridden_values(tmp_path):
    from tests.conftest import REPO

    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    assert set_params(path, {"train.common.epochs": 1, "train.backbones": ["custom_cnn"],
                             "ensemble.members": ["custom_cnn"], "calibrate.target_recall": 0.9})  # fmt: skip
    new = path.read_text()
    changed = [(a, b) for a, b in zip(original.splitlines(), new.splitlines(), strict=True) if a != b]
    assert len(changed) == 4  # comments and the layout of every other line are kept
    data = yaml.safe_load(new)
    assert data["train"]["common"]["epochs"] == 1 and data["train"]["backbones"] == ["custom_cnn"]
    assert data["calibrate"]["target_recall"] == 0.9
    assert not set_params(path, {"train.common.epochs": 1})  # already so: file untouched


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.common.epochz": 1}, "params override: train.common.epochz: unknown key (did you mean"),
        ({"trian.epochs": 1}, "trian: no such section in params.yaml (from 'trian.epochs')"),
        (
            {"calibrate.target_recall": 1.5},
            "params override: calibrate.target_recall: 1.5 is above the maximum",
        ),
        ({"train.backbones": ["custom_cnn"]}, "ensemble.members: ['mobilenetv2'] not in train.backbones"),
    ],
)
def test_bad_overrides_name_the_key_and_leave_params_yaml_alone(tmp_path, overrides, message):
    from tests.conftest import REPO

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_bytes()
    with pytest.raises(ParamsError) as e:
        set_params(path, overrides)
    assert message in str(e.value)
    assert path.read_bytes() == before


def test_cli_set_parses_values_like_dvc_exp_run():
    assert parse_set(["train.common.epochs=1", "train.backbones=[a, b]", "download.source=local:x"]) == {
        "train.common.epochs": 1,
        "train.backbones": ["a", "b"],
        "download.source": "local:x",
    }
    with pytest.raises(SystemExit, match="--set expects KEY=VALUE, got 'epochs'"):
        parse_set(["epochs"])
    with pytest.raises(SystemExit, match="--gate expects KEY=VALUE, got 'x'"):
        parse_set(["x"], "--gate")


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize(
    "visible, expected",
    [
        ("0,1", ["0", "1"]),
        ("2", ["2"]),
        ("", []),
        ("-1", []),
        ("0,-1,1", ["0"]),
        ("GPU-ab12, GPU-cd34", ["GPU-ab12", "GPU-cd34"]),
    ],
)
def test_gpu_devices_follow_cuda_visible_devices(visible, expected):
    assert gpu_devices({"CUDA_VISIBLE_DEVICES": visible}) == expected


# --------------------------------------------------------------------------- the report


def test_fmt_rounds_for_people():
    assert [fmt(0.123456), fmt(61.04), fmt(7), fmt(None), fmt(True), fmt(100.0)] == [
        "0.123", "61.0", "7", "—", "yes", "100",
    ]  # fmt: skip


def test_diff_table_rounds_and_drops_ci_rows():
    diff = diff_metrics(
        {"metrics/ensemble.json": {"macro_auc": 0.8123456, "macro_auc_ci_low": 0.7, "old_key": 1}},
        {"metrics/ensemble.json": {"macro_auc": 0.8234567, "macro_auc_ci_low": 0.71, "n": 5}},
    )
    rows = diff_table(diff)
    assert rows == [
        {"file": "metrics/ensemble.json", "metric": "macro_auc", "production": 0.8123, "candidate": 0.8235,
         "change": 0.0111},
        {"file": "metrics/ensemble.json", "metric": "n", "production": "—", "candidate": 5, "change": "—"},
        {"file": "metrics/ensemble.json", "metric": "old_key", "production": 1, "candidate": "—",
         "change": "—"},
    ]  # fmt: skip


def test_summary_shows_numbers_gate_and_failure(tmp_path):
    layout = Layout(tmp_path)
    r = RunReport(flow_run="brave-otter", outcome="not promoted", reason="macro_auc too low")
    r.planned = ["download", "validate", "train@a"]
    r.stage_runs = [{"stage": "download", "status": "skipped", "seconds": 1.04, "device": None}]
    r.data_version = "d818394bd3ade0226ae30d8fe140f9a0.dir"
    r.metrics = {
        "metrics/eval/a.json": {"macro_auc": 0.81234, "macro_auc_ci_low": 0.7, "macro_auc_ci_high": 0.9},
        "metrics/ensemble.json": {"macro_auc": 0.83, "malignant_auc": 0.9},
        "metrics/calibration.json": {
            "threshold": 0.2345,
            "test_malignant_recall": 0.96,
            "referrals_per_100": 61.04,
        },
    }
    r.gate = decide(CANDIDATE, PRODUCTION, target_recall=0.99, max_auc_drop=0.0).as_dict()
    md = render_summary(r, layout)
    assert "# Retrain `brave-otter`: not promoted" in md
    assert "| data version (`data/raw` md5 in dvc.lock) | `d818394bd3ade0226ae30d8fe140f9a0.dir` |" in md
    assert "| `download` | up to date | 1.0 | — |" in md
    assert "| `train@a` | not run | — | — |" in md
    assert "| a | 0.812 [0.700, 0.900] | — |" in md
    assert "| **ensemble** | 0.830 | 0.900 |" in md
    assert "| 0.234 | 0.960 | 61.0 |" in md
    assert "| test_malignant_recall | FAIL | test_malignant_recall 0.960 < target 0.990 |" in md

    r2 = RunReport(
        flow_run="x", outcome="failed", failed_stage="validate", failure="validation FAILED: 3 rows"
    )
    r2.metrics = {
        "metrics/validation.json": {"passed": 0, "n_rows": 11, "metadata_fail_dx": 3, "images_fail_x": 0}
    }
    md2 = render_summary(r2, layout)
    assert "## Stage `validate` failed" in md2 and "validation FAILED: 3 rows" in md2
    assert "| passed | 0 |" in md2 and "| metadata_fail_dx | 3 |" in md2 and "images_fail_x" not in md2


def test_summary_and_diff_show_both_input_modes_of_a_fusion_bundle(tmp_path):
    layout = Layout(tmp_path)
    r = RunReport(flow_run="calm-heron", outcome="not promoted", reason="image-only recall too low")
    r.metrics = {
        "metrics/ensemble.json": {
            "macro_auc": 0.83, "macro_auc_ci_low": 0.8, "macro_auc_ci_high": 0.86, "malignant_auc": 0.9,
            "macro_auc_image_only": 0.81, "macro_auc_ci_low_image_only": 0.78,
            "macro_auc_ci_high_image_only": 0.84, "malignant_auc_image_only": 0.88,
            "worst_subgroup": "sex=male", "worst_subgroup_malignant_recall": 0.9,
            "worst_subgroup_n_malignant": 40, "worst_subgroup_image_only": "age=60+",
            "worst_subgroup_malignant_recall_image_only": 0.2, "worst_subgroup_n_malignant_image_only": 30,
        },
        "metrics/calibration.json": {
            "threshold": 0.2, "test_malignant_recall": 0.97, "threshold_image_only": 0.25,
            "test_malignant_recall_image_only": 0.3, "target_recall": 0.95,
        },
    }  # fmt: skip
    cand = {**FUSION, "test_malignant_recall": 0.97, "test_malignant_recall_image_only": 0.30}
    r.gate = decide(cand, FUSION_PRODUCTION, target_recall=0.95, max_auc_drop=0.02).as_dict()
    md = render_summary(r, layout)
    assert "| **ensemble (with metadata)** | 0.830 [0.800, 0.860] | 0.900 |" in md
    assert "| **ensemble (image only)** | 0.810 [0.780, 0.840] | 0.880 |" in md
    assert "Worst subgroup (malignant recall, with metadata): sex=male (0.900, 40 malignant)." in md
    assert "Worst subgroup (malignant recall, image only): age=60+ (0.200, 30 malignant)." in md
    assert "| input mode | threshold | test_malignant_recall |" in md
    assert "| with metadata | 0.200 | 0.970 |" in md and "| image only | 0.250 | 0.300 |" in md
    assert (
        "| test_malignant_recall_image_only | FAIL | "
        "test_malignant_recall_image_only (image only) 0.300 < target 0.950 |" in md
    )

    diff = diff_metrics(
        {"metrics/ensemble.json": {"macro_auc": 0.8, "macro_auc_ci_low": 0.7, "weight_a": 0.5}},
        {"metrics/ensemble.json": {"macro_auc": 0.83, "macro_auc_image_only": 0.81, "macro_auc_ci_low": 0.8,
                                   "macro_auc_ci_low_image_only": 0.78, "weight_a": 0.5}},
    )  # fmt: skip
    rows = {row["metric"]: row for row in diff_table(diff)}
    assert set(rows) == {"macro_auc", "macro_auc_image_only", "weight_a"}  # CI bounds left out
    assert (
        rows["macro_auc"]["mode"] == "with metadata" and rows["macro_auc_image_only"]["mode"] == "image only"
    )
    assert rows["macro_auc_image_only"]["production"] == "—" and rows["weight_a"]["mode"] == "—"


def test_a_fusion_candidate_refused_on_its_image_only_recall_says_so_in_the_summary(committed, promotions):
    layout = committed
    metrics = {
        "metrics/calibration.json": {"test_malignant_recall": 0.97, "test_malignant_recall_image_only": 0.30},
        "metrics/ensemble.json": {"malignant_auc": 0.95, "macro_auc": 0.95, "malignant_auc_image_only": 0.93,
                                  "macro_auc_image_only": 0.93},
    }  # fmt: skip
    gate = resolve_gate(*committed_params(layout, git=True))
    report = RunReport(flow_run="t", planned=["calibrate"], metrics=metrics)
    result: dict = {"promoted": False}
    params = load_params(layout.path(layout.params))
    gate_and_promote(layout, report, result, params, PRODUCTION_RECORD, gate, promote=True, git=True)
    assert not result["promoted"] and promotions == []
    assert report.reason == (
        "test_malignant_recall_image_only (image only) 0.300 < target 0.950; production has no image-only "
        "metrics (a one-mode bundle): only the AUCs with metadata are compared, the image-only ones are "
        f"not; {NOT_PAIRED}"
    )
    md = render_retrain_summary(report, layout)
    assert "**Outcome:** not promoted: test_malignant_recall_image_only (image only) 0.300" in md
    assert "| test malignant recall, in every input mode of the bundle (`promote.min_test_recall`" in md


# --------------------------------------------------------------------------- who sets the bar

# The committed params.yaml (the project's): promote.max_auc_drop 0.01, promote.min_test_recall
# null, calibrate.target_recall 0.95. A candidate far below that bar on every gate check.
LOOSENING = {"promote.max_auc_drop": 1.0, "promote.min_test_recall": 0.0, "calibrate.target_recall": 0.5}
RAW_LOCK = {"data/raw": "r1.dir", "data/split": "s1.dir", "data/validated": "v1.dir"}


def _metrics(recall: float, auc: float) -> dict[str, dict[str, float]]:
    return {
        "metrics/calibration.json": {"test_malignant_recall": recall, "threshold": 0.2},
        "metrics/ensemble.json": {"malignant_auc": auc, "macro_auc": auc},
    }


WEAK = _metrics(0.60, 0.60)  # recall 0.60 < 0.95; AUCs 0.30 below production's
# These records have no production bundle beside them, so no seen.json: the gate falls back.
NOT_PAIRED = (
    "not compared on the same images: models/production has no seen.json (a bundle from before it was "
    "recorded): which images it learned from is unknown; the AUC checks compare each bundle's stored "
    "test metrics"
)
PRODUCTION_RECORD = {"metrics": _metrics(0.96, 0.90), "data_versions": RAW_LOCK, "data_version": "r1.dir"}


@pytest.fixture
def committed(tmp_path):
    """A git repository whose committed params.yaml is the project's."""
    from tests.conftest import REPO

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for args in (["git", "init", "-q"], [*git, "add", "params.yaml"], [*git, "commit", "-qm", "params"]):
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)
    return Layout(tmp_path)


def _write_lock(layout: Layout, versions: dict[str, str]) -> None:
    stages = {p.split("/")[1]: {"outs": [{"path": p, "md5": md5}]} for p, md5 in versions.items()}
    (layout.root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


def _judge(layout, gate, params, *, promote=True, git=True):
    report = RunReport(flow_run="t", planned=["calibrate"], metrics=WEAK)
    result: dict = {"promoted": False}
    gate_and_promote(layout, report, result, params, PRODUCTION_RECORD, gate, promote=promote, git=git)
    return report, result


@pytest.fixture
def promotions(monkeypatch):
    """What ``promote_candidate`` was asked to write (nothing is copied, committed or tagged)."""
    seen: list[dict] = []

    def fake(root, record, tag):
        seen.append(record)
        return {"path": "models/production", "tag": tag}

    monkeypatch.setattr(retrain_mod, "promote_candidate", fake)
    return seen


def test_params_overrides_do_not_loosen_the_gate(committed, promotions):
    """A run's params_overrides lowering promote.max_auc_drop, promote.min_test_recall and
    calibrate.target_recall: the candidate is judged, and rejected, by the committed bar, also
    when an earlier run's overrides are still kept in params.yaml (as dvc exp run -S keeps them)."""
    layout = committed
    apply_params.fn(str(layout.root), LOOSENING)  # an earlier run's, kept in params.yaml
    gate = resolve_gate(*committed_params(layout, git=True), None, LOOSENING)
    apply_params.fn(str(layout.root), LOOSENING)  # this run's (already there)
    params = load_params(layout.path(layout.params))
    assert (params.promote.max_auc_drop, params.calibrate.target_recall) == (1.0, 0.5)  # the run's

    report, result = _judge(layout, gate, params)
    assert not result["promoted"] and promotions == []
    assert report.reason == (
        "test_malignant_recall 0.600 < target 0.950; "
        "malignant_auc 0.600 vs production 0.900 (-0.300; drop allowed 0.010): too low; "
        f"macro_auc 0.600 vs production 0.900 (-0.300; drop allowed 0.010): too low; {NOT_PAIRED}"
    )
    th = report.gate["thresholds"]
    assert (th["target_recall"], th["max_auc_drop"], th["overrides"]) == (0.95, 0.01, {})
    assert th["ignored"] == LOOSENING and th["source"].startswith("`params.yaml` at git HEAD (")
    md = render_retrain_summary(report, layout)
    assert "params_overrides of gate inputs, not used by the gate: `promote.max_auc_drop=1.0`" in md
    assert "GATE OVERRIDDEN" not in md


def test_without_git_the_gate_reads_params_yaml_before_the_runs_overrides(tmp_path):
    from tests.conftest import REPO

    layout = Layout(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    gate = resolve_gate(*committed_params(layout, git=False), None, LOOSENING)  # as the flow: first
    apply_params.fn(str(tmp_path), LOOSENING)
    assert (gate.target_recall, gate.max_auc_drop) == (0.95, 0.01)
    assert gate.source == "`params.yaml` before this run's overrides (not in git)"
    # with a committed recall floor, calibrate.target_recall is no gate input: nothing to note
    floor = resolve_gate({"promote": {"min_test_recall": 0.9}}, "x", None, LOOSENING)
    assert floor.target_recall == 0.9 and "calibrate.target_recall" not in floor.ignored


def test_gate_overrides_change_the_gate_and_are_recorded(committed, promotions):
    """The operator's gate_overrides do move the bar (the same weak candidate is promoted) and say
    so: in the reason, the summary artifact and the production record. They are never written to
    params.yaml, and the promotion commits the committed bar, not the run's kept overrides."""
    layout = committed
    _write_lock(layout, RAW_LOCK)
    apply_params.fn(str(layout.root), LOOSENING)
    overrides = {"promote.max_auc_drop": 0.5, "promote.min_test_recall": 0.5}
    gate = resolve_gate(*committed_params(layout, git=True), overrides, LOOSENING)
    report, result = _judge(layout, gate, load_params(layout.path(layout.params)))

    assert result["promoted"] and result["tag"].startswith("model-")
    assert report.reason.endswith("(gate overridden: promote.max_auc_drop=0.5, promote.min_test_recall=0.5)")
    [record] = promotions
    assert record["gate_overrides"] == overrides
    th = record["gate"]["thresholds"]
    assert th["overrides"] == overrides and th["committed"]["promote.max_auc_drop"] == 0.01
    assert (th["target_recall"], th["max_auc_drop"]) == (0.5, 0.5)
    assert report.promotion["gate_overrides"] == "promote.max_auc_drop=0.5, promote.min_test_recall=0.5"
    md = render_retrain_summary(report, layout)
    assert (
        "**GATE OVERRIDDEN by the operator (gate_overrides), this run only:** "
        "`promote.max_auc_drop=0.5` (committed: 0.010), `promote.min_test_recall=0.5` (committed: —)." in md
    )
    assert md.index("## Gate thresholds") < md.index("## Promotion gate")
    assert "the macro AUC difference on the same images) | 0.010 | 0.500 |" in md
    # what the promotion commits: the committed bar (the run's target_recall 0.5 stays: dvc.lock
    # records it, so the recall bar moves to promote.min_test_recall)
    assert record["gate_pinned"] == {"promote.max_auc_drop": 0.01, "promote.min_test_recall": 0.95}
    kept = load_params(layout.path(layout.params))
    assert (kept.promote.max_auc_drop, kept.promote.min_test_recall) == (0.01, 0.95)
    assert kept.calibrate.target_recall == 0.5
    assert record["params"]["promote"]["max_auc_drop"] == 0.01


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"calibrate.target_recall": 0.5},
         "gate_overrides: 'calibrate.target_recall' is not a gate threshold; "
         "use promote.max_auc_drop or promote.min_test_recall"),
        ({"promote.max_auc_drop": 2}, "gate_overrides: promote.max_auc_drop: 2.0 is above the maximum 1.0"),
    ],
)  # fmt: skip
def test_bad_gate_overrides_fail_before_anything_runs(overrides, message):
    with pytest.raises(GateError) as e:
        resolve_gate({}, "test", overrides)
    assert str(e.value) == message


# --------------------------------------------------------------------------- data versions


def test_data_versions_same_newer_unknown(tmp_path):
    layout = Layout(tmp_path)
    assert data_versions({**RAW_LOCK, "models/ensemble": "m.dir"}, layout) == RAW_LOCK
    same = compare_data(RAW_LOCK, PRODUCTION_RECORD, layout)
    assert same["status"] == "same" and same["changed"] == []
    newer = compare_data(
        {**RAW_LOCK, "data/raw": "r2.dir", "data/split": "s2.dir"}, PRODUCTION_RECORD, layout
    )
    assert newer["status"] == "newer" and newer["changed"] == ["data/raw", "data/split"]
    assert "the test sets may differ" in newer["note"]
    # a record from before data_versions: its dvc_lock, else its data/raw md5
    old = {"metrics": {}, "dvc_lock": {**RAW_LOCK, "models/ensemble": "m.dir"}}
    assert compare_data(RAW_LOCK, old, layout)["status"] == "same"
    oldest = compare_data(RAW_LOCK, {"metrics": {}, "data_version": "r0.dir"}, layout)
    assert oldest["status"] == "newer" and oldest["changed"] == ["data/raw"]
    assert compare_data(RAW_LOCK, {"metrics": {}}, layout)["status"] == "unknown"
    assert compare_data(RAW_LOCK, None, layout)["status"] == "no production"


def test_the_summary_and_the_record_carry_the_data_versions(committed, promotions):
    layout = committed
    _write_lock(layout, {**RAW_LOCK, "data/raw": "r2.dir", "data/split": "s2.dir"})
    gate = resolve_gate(*committed_params(layout, git=True), {"promote.max_auc_drop": 0.5,
                                                                "promote.min_test_recall": 0.5})  # fmt: skip
    report, result = _judge(layout, gate, load_params(layout.path(layout.params)), git=False)
    assert result["promoted"] and result["tag"] is None
    [record] = promotions
    assert record["data_versions"] == {**RAW_LOCK, "data/raw": "r2.dir", "data/split": "s2.dir"}
    assert record["gate"]["data"]["status"] == "newer"
    assert record["gate_pinned"] == {}  # nothing committed without git
    md = render_retrain_summary(report, layout)
    assert "## Data version: NEWER than production's" in md
    assert "the test sets may differ, so the AUC checks compare production's numbers" in md
    assert "| `data/raw` | `r1.dir` | `r2.dir` | changed |" in md
    assert "| `data/validated` | `v1.dir` | `v1.dir` | same |" in md
    json.dumps(record)  # production.json is JSON

    _write_lock(layout, RAW_LOCK)
    report2, _ = _judge(layout, gate, load_params(layout.path(layout.params)), promote=False, git=False)
    md2 = render_retrain_summary(report2, layout)
    assert "## Data version: same as production" in md2
    assert "Same data version as production: the metrics compare the same test set." in md2
