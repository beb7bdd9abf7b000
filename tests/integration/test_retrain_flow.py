"""The retrain flow end to end against the real ``dvc`` and a temporary Prefect API, on a toy
pipeline whose stages take milliseconds (tests/integration/toy_pipeline.py)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.retrain import plan, retrain
from skinlesion.core.schema import CLASSES
from tests.integration.toy_pipeline import make_toy_repo

pytestmark = pytest.mark.slow

# The toy's bundles are not real ones and record no seen.json: the gate falls back to the stored
# metrics and says so (the real comparison: test_the_gate_scores_production_on_the_same_images).
NOT_PAIRED = (
    "not compared on the same images: models/production has no seen.json (a bundle from before it was "
    "recorded): which images it learned from is unknown; the AUC checks compare each bundle's stored "
    "test metrics"
)


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    repo = make_toy_repo(tmp_path / "toy")
    monkeypatch.chdir(repo)  # the flow works on the repository it runs in, as a deployment does
    return repo


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in arts}


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def test_plan_task_reads_the_dag_from_dvc(toy):
    """``task.fn()``: the engine adds nothing to the plan, so the plain function is tested."""
    waves = plan.fn(str(toy), None, ["drift"])
    assert waves[3:6] == [["prepare"], ["train@mobilenetv2", "train@custom_cnn"],
                          ["evaluate@mobilenetv2", "evaluate@custom_cnn"]]  # fmt: skip
    assert plan.fn(str(toy), ["validate"], []) == [["download"], ["split"], ["validate"]]


def test_promotes_then_keeps_production_when_the_gate_fails(toy, prefect_api):
    state = retrain(return_state=True)
    assert state.is_completed() and state.name == "Completed", state.message
    result = state.result()
    assert result["promoted"] and result["tag"].startswith("model-")
    assert result["stages"]["train@custom_cnn"] == "ran"

    prod = toy / "models" / "production"
    record = yaml.safe_load((prod / "production.json").read_text())
    assert (prod / "bundle.json").read_bytes() == (toy / "models" / "ensemble" / "bundle.json").read_bytes()
    assert record["git_tag"] == result["tag"]
    lock = yaml.safe_load((toy / "dvc.lock").read_text())
    assert record["data_version"] == lock["stages"]["download"]["outs"][0]["md5"]
    outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    assert record["data_versions"] == {p: outs[p] for p in ("data/raw", "data/split", "data/validated")}
    assert record["gate_overrides"] == {} and record["gate"]["thresholds"]["source"].startswith(
        "`params.yaml` at git HEAD"
    )
    assert record["metrics"]["metrics/calibration.json"]["test_malignant_recall"] == 0.96
    assert (toy / "models" / "production.dvc").is_file()
    tagged = subprocess.run(
        ["git", "show", f"{result['tag']}:dvc.lock"], cwd=toy, capture_output=True, text=True
    )
    assert tagged.stdout == (toy / "dvc.lock").read_text()

    arts = _artifacts(state.state_details.flow_run_id)
    md = arts["retrain-summary"].data
    assert "# Retrain" in md and ": promoted" in md
    assert "| **ensemble** | 0.650 | 0.550 | 0.450 | 0.800 | 0.810 [0.770, 0.840] |" in md
    assert "| `train@custom_cnn` | ran |" in md
    assert arts["retrain-metrics-diff"].type == "table"

    # A weaker candidate (1 epoch: AUCs 0.08 below production) whose own params_overrides lower
    # every gate input: it is judged by the committed bar all the same. Not promoted, production
    # untouched.
    before = _snapshot(prod)
    lock_before = (toy / "dvc.lock").read_text()
    loosening = {"promote.max_auc_drop": 1.0, "promote.min_test_recall": 0.0, "calibrate.target_recall": 0.5}
    state2 = retrain(params_overrides={**loosening, "train.common.epochs": 1}, return_state=True)
    assert state2.is_completed() and state2.name == "Not promoted", state2.message
    r2 = state2.result()
    assert not r2["promoted"]
    assert r2["reason"] == (
        "malignant_auc 0.730 vs production 0.810 (-0.080; drop allowed 0.010): too low; "
        "macro_auc 0.720 vs production 0.800 (-0.080; drop allowed 0.010): too low; "
        f"{NOT_PAIRED}"
    )
    assert r2["gate"]["checks"][0]["detail"] == "test_malignant_recall 0.960 >= target 0.950"
    assert r2["stages"]["download"] == "skipped" and r2["stages"]["calibrate"] == "ran"
    assert set(r2["stages"]) == set(result["stages"])  # models/production.dvc is not a stage to run
    assert (toy / "dvc.lock").read_text() != lock_before  # the candidate was rebuilt...
    assert _snapshot(prod) == before  # ...and production is byte for byte what it was
    tags = subprocess.run(["git", "tag"], cwd=toy, capture_output=True, text=True).stdout.split()
    assert tags == [result["tag"]]
    calibration = json.loads((toy / "metrics" / "calibration.json").read_text())
    assert calibration["target_recall"] == 0.5  # the override did reach the candidate's calibration
    arts2 = _artifacts(state2.state_details.flow_run_id)
    md2 = arts2["retrain-summary"].data
    assert "Outcome:** not promoted: malignant_auc 0.730 vs production 0.810" in md2
    assert "params_overrides of gate inputs, not used by the gate: `promote.max_auc_drop=1.0`" in md2
    assert "## Data version: same as production" in md2
    assert "## Paired comparison with production\n\nNot compared on the same images: models/production" in md2
    table = arts2["retrain-metrics-diff"].data
    rows = {(r["file"], r["metric"]): r for r in (json.loads(table) if isinstance(table, str) else table)}
    assert rows[("metrics/ensemble.json", "malignant_auc")] == {
        "file": "metrics/ensemble.json", "metric": "malignant_auc", "production": 0.81, "candidate": 0.73,
        "change": -0.08,
    }  # fmt: skip

    # The operator's gate_overrides do move the bar: the same candidate (run 2's overrides are
    # still in params.yaml, nothing reruns) is promoted, and says so everywhere. The promotion
    # commits the committed bar, not run 2's kept overrides nor this run's gate_overrides.
    state3 = retrain(gate_overrides={"promote.max_auc_drop": 0.1}, return_state=True)
    assert state3.is_completed() and state3.name == "Completed", state3.message
    r3 = state3.result()
    assert r3["promoted"] and r3["reason"].endswith("(gate overridden: promote.max_auc_drop=0.1)")
    assert set(r3["stages"].values()) == {"skipped"}
    record3 = yaml.safe_load((prod / "production.json").read_text())
    assert record3["gate_overrides"] == {"promote.max_auc_drop": 0.1}
    assert record3["gate"]["thresholds"]["max_auc_drop"] == 0.1
    assert record3["gate"]["thresholds"]["committed"]["promote.max_auc_drop"] == 0.01
    committed = yaml.safe_load(
        subprocess.run(
            ["git", "show", f"{r3['tag']}:params.yaml"], cwd=toy, capture_output=True, text=True, check=True
        ).stdout
    )
    assert committed["promote"] == {**committed["promote"], "max_auc_drop": 0.01, "min_test_recall": 0.95}
    assert committed["calibrate"]["target_recall"] == 0.5  # dvc.lock's, kept
    art3 = _artifacts(state3.state_details.flow_run_id)["retrain-summary"]
    assert art3.description == "retrain: promoted (GATE OVERRIDDEN)"
    assert "**GATE OVERRIDDEN by the operator (gate_overrides), this run only:** " in art3.data
    assert "the macro AUC difference on the same images) | 0.010 | 0.100 |" in art3.data


def test_validation_failure_stops_before_training(toy, prefect_api):
    state = retrain(params_overrides={"validate.min_class_count": 1000}, return_state=True)
    assert state.is_failed()
    assert "stage 'validate' failed: validation FAILED: metadata: class count below" in state.message
    assert not (toy / "models").exists()
    names = set(_task_runs(state.state_details.flow_run_id))
    assert "dvc repro validate" in names and not any(n.startswith("dvc repro train") for n in names)
    md = _artifacts(state.state_details.flow_run_id)["retrain-summary"].data
    assert "## Stage `validate` failed" in md
    assert "validation FAILED: metadata: class count below validate.min_class_count" in md
    assert "| passed | 0 |" in md and "| metadata_fail_class_count | 7 |" in md
    assert "| `prepare` | not run |" in md


def test_a_transient_lock_error_is_retried_and_the_run_completes(toy, prefect_api):
    """Another process holds the DVC repository lock: the first `dvc repro` fails with DVC's lock
    error, the task is retried after its backoff, by then the lock is free, and the run completes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, zc.lockfile; l = zc.lockfile.LockFile(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(toy / ".dvc" / "tmp" / "lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"

    def release_when_retry_is_scheduled():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

        flt = TaskRunFilter(name=TaskRunFilterName(any_=["dvc repro download"]))
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = client.read_task_runs(task_run_filter=flt)
                if any(r.state and r.state.name == "AwaitingRetry" for r in runs):
                    break
                time.sleep(0.2)
        holder.stdin.close()  # the holder exits and the lock is free

    watcher = threading.Thread(target=release_when_retry_is_scheduled, daemon=True)
    watcher.start()
    try:
        state = retrain(stages=["download"], return_state=True)
    finally:
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(timeout=30)
        watcher.join(timeout=5)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages"] == {"download": "ran"}
    assert not result["promoted"] and result["reason"] == "this run did not reproduce 'calibrate'"
    run = _task_runs(state.state_details.flow_run_id)["dvc repro download"]
    assert run.run_count == 2
    assert (toy / "data" / "raw" / "metadata.csv").is_file()


def test_unknown_stage_fails_fast_with_the_stage_list(toy, prefect_api):
    state = retrain(stages=["trian"], return_state=True)
    assert state.is_failed()
    assert "unknown stage 'trian'; dvc.yaml has: download, split, validate, prepare" in state.message


def test_with_two_gpus_each_concurrent_train_stage_is_handed_its_own_device_id(toy, prefect_api, monkeypatch):
    """What this shows: the flow runs train@a and train@b at once (DVC releases its lock while a
    stage command runs) and hands each a different CUDA_VISIBLE_DEVICES id. The toy stages touch
    no GPU; that TensorFlow then sees only that device is the gpu-marked
    tests/unit/model/test_train.py::test_each_concurrent_stage_sees_only_its_own_gpu."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("TOY_TRAIN_SECONDS", "4")
    state = retrain(stages=["train"], return_state=True)
    assert state.is_completed(), state.message
    runs = [
        json.loads((toy / "models" / bb / "run.json").read_text()) for bb in ("mobilenetv2", "custom_cnn")
    ]
    assert sorted(r["device"] for r in runs) == ["0", "1"]
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs)  # the two ran at the same time
    lock = yaml.safe_load((toy / "dvc.lock").read_text())
    assert {"train@mobilenetv2", "train@custom_cnn"} <= set(lock["stages"])  # both recorded
    md = _artifacts(state.state_details.flow_run_id)["retrain-summary"].data
    assert "| devices | 0, 1 |" in md
    assert re.search(r"\| `train@custom_cnn` \| ran \| \d+\.\d \| [01] \|", md), md


def test_with_a_dvc_remote_the_run_pulls_and_pushes_the_run_cache(toy, prefect_api, tmp_path):
    """A default remote makes the flow `dvc repro --pull` and `dvc push --run-cache`, so another
    machine restores unchanged stages' outputs instead of recomputing them."""
    remote = tmp_path / "remote"
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)], cwd=toy, check=True
    )
    state = retrain(stages=["prepare"], return_state=True)
    assert state.is_completed(), state.message
    assert (remote / "files" / "md5").is_dir() and any((remote / "runs").iterdir())

    other = tmp_path / "other-machine"
    subprocess.run(["git", "clone", "-q", str(toy), str(other)], check=True)  # no dvc.lock, no data
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)], cwd=other, check=True
    )
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--pull", "--single-item", "download"],
        cwd=other, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Stage 'download' is cached - skipping run, checking out outputs" in out
    assert (other / "data" / "raw" / "metadata.csv").read_bytes() == (
        toy / "data" / "raw" / "metadata.csv"
    ).read_bytes()


