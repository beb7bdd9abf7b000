# Long: the monitor flow's decisions, one short test each, on shared fixtures (batches, ledgers, a fake run).
"""The monitor flow's decisions on small values: batch fingerprints and the ledger (new, changed,
seen), artifact keys, the drift event (checked against the trigger declared in prefect.yaml,
with Prefect's own matching and templating), the hand-over of labelled batches, and the retrain's
``extra_sources`` merge. The drift CLI runs for real on batches it refuses; the flow runs on a
temporary Prefect API. A drifted batch through a real server is the e2e test's."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

import flows.monitor as monitor_mod
from flows.dvcops import set_params
from flows.evaluation import add_evaluation_to_workspace, evaluation_values, read_evaluation
from flows.ledger import (
    LEDGER,
    Batch,
    LedgerError,
    fingerprint,
    load_ledger,
    mark_handed_over,
    new_ledger,
    pending_labelled,
    plan_checks,
    record_check,
    save_ledger,
    scan_inbox,
)
from flows.monitor import (
    EVENT,
    DriftCheckFailed,
    EvaluationFailed,
    MonitorFailed,
    MonitorRun,
    bundle_to_check,
    check_batch,
    check_one,
    drift_event,
    evaluate_batch,
    monitor,
)
from flows.monitor_report import render_batch, slug, verdict_text
from flows.retrain import RetrainFailed, merge_extra_source_params, parse_extra_sources, run_overrides
from skinlesion.params.load import load_params
from tests.conftest import REPO, make_jpeg

METRICS = {
    "batch": "clinic-b",
    "drift_detected": True,
    "dataset_drift": True,
    "drift_share": 0.740741,
    "drift_share_threshold": 0.5,
    "n_features": 27,
    "n_drifted_features": 2,
    "drifted_features": ["brightness", "lab_a"],
    "feature_alarm": True,
    "alarm_features": ["brightness"],
    "embedding_drift": True,
    "embedding_drift_score": 0.834221,
    "embedding_method": "model",
    "embedding_threshold": 0.6,
    "prediction_class_shift": 0.1234,
    "predicted_class_share": {"nv": 0.6, "mel": 0.4, "bcc": 0.0},
    "n_images": 50,
    "n_unreadable": 2,
    "unreadable": ["bad.jpg", "text.jpg"],
    "unreadable_reasons": {"bad.jpg": "truncated JPEG", "text.jpg": "not an image"},
    "labelled": True,
    "n_labelled": 50,
    "metadata_csv": "/in/clinic-b/metadata.csv",
}


def _batch(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        make_jpeg(folder / "images" / f"ISIC_{i:07d}.jpg", seed=i)
    return folder


def _touch(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


# --------------------------------------------------------------------------- fingerprint, inbox


def test_fingerprint_follows_names_sizes_and_mtimes_not_hidden_files(tmp_path):
    b = _batch(tmp_path / "b")
    fp, n = fingerprint(b)
    assert n == 3 and re.fullmatch(r"[0-9a-f]{64}", fp)
    assert fingerprint(b) == (fp, 3)  # stable

    (b / ".DS_Store").write_text("x")
    (b / ".partial").mkdir()
    (b / ".partial" / "y.jpg").write_text("y")
    assert fingerprint(b) == (fp, 3)

    _touch(b / "images" / "ISIC_0000001.jpg")
    touched, _ = fingerprint(b)
    assert touched != fp

    (b / "images" / "ISIC_0000001.jpg").rename(b / "images" / "ISIC_0000009.jpg")
    assert fingerprint(b)[0] not in (fp, touched)

    make_jpeg(b / "images" / "new.jpg", seed=9)
    assert fingerprint(b)[1] == 4


def test_scan_inbox_lists_visible_sub_folders_by_name(tmp_path):
    inbox = tmp_path / "inbox"
    assert scan_inbox(inbox) == []  # no inbox yet: nothing to check, no error
    _batch(inbox / "zeta")
    _batch(inbox / "alpha", 2)
    (inbox / ".copying").mkdir()  # a batch still being copied in, renamed when complete
    (inbox / "stray.jpg").write_bytes(b"x")  # a file at the top is not a batch
    found = scan_inbox(inbox)
    assert [b.name for b in found] == ["alpha", "zeta"]
    assert found[0].path == (inbox / "alpha").resolve() and found[0].path.is_absolute()
    assert found[0].n_files == 2


def test_plan_checks_new_changed_and_seen(tmp_path):
    inbox = tmp_path / "inbox"
    for name in ("a", "b", "c"):
        _batch(inbox / name)
    ledger = new_ledger()
    todo, seen = plan_checks(scan_inbox(inbox), ledger)
    assert [(b.name, why) for b, why in todo] == [("a", "new"), ("b", "new"), ("c", "new")] and seen == []

    for b, _ in todo[:2]:
        record_check(ledger, b, at="2026-11-01T00:00:00Z", flow_run_name="r1", metrics={"labelled": False})
    _touch(inbox / "b" / "images" / "ISIC_0000000.jpg")
    todo, seen = plan_checks(scan_inbox(inbox), ledger)
    assert [(b.name, why) for b, why in todo] == [("b", "changed"), ("c", "new")]
    assert [b.name for b in seen] == ["a"]


# --------------------------------------------------------------------------- ledger


def test_ledger_round_trip_is_atomic_and_an_unreadable_one_is_an_error(tmp_path):
    path = tmp_path / "state" / LEDGER
    assert load_ledger(path) == new_ledger()
    ledger = new_ledger()
    b = Batch("a", tmp_path / "a", "f" * 64, 3)
    record_check(ledger, b, at="2026-11-01T00:00:00Z", flow_run_name="r1", metrics=METRICS)
    save_ledger(path, ledger)
    assert load_ledger(path) == ledger
    assert sorted(p.name for p in path.parent.iterdir()) == [LEDGER]  # no temp file left

    path.write_text("{not json")
    with pytest.raises(LedgerError, match=rf"{re.escape(str(path))}: unreadable monitor ledger"):
        load_ledger(path)
    path.write_text("[]")
    with pytest.raises(LedgerError, match="not a monitor ledger"):
        load_ledger(path)


def test_a_failed_check_is_recorded_with_its_error_and_no_report(tmp_path):
    ledger = new_ledger()
    b = Batch("empty", tmp_path / "empty", "e" * 64, 0)
    entry = record_check(ledger, b, at="t", flow_run_name="r", error="empty: no image files")
    assert entry["status"] == "failed" and entry["error"] == "empty: no image files"
    assert entry["report"] is None and entry["metrics"] is None and not entry["labelled"]


# --------------------------------------------------------------------------- hand-over of labelled batches


def test_pending_labelled_batches_are_handed_over_once_oldest_first(tmp_path):
    ledger = new_ledger()

    def check(name: str, at: str, **metrics) -> Batch:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        b = Batch(name, folder, name * 4, 1)
        record_check(ledger, b, at=at, flow_run_name="r", metrics=metrics)
        return b

    check("late", "2026-11-03T00:00:00Z", labelled=True)
    check("early", "2026-11-01T00:00:00Z", labelled=True)
    check("unlabelled", "2026-11-02T00:00:00Z", labelled=False)
    record_check(ledger, Batch("broken", tmp_path / "broken", "x", 0), at="t", flow_run_name="r", error="e")
    gone = check("gone", "2026-11-02T00:00:00Z", labelled=True)
    gone.path.rmdir()  # deleted from the inbox: download could not read it

    pending = pending_labelled(ledger)
    assert pending == [str(tmp_path / "early"), str(tmp_path / "late")]
    mark_handed_over(ledger, pending, at="2026-11-04T00:00:00Z", event_id="ev1")
    assert pending_labelled(ledger) == []
    assert ledger["batches"]["early"]["event_id"] == "ev1" and ledger["batches"]["early"]["handed_over"]
    assert not ledger["batches"]["unlabelled"]["handed_over"]

    # a labelled batch whose files changed is new data again: checked, then handed over again
    check("early", "2026-11-05T00:00:00Z", labelled=True)
    assert pending_labelled(ledger) == [str(tmp_path / "early")]


# --------------------------------------------------------------------------- artifact keys


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("clinic-b", "clinic-b"),
        ("2026-11-30", "2026-11-30"),
        ("Clinic B", r"clinic-b-[0-9a-f]{8}"),
        ("clinic_b__2026.11", r"clinic-b-2026-11-[0-9a-f]{8}"),
        ("Dermatologie Zürich", r"dermatologie-zurich-[0-9a-f]{8}"),
        ("皮膚", r"batch-[0-9a-f]{8}"),
        ("--", r"batch-[0-9a-f]{8}"),
        ("x" * 200, r"x{60}-[0-9a-f]{8}"),
    ],
)
def test_slug_is_a_valid_artifact_key(name, expected):
    from prefect.types.names import LOWERCASE_LETTERS_NUMBERS_AND_DASHES_ONLY_REGEX as KEY

    s = slug(name)
    assert re.fullmatch(expected, s), s
    assert re.fullmatch(KEY, f"drift-{s}")


def test_slug_keeps_batches_whose_names_differ_apart():
    names = ["clinic-b", "Clinic B", "clinic_b", "CLINIC-B"]
    assert len({slug(n) for n in names}) == len(names)


# --------------------------------------------------------------------------- the event and the trigger


def _retrain_trigger():
    """The trigger `prefect deploy` builds from prefect.yaml, as the server evaluates it."""
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.server.events.schemas.automations import Automation

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    on_demand = next(d for d in config["deployments"] if d["name"] == "on-demand")
    [trigger] = _initialize_deployment_triggers("on-demand", copy.deepcopy(on_demand["triggers"]))
    trigger.set_deployment_id(uuid4())
    core = trigger.as_automation()
    return Automation.model_validate({**core.model_dump(mode="json"), "id": str(uuid4())})


def _received(resource: dict[str, str], payload: dict, event: str = EVENT):
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.types._datetime import now

    return ReceivedEvent(event=event, resource=resource, payload=payload, occurred=now("UTC"), id=uuid4())


def test_drift_event_resource_and_payload(tmp_path):
    b = Batch("clinic-b", tmp_path / "clinic-b", "a" * 64, 51)
    report, metrics_path = tmp_path / "r" / "index.html", tmp_path / "drift.json"
    extra = [str(tmp_path / "older"), str(b.path)]
    resource, payload = drift_event(
        b, METRICS, retrain=True, extra_sources=extra, report=report, metrics_path=metrics_path
    )
    assert resource == {
        "prefect.resource.id": "skinlesion.batch.clinic-b",
        "prefect.resource.name": "clinic-b",
        "skinlesion.retrain": "true",
        "skinlesion.labelled": "true",
    }
    assert payload["path"] == str(b.path) and payload["report"] == str(report)
    assert payload["drifted_features"] == ["brightness", "lab_a"]
    assert payload["embedding_drift_score"] == 0.834221 and payload["drift_share"] == 0.740741
    assert isinstance(payload["extra_sources"], str) and json.loads(payload["extra_sources"]) == extra
    json.dumps(payload)  # an event payload is JSON

    off, _ = drift_event(
        b,
        {**METRICS, "labelled": False},
        retrain=False,
        extra_sources=[],
        report=report,
        metrics_path=metrics_path,
    )
    assert off["skinlesion.retrain"] == "false" and off["skinlesion.labelled"] == "false"


def test_the_declared_trigger_matches_drift_events_marked_for_retraining_only(tmp_path):
    automation = _retrain_trigger()
    trigger = automation.trigger
    assert trigger.posture == "Reactive" and trigger.threshold == 1 and automation.enabled
    assert automation.name == "retrain-on-drift"
    b = Batch("clinic-b", tmp_path / "clinic-b", "a" * 64, 51)

    def event(retrain: bool, **kw):
        resource, payload = drift_event(
            b, METRICS, retrain=retrain, extra_sources=[], report=tmp_path, metrics_path=tmp_path
        )
        return _received({**resource, **kw.pop("resource", {})}, payload, **kw)

    assert trigger.covers(event(True))
    assert not trigger.covers(event(False))  # drift.trigger_retrain: false
    assert not trigger.covers(event(True, event="skinlesion.drift.cleared"))
    assert not trigger.covers(event(True, resource={"prefect.resource.id": "other.batch.clinic-b"}))


def test_the_trigger_passes_extra_sources_to_the_retrain_unchanged(tmp_path):
    """The server's own rendering of the trigger's parameters (RunDeployment.render_parameters:
    v1 templates upgraded, then hydrated with the triggering event)."""
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    [action] = _retrain_trigger().actions
    assert isinstance(action, RunDeployment)
    b = Batch("clinic b", tmp_path / "clinic b", "a" * 64, 51)
    extra = [str(tmp_path / "older batch"), str(b.path), '/odd/"quoted"']
    resource, payload = drift_event(
        b, METRICS, retrain=True, extra_sources=extra, report=tmp_path, metrics_path=tmp_path
    )
    params = copy.deepcopy(action.parameters)
    RunDeployment._upgrade_v1_templates(params)
    ctx = HydrationContext(
        render_jinja=True, raise_on_error=True, jinja_context={"event": _received(resource, payload)}
    )
    rendered = hydrate(params, ctx)
    assert rendered == {"extra_sources": payload["extra_sources"]}
    assert parse_extra_sources(rendered["extra_sources"]) == extra


# --------------------------------------------------------------------------- the drift check task


def test_check_task_reports_the_drift_cli_error_line(tmp_path):
    empty = tmp_path / "inbox" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(DriftCheckFailed) as info:
        check_batch.fn(
            str(REPO), "empty", str(empty), str(tmp_path / "no-bundle"), str(tmp_path / "report"),
            str(tmp_path / "drift.json"), None, params=str(REPO / "params.yaml"),
        )  # fmt: skip
    e = info.value
    assert e.expected and e.returncode == 1
    assert e.error == f"--images {empty}: no image files (*.jpg, *.jpeg, *.png, *.bmp, *.tif, *.webp)"
    assert not (tmp_path / "drift.json").exists()


def test_a_crash_is_not_an_expected_failure():
    crash = DriftCheckFailed("b", 1, ["Traceback (most recent call last):", "KeyError: 'x'"])
    assert not crash.expected and crash.error == "KeyError: 'x'"
    killed = DriftCheckFailed("b", -9, [])
    assert not killed.expected and killed.error == "exit -9"


def test_batch_artifact_shows_verdict_features_unreadable_files_and_report_link(tmp_path):
    b = Batch("clinic-b", tmp_path / "clinic-b", "a" * 64, 52)
    report = tmp_path / "report" / "index.html"
    md = render_batch(b, "new", metrics=METRICS, report=report, retrain_note="emitted")
    assert md.startswith("# Drift check `clinic-b`: DRIFT DETECTED")
    assert "`brightness`, `lab_a`" in md and "score 0.834" in md and "distance 0.123" in md
    assert f"[index.html]({report.as_uri()})" in md
    assert "## 2 unreadable file(s)" in md and "- `text.jpg`: not an image" in md
    assert "yes (50 rows" in md and "nv 0.600, mel 0.400" in md

    failed = render_batch(
        b, "changed", failure=DriftCheckFailed("clinic-b", 1, ["x", "error: no readable image"])
    )
    assert failed.startswith("# Drift check `clinic-b`: FAILED") and "**Error:** no readable image" in failed


def test_the_bundle_to_check_is_production_else_the_candidate(tmp_path):
    from flows.dvcops import Layout

    layout = Layout(tmp_path)
    with pytest.raises(MonitorFailed, match="no model bundle in models/production or models/ensemble"):
        bundle_to_check(layout, None)
    for rel in ("models/ensemble", "models/production"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "bundle.json").write_text("{}")
        assert bundle_to_check(layout, None) == tmp_path / rel
    assert bundle_to_check(layout, "models/ensemble") == tmp_path / "models/ensemble"
    with pytest.raises(MonitorFailed, match="no bundle.json"):
        bundle_to_check(layout, str(tmp_path))


# --------------------------------------------------------------------------- the flow, on batches it refuses


@pytest.fixture
def mini_repo(tmp_path, monkeypatch):
    """The flow's view of a checkout: dvc.yaml, params.yaml (inbox and state inside), a bundle
    folder (the drift CLI refuses it: these batches never get as far as a model)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "models" / "ensemble").mkdir(parents=True)
    (root / "models" / "ensemble" / "bundle.json").write_text("{}")
    monkeypatch.chdir(root)
    # stages.drift must import from the project, whatever the flow's working directory
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return root


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def test_flow_records_failed_batches_publishes_them_and_checks_them_once(mini_repo, prefect_api):
    params = load_params(mini_repo / "params.yaml").drift
    inbox, state = mini_repo / params.inbox, mini_repo / params.monitor_state
    (inbox / "empty").mkdir(parents=True)
    (inbox / "Not Images").mkdir()
    (inbox / "Not Images" / "x.jpg").write_text("not a jpeg")  # found, then the bundle is refused

    state_ = monitor(return_state=True)
    assert state_.is_failed()
    assert "2 of 2 batch check(s) failed" in state_.message and "empty: --images" in state_.message
    ledger = json.loads((state / LEDGER).read_text())
    assert {n: e["status"] for n, e in ledger["batches"].items()} == {
        "empty": "failed",
        "Not Images": "failed",
    }
    assert "bundle.json: missing key" in ledger["batches"]["Not Images"]["error"]
    art = _artifact(f"drift-{slug('Not Images')}")
    assert art is not None and "FAILED" in art.data and "bundle.json: missing key" in art.data
    summary = _artifact("monitor-summary")
    assert "# Monitor" in summary.data and "FAILED" in summary.data

    # the same batches again: nothing to check; a fixed batch is checked again
    again = monitor()
    assert (
        again["checked"] == []
        and again["failed"] == []
        and sorted(again["skipped"]) == ["Not Images", "empty"]
    )
    make_jpeg(inbox / "empty" / "a.jpg")
    third = monitor(return_state=True)
    assert third.is_failed() and "1 of 1 batch check(s) failed: empty:" in third.message


