"""The short run summary `make demo` prints."""

import json

from tools.summary import summarize


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


def test_reproduction_verdict_identical_and_moved_without_a_noise_band():
    from tools.summary import reproduction_verdict

    same = {"metrics/ensemble.json": {"macro_auc": {"old": 0.91, "new": 0.91, "diff": 0},
                                      "train_seconds": {"old": 10, "new": 99, "diff": 89}}}  # fmt: skip
    text = reproduction_verdict(same)
    assert text == "reproduction: REPRODUCED the committed run (HEAD): 1 metrics compared, all identical"
    # a tiny move is not "reproduced" any more: without a measured band, any difference counts
    close = {"m.json": {"macro_auc": {"old": 0.91, "new": 0.915}, "n_images": {"old": 700, "new": 700}}}
    text = reproduction_verdict(close)
    assert text.startswith("reproduction: DIFFERS from the committed run (HEAD): 1 of 2 metrics differ")
    assert "no noise band committed (make noise)" in text
    moved = {"m.json": {"macro_auc": {"old": 0.91, "new": 0.80}, "best_member": {"old": "a", "new": "b"}}}
    text = reproduction_verdict(moved)
    assert text.startswith("reproduction: DIFFERS") and "m.json:macro_auc 0.91 -> 0.8" in text
    assert "m.json:best_member 'a' -> 'b'" in text
    assert "the first artifact that differs is unknown: no dvc.lock at HEAD or here" in text
    # timings are the machine's; test_specificity is the model's (a bare "_s" once hid it)
    timed = {
        "m.json": {
            "decode_seconds": {"old": 1, "new": 2},
            "images_per_s": {"old": 5, "new": 9},
            "cost_s": {"old": 3, "new": 4},
            "test_specificity": {"old": 0.5, "new": 0.4},
        }
    }
    assert "1 of 1 metrics differ" in reproduction_verdict(timed)
    fresh = {"m.json": {"macro_auc": {"old": None, "new": 0.9}}}
    assert "no baseline committed" in reproduction_verdict(fresh)


def _lock(**md5s):
    """A dvc.lock (parsed) of the demo's DAG with these output md5s (default "a") and params."""
    params = md5s.pop("params", {})
    code = md5s.pop("code", {})
    source = md5s.pop("source", "synthetic")
    order = [("download", "data/raw"), ("split", "data/split"), ("validate", "data/validated"),
             ("prepare", "data/prepared"), ("train@mobilenetv2", "models/mobilenetv2"),
             ("train@custom_cnn", "models/custom_cnn"), ("calibrate", "models/ensemble")]  # fmt: skip
    stages, prev = {}, None
    for name, out in order:
        deps = [{"path": f"stages/{name.split('@')[0]}.py", "md5": code.get(name, "c")}]
        if prev:
            deps.append({"path": prev, "md5": md5s.get(prev.split("/")[-1], "a")})
        stages[name] = {
            "cmd": f"python -m stages.{name}",
            "deps": deps,
            "params": {
                "params.yaml": {"base.seed": 42, "download": {"source": source}, **params.get(name, {})}
            },
            "outs": [{"path": out, "md5": md5s.get(out.split("/")[-1], "a")}],
        }
        prev = out if not name.startswith("train") else "data/prepared"
    return {"schema": "2.0", "stages": stages}


HEAD = {
    "metrics/headline.json": {
        "macro_auc": {"old": 0.90, "new": 0.88},
        "ece_after": {"old": 0.05, "new": 0.05},
        "referrals_per_100": {"old": 40.0, "new": 42.0},
    },
    "metrics/eval/custom_cnn.json": {"val_macro_auc": {"old": 0.8, "new": 0.7}},
}


def test_within_noise_when_every_headline_metric_is_inside_its_band():
    from tools.summary import reproduction_verdict

    bands = {"macro_auc": 0.03, "ece_after": 0.01, "referrals_per_100": 5.0}
    text = reproduction_verdict(HEAD, bands=bands, old_lock=_lock(), new_lock=_lock(raw="b"), rev="HEAD")
    assert text.startswith(
        "reproduction: WITHIN NOISE of the committed run (HEAD): 3 of 4 metrics differ, every headline "
        "metric within its noise band (largest: macro_auc 0.9 -> 0.88, |diff| 0.02 vs band 0.03, 67% of it)"
    )
    # a member's metric moved more, but the verdict is about the headline
    only_member = {**HEAD, "metrics/headline.json": {"macro_auc": {"old": 0.9, "new": 0.9}}}
    assert "the headline metrics are identical" in reproduction_verdict(only_member, bands=bands)
    # one key beyond its band, or without a band, is enough to differ
    text = reproduction_verdict(HEAD, bands={**bands, "macro_auc": 0.01}, old_lock=_lock(), new_lock=_lock())
    assert text.startswith("reproduction: DIFFERS from the committed run (HEAD): 3 of 4 metrics differ\n")
    assert "  headline macro_auc: 0.9 -> 0.88, |diff| 0.02, band 0.01 (beyond)" in text
    assert "  headline referrals_per_100: 40.0 -> 42.0, |diff| 2, band 5" in text
    text = reproduction_verdict(HEAD, bands={"macro_auc": 0.03}, old_lock=_lock(), new_lock=_lock())
    assert "headline referrals_per_100: 40.0 -> 42.0, |diff| 2, no band (beyond)" in text
    # a baseline with no headline (nor calibration) metrics cannot be judged by the band
    text = reproduction_verdict({"metrics/eval/a.json": {"x": {"old": 1, "new": 2}}}, bands=bands)
    assert "DIFFERS" in text and "has no headline metrics to judge by the noise band" in text