def test_a_fusion_candidate_must_reach_the_recall_target_in_both_input_modes(toy, prefect_api):
    """Issue 19: a bundle that refers malignant lesions only when given age, sex and site is not
    promoted. The toy's fusion bundle trained without metadata dropout reaches 0.96 with metadata
    and 0.30 image-only; with dropout it reaches 0.96 in both modes and is promoted."""
    fusion = {"train.backbone.custom_cnn.fusion": True}
    state = retrain(params_overrides={**fusion, "train.common.metadata_dropout": 0.0}, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert not result["promoted"]
    assert not (toy / "models" / "production").exists()
    md = _artifacts(state.state_details.flow_run_id)["retrain-summary"].data
    assert "test_malignant_recall_image_only (image only) 0.300 < target 0.950" in md

    # (overrides are written to params.yaml: the next run sets the dropout back explicitly)
    state = retrain(params_overrides={**fusion, "train.common.metadata_dropout": 0.5}, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["promoted"], state.message
    record = json.loads((toy / "models" / "production" / "production.json").read_text())
    calibration = record["metrics"]["metrics/calibration.json"]
    assert calibration["test_malignant_recall"] == calibration["test_malignant_recall_image_only"] == 0.96


def test_the_gate_scores_production_on_the_same_images(toy, prefect_api, tmp_path, monkeypatch):
    """Issue 20, item 6, through the flow: the candidate bundle is a real one (TOY_REAL), so after
    the first promotion the next run scores production on the candidate's test images it has not
    seen (task score-production) and decides on the paired CI. The stored toy metrics are equal
    for both runs: only the paired comparison can tell the candidates apart."""
    from flows.gate_paired import score_requests
    from skinlesion.measure.predictions import write_predictions
    from skinlesion.measure.scoring import IMAGE_ONLY
    from tests.builders.bundles import make_bundle
    from tests.builders.frames import served, with_probs
    from tests.conftest import make_jpeg

    real = tmp_path / "real"
    make_bundle(real / "bundle")
    rows = served(n_lesions=30, seed=4)[["image_id", "lesion_id", "dx", "age", "sex", "localization"]]
    for k, image_id in enumerate(rows["image_id"]):
        make_jpeg(real / "images" / f"{image_id}.jpg", size=(48, 40), seed=k)
    frames, failed, _ = score_requests(real / "bundle", rows, real / "images", (IMAGE_ONLY,))
    assert not failed
    own = frames[IMAGE_ONLY]
    write_predictions(own, real / "served.csv")
    seen_lesion = rows["lesion_id"].iloc[0]
    n_seen = int((rows["lesion_id"] == seen_lesion).sum())
    (real / "seen.json").write_text(json.dumps({
        "format_version": 1, "splits": ["train", "val"], "lesion_ids": [seen_lesion], "image_ids": [],
    }))  # fmt: skip
    monkeypatch.setenv("TOY_REAL", str(real))

    first = retrain(return_state=True)
    assert first.is_completed() and first.result()["promoted"], first.message
    prod = toy / "models" / "production"
    assert (prod / "seen.json").is_file()

    # The same bundle again (a candidate equal to production): promoted on the paired CI [0, 0].
    again = retrain(params_overrides={"calibrate.ece_bins": 10}, return_state=True)
    assert again.is_completed() and again.name == "Completed", again.message
    r2 = again.result()
    n = len(rows) - n_seen
    auc = next(c for c in r2["gate"]["checks"] if c["name"] == "macro_auc")
    same = f"on the same {n} test images ({n_seen} left out: seen by production): "
    assert auc["passed"] and same + "+0.000, 95% CI [+0.000, +0.000]" in auc["detail"]
    paired = r2["gate"]["paired"]
    assert (paired["n_test"], paired["n_left_out"], paired["n_images"]) == (len(rows), n_seen, n)
    record = json.loads((prod / "production.json").read_text())
    assert record["gate"]["paired"]["modes"][0]["metrics"]["macro_auc"]["diff"] == 0.0
    names = set(_task_runs(again.state_details.flow_run_id))
    assert "score-production" in {name.rsplit("-", 1)[0] for name in names}, names

    # A candidate sure of the wrong class for every image, with the same stored metrics: refused
    # on the paired CI; production stays as it was.
    before = _snapshot(prod)
    wrong = (own["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy() + 1) % len(CLASSES)
    logits = np.full((len(own), len(CLASSES)), -6.0)
    logits[np.arange(len(own)), wrong] = 6.0
    worse = with_probs(own, logits)
    for c in CLASSES:
        worse[f"logit_{c}"] = np.log(worse[f"prob_{c}"])
    write_predictions(worse, real / "served.csv")
    third = retrain(params_overrides={"calibrate.ece_bins": 12}, return_state=True)
    assert third.is_completed() and third.name == "Not promoted", third.message
    r3 = third.result()
    assert r3["reason"].startswith("macro_auc ") and same + "-" in r3["reason"]
    assert "95% CI [" in r3["reason"] and r3["reason"].endswith("): too low")
    assert _snapshot(prod) == before
    md = _artifacts(third.state_details.flow_run_id)["retrain-summary"].data
    assert f"Both bundles scored on the same **{n}** test images" in md
    assert f"less **{n_seen}** (1 lesions) production trained, tuned or calibrated on" in md
    assert "| image only | **macro_auc** |" in md