def test_flow_with_no_inbox_completes_with_nothing_to_check(mini_repo, prefect_api):
    shutil.rmtree(mini_repo / "models")  # no bundle is needed when there is nothing to check
    # the default inbox (drift.inbox) does not exist yet on a fresh clone: nothing to check
    assert not (mini_repo / load_params(mini_repo / "params.yaml").drift.inbox).exists()
    result = monitor()
    assert (result["checked"], result["drifted"], result["failed"], result["skipped"]) == ([], [], [], [])
    assert result["inbox_exists"] is False


def test_an_inbox_asked_for_by_name_that_does_not_exist_fails_the_flow(mini_repo, prefect_api):
    state_ = monitor(inbox="nowhere", return_state=True)
    assert state_.is_failed()
    assert f"inbox {mini_repo / 'nowhere'}: folder not found (the inbox parameter: nowhere)" in state_.message


def test_the_command_with_a_mistyped_inbox_exits_1_naming_it(tmp_path):
    # the real command, before Prefect starts: one line, exit 1, never "0 checked"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.monitor", "--inbox", "inbxo"], cwd=tmp_path, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --inbox inbxo: folder not found (a folder whose sub-folders are the batches)"
    ]
    assert "checked" not in proc.stdout


def test_flow_with_a_batch_but_no_bundle_fails_naming_what_to_run(mini_repo, prefect_api):
    shutil.rmtree(mini_repo / "models")
    _batch(mini_repo / "data" / "inbox" / "b1")
    state_ = monitor(return_state=True)
    assert state_.is_failed() and "no model bundle in models/production or models/ensemble" in state_.message


