"""The short run summary `make demo` prints."""

import json

from stages.summary import summarize


def test_summary_shows_headline_numbers_with_cis(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "custom_cnn.json").write_text(
        json.dumps(
            {"macro_auc": 0.9066, "macro_auc_ci_low": 0.81, "macro_auc_ci_high": 0.96, "mel_recall": 0.5}
        )
    )
    (tmp_path / "calibration.json").write_text(
        json.dumps(
            {
                "target_recall": 0.95,
                "threshold": 0.2974,
                "test_malignant_recall": 0.85,
                "ece_before": 0.118,
                "ece_after": 0.063,
            }
        )  # fmt: skip
    )
    (tmp_path / "split.json").write_text(json.dumps({"n_images": 700, "leaking_groups": 0}))
    text = summarize(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("custom_cnn"))
    assert "0.907 [0.81, 0.96]" in row and "0.500" in row and row.count("-") >= 2
    assert "threshold 0.297, test_malignant_recall 0.850" in text
    assert "ECE 0.118 -> 0.063" in text and "700 images" in text and "leaking groups 0" in text
    assert summarize(tmp_path / "nothing") == f"no metrics found under {tmp_path / 'nothing'}"


def test_summary_ends_with_the_drift_verdict_and_report(tmp_path):
    drift = {
        "batch": "demo-clinic-b", "n_images": 300, "n_unreadable": 2, "drift_detected": True,
        "dataset_drift": True, "n_drifted_features": 17, "n_features": 27, "alarm_features": ["lab_b"],
        "embedding_drift": False, "embedding_drift_score": 0.52, "drifted_features": ["brightness", "lab_b"],
        "report": "reports/drift/index.html",
    }  # fmt: skip
    (tmp_path / "drift.json").write_text(json.dumps(drift))
    lines = summarize(tmp_path).splitlines()
    assert lines[-3] == (
        "drift check of demo-clinic-b (300 images, 2 unreadable): DRIFT DETECTED: 17 of 27 features "
        "drifted; large shift in lab_b"
    )
    assert lines[-2] == "  drifted features: brightness, lab_b"
    assert lines[-1] == "  report: reports/drift/index.html"
    calm = {**drift, "drift_detected": False, "dataset_drift": False}
    calm.update(alarm_features=[], drifted_features=[])
    (tmp_path / "drift.json").write_text(json.dumps(calm))
    assert "): no drift" in summarize(tmp_path)


def test_reproduction_verdict_identical_close_and_moved():
    from stages.summary import reproduction_verdict

    same = {"metrics/ensemble.json": {"macro_auc": {"old": 0.91, "new": 0.91, "diff": 0},
                                      "train_seconds": {"old": 10, "new": 99, "diff": 89}}}  # fmt: skip
    assert "REPRODUCED" in reproduction_verdict(same, 0.02) and "1 metrics compared, identical" in (
        reproduction_verdict(same, 0.02)
    )
    close = {"m.json": {"macro_auc": {"old": 0.91, "new": 0.915}, "n_images": {"old": 700, "new": 700}}}
    assert "1 identical, 1 within 0.02" in reproduction_verdict(close, 0.02)
    moved = {"m.json": {"macro_auc": {"old": 0.91, "new": 0.80}, "best_member": {"old": "a", "new": "b"}}}
    text = reproduction_verdict(moved, 0.02)
    assert text.startswith("reproduction: DIFFERS") and "m.json:macro_auc 0.91 -> 0.8" in text
    assert "m.json:best_member 'a' -> 'b'" in text
    fresh = {"m.json": {"macro_auc": {"old": None, "new": 0.9}}}
    assert "no baseline committed" in reproduction_verdict(fresh, 0.02)


def test_summary_shows_each_input_mode_of_a_fusion_bundle(tmp_path):
    # calibration.json of a fusion bundle: the metadata mode unsuffixed, image-only with _image_only
    served = {"macro_auc": 0.91, "macro_auc_ci_low": 0.88, "macro_auc_ci_high": 0.94, "threshold": 0.21,
              "test_malignant_recall": 0.96, "test_specificity": 0.52, "ece_before": 0.1,
              "ece_after": 0.04}  # fmt: skip
    image_only = {"macro_auc": 0.89, "threshold": 0.27, "test_malignant_recall": 0.95,
                  "test_specificity": 0.48, "ece_before": 0.12, "ece_after": 0.05}  # fmt: skip
    cal = {**served, **{f"{k}_image_only": v for k, v in image_only.items()}, "target_recall": 0.95}
    (tmp_path / "calibration.json").write_text(json.dumps(cal))
    (tmp_path / "ensemble.json").write_text(json.dumps({"macro_auc": 0.905, "macro_auc_image_only": 0.885}))
    lines = summarize(tmp_path).splitlines()
    rows = {line[:20].strip(): line[20:] for line in lines if line and not line.startswith(" ")}
    assert rows["ensemble"].startswith("0.905")
    assert rows["served, metadata"].startswith("0.910 [0.88, 0.94]")
    assert rows["served, image only"].startswith("0.890")
    assert "operating point (chosen on val for malignant recall >= 0.95), on test:" in lines
    assert (
        "  served, metadata: threshold 0.210, test_malignant_recall 0.960, test_specificity 0.520; "
        "ECE 0.100 -> 0.040"
    ) in lines
    assert (
        "  served, image only: threshold 0.270, test_malignant_recall 0.950, test_specificity 0.480; "
        "ECE 0.120 -> 0.050"
    ) in lines
    # an image-only bundle: one served row, no mode named
    (tmp_path / "calibration.json").write_text(json.dumps({**served, "target_recall": 0.95}))
    text = summarize(tmp_path)
    assert "served, image only" not in text and "  served: threshold 0.210" in text
