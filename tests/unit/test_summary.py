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