# --------------------------------------------------------------------------- retrain: extra_sources


def test_parse_extra_sources():
    assert (
        parse_extra_sources(None) == [] and parse_extra_sources("") == [] and parse_extra_sources("[]") == []
    )
    assert parse_extra_sources('["/in/a", "/in/b"]') == ["/in/a", "/in/b"]
    assert parse_extra_sources(" /in/one batch ") == ["/in/one batch"]
    with pytest.raises(RetrainFailed, match="extra_sources: not a JSON list of paths"):
        parse_extra_sources('["/in/a",')
    with pytest.raises(RetrainFailed, match="every entry must be a non-empty path"):
        parse_extra_sources('["/in/a", 3, ""]')


def test_extra_sources_are_appended_once_in_order():
    assert merge_extra_source_params(["/a", "/b"], ["/b", "/c", "/a", "/d", "/c"]) == ["/a", "/b", "/c", "/d"]
    assert run_overrides(None, None, ["/b"], ("/a",)) == {"download.extra_sources": ["/a", "/b"]}
    # an explicit params override is the base the batches are appended to
    got = run_overrides(["custom_cnn"], {"download.extra_sources": ["/x"]}, ["/b"], ("/a",))
    assert got["download.extra_sources"] == ["/x", "/b"] and got["train.backbones"] == ["custom_cnn"]
    assert run_overrides(None, None, [], ("/a",)) == {}