def test_differs_names_the_first_artifact_in_dag_order_and_why():
    from tools.summary import first_difference, report_outputs, reproduction_verdict

    old = _lock()
    # the synthetic data/raw itself: same code, params and command -> the generator (issue 20)
    new = _lock(raw="d70be3", split="x", mobilenetv2="y")
    text = reproduction_verdict(HEAD, bands={"macro_auc": 0.001}, old_lock=old, new_lock=new)
    assert (
        "  first artifact that differs: data/raw (stage download) differs: md5 d70be3 here vs a committed\n"
        "    same code, params and command: the data generator gave other bytes on this machine "
        "(see tests/unit/sources/test_synthetic_platform.py)"
    ) in text
    real = first_difference(_lock(source="local:/x"), _lock(raw="b", source="local:/x"))
    assert "the source (local:/x) gave other bytes" in real
    # params of the split stage changed: named by key
    new = _lock(split="b", params={"split": {"split.hash_radius": 6}})
    assert first_difference(old, new).endswith("params differ: split.hash_radius")
    # the training code changed: the first model differs, and the code is named (not its data input)
    new = _lock(mobilenetv2="b", code={"train@mobilenetv2": "c2"})
    assert first_difference(old, new) == (
        "models/mobilenetv2 (stage train@mobilenetv2) differs: md5 b here vs a committed\n"
        "    code differs: stages/train.py"
    )
    # the same inputs gave another model: not bit-reproducible here
    text = first_difference(old, _lock(custom_cnn="b"))
    assert text.startswith("models/custom_cnn (stage train@custom_cnn)") and "not bit-reproducible" in text
    assert first_difference(old, _lock()) is None
    text = reproduction_verdict(HEAD, old_lock=old, new_lock=_lock())
    assert "every artifact in dvc.lock has its committed md5 (only metrics and reports differ)" in text
    grown = _lock()
    grown["stages"]["train@resnet_small"] = {"outs": [{"path": "models/resnet_small", "md5": "r"}]}
    assert "models/resnet_small (stage train@resnet_small) is not an output of the committed run" in (
        first_difference(old, grown)
    )
    # a metrics file or report (cache: false in dvc.yaml) is no artifact: its timing may differ
    pipeline = {
        "stages": {
            "validate": {
                "outs": ["data/validated"],
                "metrics": [{"metrics/validation.json": {"cache": False}}],
            },
            "evaluate": {"foreach": ["a"], "do": {"plots": ["metrics/eval/${item}/roc"]}},
            "train": {"outs": [{"models/x": {"persist": True}}, {"metrics/train/x": {"cache": False}}]},
        }
    }
    is_report = report_outputs(pipeline)
    assert is_report("metrics/validation.json") and is_report("metrics/eval/mobilenetv2/roc/mel.csv")
    assert is_report("metrics/train/x") and not is_report("data/validated") and not is_report("models/x")
    with_report = _lock()
    with_report["stages"]["validate"]["outs"].append({"path": "metrics/validation.json", "md5": "t1"})
    moved_report = _lock(mobilenetv2="b", code={"train@mobilenetv2": "c2"})
    moved_report["stages"]["validate"]["outs"].append({"path": "metrics/validation.json", "md5": "t2"})
    assert first_difference(with_report, moved_report).startswith("metrics/validation.json")
    assert first_difference(with_report, moved_report, is_report).startswith("models/mobilenetv2")
    pdiff = {"params.yaml": {"train.common.epochs": {"old": 20, "new": 3}}}
    text = reproduction_verdict(HEAD, old_lock=old, new_lock=_lock(mobilenetv2="z"), params_diff=pdiff)
    assert "  params differ (dvc params diff HEAD): train.common.epochs" in text


def test_the_summary_shows_only_the_runs_members_from_its_params(tmp_path, capsys):
    """A member file another run left (the demo's mobilenetv2 after a real run without it) is not
    this run's: the params say which backbones the run trained (issue 22)."""
    from tools.summary import main

    (tmp_path / "eval").mkdir()
    for bb, auc in (("mobilenetv2", 0.61), ("custom_cnn", 0.83), ("resnet_small", 0.85)):
        (tmp_path / "eval" / f"{bb}.json").write_text(json.dumps({"macro_auc": auc}))
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  backbones: [resnet_small, custom_cnn]\n")
    assert main(["--metrics", str(tmp_path), "--params", str(params)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    assert rows == ["resnet_small", "custom_cnn"]
    # no params file: the ensemble's weights decide, else every member file is shown
    assert main(["--metrics", str(tmp_path), "--params", str(tmp_path / "none.yaml")]) == 0
    assert "mobilenetv2" in capsys.readouterr().out
    (tmp_path / "ensemble.json").write_text(json.dumps({"macro_auc": 0.9, "weight_custom_cnn": 1.0}))
    assert main(["--metrics", str(tmp_path), "--params", str(tmp_path / "none.yaml")]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2" not in out and "resnet_small" not in out and "custom_cnn" in out


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