def test_extra_sources_are_kept_in_params_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    base = load_params(params).download.extra_sources
    first = run_overrides(None, None, ["/in/clinic-b"], base)
    assert set_params(params, first)
    assert load_params(params).download.extra_sources == (*base, "/in/clinic-b")
    again = run_overrides(None, None, ["/in/clinic-b"], load_params(params).download.extra_sources)
    assert not set_params(params, again)  # handed over twice: params.yaml (and the data) unchanged


# --------------------------------------------------------------------------- external validation

# What `python -m serve.evaluate FOLDER --bundle B --out OUT` writes (serve/evaluate.py's contract).
EVALUATION = {
    "bundle": {
        "path": "/repo/models/production", "created": "2026-12-01T10:00:00Z", "data_version": "1234abcd",
        "tag": "model-20261201T100000Z",
        "label": "2026-12-01T10:00:00Z, data 1234abcd, model-20261201T100000Z",
        "modes": ["metadata", "image_only"], "thresholds": {"metadata": 0.2, "image_only": 0.25},
        "mode_rule": "metadata when ...", "trained_on": "dataverse", "synthetic": False, "disclaimer": "...",
    },
    "folder": "/in/clinic-b",
    "n_images": 48,
    "n_skipped": 2,
    "skipped": [
        {"image_id": "ISIC_1", "file": "/in/clinic-b/ISIC_1.jpg", "line": None, "reason": "truncated JPEG"},
        {"image_id": "ISIC_2", "file": "/in/clinic-b/metadata.csv", "line": 7,
         "reason": "sex 'robot' is not one of ['male', 'female', 'unknown']"},
    ],
    "modes": {
        "metadata": {
            "n_images": 48, "macro_auc": 0.861, "macro_auc_ci_low": 0.8, "macro_auc_ci_high": 0.9,
            "test_malignant_recall": 0.93, "test_malignant_recall_ci_low": 0.88,
            "test_malignant_recall_ci_high": 0.97, "test_specificity": 0.61,
            "balanced_accuracy_decision": 0.7, "lesion_macro_auc": 0.85,
        },
        "image_only": {
            "n_images": 48, "macro_auc": 0.82, "test_malignant_recall": 0.85, "test_specificity": 0.55,
            "balanced_accuracy_decision": 0.64, "lesion_macro_auc": float("nan"),
        },
    },
}  # fmt: skip


def _evaluation_file(path: Path, data=EVALUATION) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))  # NaN as JSON writes it (Python's json: NaN)
    return path


def test_an_evaluation_result_is_read_and_shown_per_input_mode(tmp_path):
    evaluation = read_evaluation(_evaluation_file(tmp_path / "evaluation.json"))
    b = Batch("clinic-b", tmp_path / "clinic-b", "a" * 64, 52)
    md = render_batch(b, "new", metrics={**METRICS, "drift_detected": False}, evaluation=evaluation)
    assert "| external validation | malignant recall 0.930 with metadata, 0.850 image only |" in md
    assert "## External validation: the labelled batch scored by the bundle (`serve.evaluate`)" in md
    assert "| images | 48 scored, 2 skipped |" in md
    assert (
        "| bundle | `/repo/models/production` (2026-12-01T10:00:00Z, data 1234abcd, model-20261201T100000Z) |"
        in md
    )
    assert "| metric | with metadata | image only |" in md
    assert "| test_malignant_recall | 0.930 [0.880, 0.970] | 0.850 |" in md
    assert "| macro_auc | 0.861 [0.800, 0.900] | 0.820 |" in md
    assert "| lesion_macro_auc | 0.850 | nan |" in md and "| test_ppv |" not in md
    assert "Skipped: `ISIC_1: truncated JPEG`, `ISIC_2: sex 'robot' is not one of" in md
    assert evaluation_values(evaluation) == {
        "n_images_metadata": 48.0, "macro_auc_metadata": 0.861, "lesion_macro_auc_metadata": 0.85,
        "test_malignant_recall_metadata": 0.93, "test_specificity_metadata": 0.61,
        "balanced_accuracy_decision_metadata": 0.7, "n_images_image_only": 48.0, "macro_auc_image_only": 0.82,
        "test_malignant_recall_image_only": 0.85, "test_specificity_image_only": 0.55,
        "balanced_accuracy_decision_image_only": 0.64,
    }  # fmt: skip
    # a one-mode bundle: one column
    one = {**EVALUATION, "modes": {"image_only": EVALUATION["modes"]["image_only"]}}
    md1 = render_batch(b, "new", metrics=METRICS, evaluation=one)
    assert "| metric | image only |" in md1 and "malignant recall 0.850 image only |" in md1
    # no evaluation (an unlabelled batch): no section
    assert "External validation" not in render_batch(b, "new", metrics=METRICS)
    assert "external validation" not in render_batch(b, "new", metrics=METRICS)


@pytest.mark.parametrize(
    "text, message",
    [("{", "unreadable evaluation result"), ('{"modes": {}}', "not an evaluation result (no 'modes' mapping"),
     ('{"modes": {"metadata": 0.9}}', "not an evaluation result")],
)  # fmt: skip
def test_a_broken_evaluation_result_is_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "evaluation.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        read_evaluation(path)


def test_evaluate_task_runs_serve_evaluate_and_reads_its_result(tmp_path, monkeypatch):
    seen: list[list[str]] = []
    out = tmp_path / "batches" / "clinic-b" / "evaluation.json"

    def fake(argv, cwd, *, on_line, env=None):
        seen.append(argv)
        _evaluation_file(out)
        return 0, ["scored 48 images"]

    monkeypatch.setattr(monitor_mod, "stream_command", fake)
    result = evaluate_batch.fn(str(REPO), "clinic-b", "/in/clinic-b", "/repo/models/production", str(out))
    assert result["modes"]["metadata"]["test_malignant_recall"] == 0.93
    assert seen[0][1:] == [
        "-m", "serve.evaluate", "/in/clinic-b", "--bundle", "/repo/models/production", "--out", str(out),
        "--no-progress",
    ]  # fmt: skip

    def refuses(argv, cwd, *, on_line, env=None):
        return 1, ["loading", "error: /in/clinic-b/metadata.csv: no dx column"]

    def skips_rows(argv, cwd, *, on_line, env=None):  # exit 1: rows left out, the others scored
        _evaluation_file(out)
        return 1, ["skipped image_id ISIC_1: truncated JPEG"]

    monkeypatch.setattr(monitor_mod, "stream_command", skips_rows)
    assert evaluate_batch.fn(str(REPO), "clinic-b", "/in/clinic-b", "/b", str(out))["n_skipped"] == 2

    monkeypatch.setattr(monitor_mod, "stream_command", refuses)
    with pytest.raises(EvaluationFailed) as info:
        evaluate_batch.fn(str(REPO), "clinic-b", "/in/clinic-b", "/b", str(out))
    assert info.value.error == "/in/clinic-b/metadata.csv: no dx column" and not out.exists()
    assert str(info.value).startswith("external validation of 'clinic-b' failed (exit 1)")

    monkeypatch.setattr(monitor_mod, "stream_command", lambda argv, cwd, *, on_line, env=None: (0, []))
    with pytest.raises(EvaluationFailed, match="unreadable evaluation result"):
        evaluate_batch.fn(str(REPO), "clinic-b", "/in/clinic-b", "/b", str(out))


@pytest.fixture
def checking(tmp_path, monkeypatch):
    """``check_one`` with the drift check, the evaluation and the artifacts faked: what the flow
    does around them (``evaluated``: the batches scored; ``published``: the artifacts)."""
    calls: dict[str, list] = {"evaluated": [], "published": []}

    def check(root, name, images, bundle, report_dir, metrics_path, workspace, params="params.yaml"):
        return {**METRICS, "drift_detected": False, "labelled": name.startswith("labelled")}

    def evaluate(root, name, images, bundle, out_path):
        calls["evaluated"].append((name, out_path))
        if name == "labelled-broken":
            raise EvaluationFailed(name, 1, ["error: metadata.csv: no dx column"])
        return read_evaluation(_evaluation_file(Path(out_path)))

    monkeypatch.setattr(monitor_mod, "check_batch", check)
    monkeypatch.setattr(monitor_mod, "evaluate_batch", evaluate)
    monkeypatch.setattr(monitor_mod, "publish", lambda key, md, desc: calls["published"].append((key, md)))
    state = tmp_path / "state"
    run = MonitorRun(
        root=tmp_path, params=tmp_path / "params.yaml", bundle=tmp_path / "bundle", state=state,
        workspace=None, retrain_on=False, ledger=new_ledger(), ledger_path=state / LEDGER, name="r",
        summary={"checked": [], "drifted": [], "failed": [], "events": []}, project="skin-lesion drift",
    )  # fmt: skip
    return run, calls


def test_a_labelled_batch_is_also_scored_and_the_artifact_shows_it(checking, tmp_path):
    run, calls = checking
    b = Batch("labelled-b", tmp_path / "labelled-b", "b" * 64, 50)
    row = check_one(run, b, "new")
    out = run.state / "batches" / "labelled-b" / "evaluation.json"
    assert calls["evaluated"] == [("labelled-b", str(out))]
    [(key, md)] = calls["published"]
    assert key == "drift-labelled-b" and "| test_malignant_recall | 0.930 [0.880, 0.970] | 0.850 |" in md
    assert row[4] == "yes; malignant recall 0.930 with metadata, 0.850 image only"
    entry = json.loads((run.state / LEDGER).read_text())["batches"]["labelled-b"]
    assert (
        entry["status"] == "checked" and entry["evaluation"] == str(out) and entry["evaluation_error"] is None
    )


def test_an_unlabelled_batch_is_not_scored(checking, tmp_path):
    run, calls = checking
    row = check_one(run, Batch("plain", tmp_path / "plain", "c" * 64, 50), "new")
    assert calls["evaluated"] == [] and row[4] == "no"
    [(_, md)] = calls["published"]
    assert "External validation" not in md
    assert "evaluation" not in json.loads((run.state / LEDGER).read_text())["batches"]["plain"]


def test_a_failed_evaluation_is_a_warning_and_the_drift_check_stands(checking, tmp_path, caplog):
    run, calls = checking
    with caplog.at_level("WARNING", logger="flows.monitor"):
        row = check_one(run, Batch("labelled-broken", tmp_path / "x", "d" * 64, 5), "changed")
    assert (
        "labelled-broken: external validation failed, the drift check stands: metadata.csv: no dx column"
        in (caplog.text)
    )
    assert row[1] == "no drift" and row[4] == "yes; FAILED (metadata.csv: no dx column)"
    [(_, md)] = calls["published"]
    assert "**Failed**, the drift check above stands: metadata.csv: no dx column" in md
    entry = json.loads((run.state / LEDGER).read_text())["batches"]["labelled-broken"]
    assert entry["status"] == "checked" and entry["evaluation"] is None
    assert entry["evaluation_error"] == "metadata.csv: no dx column"
    assert run.summary["checked"] == ["labelled-broken"] and run.summary["failed"] == []


def test_the_evaluation_goes_into_its_own_evidently_project(tmp_path):
    from evidently.ui.workspace import Workspace

    ws_dir = tmp_path / "ws"
    evaluation = read_evaluation(_evaluation_file(tmp_path / "evaluation.json"))
    first = add_evaluation_to_workspace(evaluation, ws_dir, "drift: external validation", "clinic-b")
    again = add_evaluation_to_workspace(evaluation, ws_dir, "drift: external validation", "clinic-c")
    assert first == again
    ws = Workspace(str(ws_dir))
    [project] = ws.search_project("drift: external validation")
    assert len(ws.list_runs(project.id)) == 2
    panels = project.dashboard.model().panels
    assert [p.title for p in panels][0] == "Malignant recall on labelled batches"


def test_a_batch_too_small_for_a_drift_test_says_so_instead_of_no_drift():
    few = {"drift_detected": None, "verdict": "too few images",
           "verdict_reason": "too few images for a drift test: 2 < 12"}  # fmt: skip
    assert verdict_text(few) == "too few images for a drift test: 2 < 12"
    assert verdict_text({"drift_detected": True}, drift="DRIFT DETECTED") == "DRIFT DETECTED"
    assert verdict_text({"drift_detected": False}) == "no drift"
