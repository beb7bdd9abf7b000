"""The validate stage on tiny real JPEG sets: facts, expectations, the gate and its outputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from skinlesion.checks.imagefacts import inspect_image, inspect_images
from skinlesion.checks.suites import Failure
from skinlesion.checks.validation_report import failure_summary
from skinlesion.core.errors import ParamsError
from skinlesion.core.schema import CLASSES
from skinlesion.params.load import parse_params
from stages.validate import ValidationFailed, main, run
from tests.builders.images import huge_header_jpeg, truncate
from tests.conftest import REPO, make_jpeg, write_raw

# --------------------------------------------------------------------------- fixtures


def tiny_rows() -> list[dict]:
    """7 classes x 6 lesions; the third lesion of each class has two images (49 rows)."""
    rows, n_img, n_les = [], 0, 0
    for dx in CLASSES:
        for k in range(6):
            n_les += 1
            for _ in range(2 if k == 2 else 1):
                n_img += 1
                rows.append({"lesion_id": f"HAM_{n_les:07d}", "image_id": f"ISIC_{n_img:07d}", "dx": dx})
    return rows


def write_split(path: Path, rows: list[dict]) -> pd.DataFrame:
    """A lesion-grouped split: per class, lesion 0 -> val, lesion 1 -> test, the rest -> train."""
    order: dict[str, list[str]] = {}
    for r in rows:
        order.setdefault(r["dx"], [])
        if r["lesion_id"] not in order[r["dx"]]:
            order[r["dx"]].append(r["lesion_id"])
    where = {
        les: ("val", "test")[i] if i < 2 else "train" for ls in order.values() for i, les in enumerate(ls)
    }
    df = pd.DataFrame(
        [
            {
                "image_id": r["image_id"],
                "lesion_id": r["lesion_id"],
                "group_id": r["lesion_id"],
                "dx": r["dx"],
            }
            for r in rows
        ]
    )
    df["split"] = df["lesion_id"].map(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, lineterminator="\n")
    return df


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    """tmp_path/raw (49 real 64x48 JPEGs + metadata.csv) and tmp_path/split/split.csv."""
    rows = tiny_rows()
    write_raw(tmp_path / "raw", rows)
    write_split(tmp_path / "split" / "split.csv", rows)
    return tmp_path


def _params(**validate):
    return parse_params({"validate": {"workers": 1, **validate}})


def _run(root: Path, **validate):
    p = _params(**validate)
    return run(
        p.validate,
        fractions=p.split.fractions,
        raw=root / "raw",
        split=root / "split",
        out=root / "validated",
        report=root / "report",
        metrics=root / "metrics.json",
        progress=False,
    )


def _fail(root: Path, **validate) -> str:
    with pytest.raises(ValidationFailed) as e:
        _run(root, **validate)
    return str(e.value)


# --------------------------------------------------------------------------- image facts


def test_inspect_image_facts(tmp_path):
    good = make_jpeg(tmp_path / "good.jpg", size=(64, 48))
    facts = inspect_image(good, 10**8)
    assert facts["format"] == "JPEG" and facts["mode"] == "RGB"
    assert (facts["width"], facts["height"]) == (64, 48) and facts["error"] is None
    assert facts["bytes"] == good.stat().st_size and len(facts["sha256"]) == 64

    trunc = make_jpeg(tmp_path / "trunc.jpg", size=(64, 48))
    truncate(trunc)
    facts = inspect_image(trunc, 10**8)
    assert facts["format"] == "JPEG" and "truncated" in facts["error"]  # the header alone is fine

    (tmp_path / "empty.jpg").write_bytes(b"")
    assert inspect_image(tmp_path / "empty.jpg", 10**8)["bytes"] == 0
    (tmp_path / "text.jpg").write_bytes(b"hello")
    assert inspect_image(tmp_path / "text.jpg", 10**8)["error"] == "not an image Pillow can identify"

    Image.new("RGB", (40, 40), "red").save(tmp_path / "png.jpg", "PNG")
    assert inspect_image(tmp_path / "png.jpg", 10**8)["format"] == "PNG"
    gray = make_jpeg(tmp_path / "gray.jpg", mode="L")
    assert inspect_image(gray, 10**8)["mode"] == "L"


def test_pixel_limit_is_applied_from_the_header_without_allocating(tmp_path):
    """A 20,000 x 20,000 header is refused with its size; peak memory stays that of a bare interpreter.

    The control lifts the limit on a 12,000 x 12,000 header: Pillow then allocates the 430 MB
    frame (and, the file ending in a proper EOI marker, even "decodes" it without an error),
    which shows the measurement catches a check that decodes first and asks later.
    """
    code = (
        "import re, sys; from skinlesion.checks.imagefacts import inspect_image; "
        "f = inspect_image(sys.argv[1], int(sys.argv[2])); "
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child of a big
        # pytest process would report the parent's peak; VmHWM belongs to this image alone.
        "rss = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
        "print(f['width'], f['height'], f['error'] is None, rss)"
    )

    def measure(side: int, limit: int) -> tuple[str, int]:
        bomb = huge_header_jpeg(tmp_path / f"bomb{side}.jpg", side, side)
        out = subprocess.run(
            [sys.executable, "-c", code, str(bomb), str(limit)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return " ".join(out[:3]), int(out[3]) // 1024  # MB

    facts, peak_mb = measure(20_000, 100_000_000)
    assert facts == "20000 20000 True"  # size from the header; no decode attempted, so no error
    assert peak_mb < 200, f"peak RSS {peak_mb} MB: the image was allocated"
    facts, peak_mb = measure(12_000, 10**10)
    assert facts.startswith("12000 12000") and peak_mb > 350, f"control decode peaked at only {peak_mb} MB"


def test_inspect_images_pool_matches_sequential(tmp_path):
    paths = [make_jpeg(tmp_path / f"{i}.jpg", size=(40, 32), seed=i) for i in range(70)]
    truncate(paths[33])
    seq = inspect_images(paths, 10**8, 1, progress=False)
    par = inspect_images(paths, 10**8, 2, progress=False)
    assert par == seq and "truncated" in seq[33]["error"] and seq[0]["error"] is None


# --------------------------------------------------------------------------- the gate


def test_clean_set_passes_and_writes_every_output(tiny):
    res = _run(tiny)
    assert res.passed and res.suites == {"metadata": True, "images": True, "split": True}
    assert res.failures == () and res.warnings == ()
    out = pd.read_csv(tiny / "validated" / "split.csv", dtype=str)
    assert out.equals(pd.read_csv(tiny / "split" / "split.csv", dtype=str))
    assert (tiny / "validated" / "quarantine.csv").read_text() == "image_id,file,reason\n"
    m = json.loads((tiny / "metrics.json").read_text())
    assert m["passed"] == 1 and m["metadata_passed"] == m["images_passed"] == m["split_passed"] == 1
    assert m["n_images_checked"] == 49 and m["n_quarantined"] == 0 and m["n_validated"] == 49
    assert m["metadata_fail_dx_in_set"] == 0 and m["images_fail_decodes"] == 0 and m["seconds"] > 0
    assert all(isinstance(v, int | float) for v in m.values())  # flat
    index = (tiny / "report" / "index.html").read_text()
    assert "metadata" in index and "split_groups" in index  # the GX Data Docs site, one page per suite
    assert list((tiny / "report" / "validations").rglob("*.html"))
    assert (tiny / "report" / "summary.txt").read_text().startswith("validation passed")


def test_failure_exits_1_names_the_file_and_leaves_the_previous_output(tiny, capsys, monkeypatch):
    _run(tiny)
    before = {p.name: p.read_bytes() for p in (tiny / "validated").iterdir()}
    truncate(tiny / "raw" / "images" / "ISIC_0000003.jpg")
    monkeypatch.chdir(tiny)  # relative paths, as dvc passes them
    args = (
        "--params params.yaml --raw raw --split split --out validated --report report --metrics metrics.json"
    )
    (tiny / "params.yaml").write_text("validate:\n  workers: 1\n")
    assert main(args.split()) == 1
    err = capsys.readouterr().err
    assert (
        "images: does not decode fully: 1 file, first: ISIC_0000003.jpg (row 4) image file is truncated"
        in err
    )
    assert "(row = line in metadata.csv)" in err and "details: report/index.html" in err
    assert "{" not in err.split("validation failed")[1]  # a summary, not a JSON dump
    after = {p.name: p.read_bytes() for p in (tiny / "validated").iterdir()}
    assert after == before
    m = json.loads((tiny / "metrics.json").read_text())
    assert m["passed"] == 0 and m["images_passed"] == 0 and m["images_fail_decodes"] == 1
    assert m["metadata_passed"] == 1 and m["n_validated"] == 0
    assert "does not decode fully" in (tiny / "report" / "summary.txt").read_text()


def test_quarantine_removes_bad_images_and_passes(tiny):
    truncate(tiny / "raw" / "images" / "ISIC_0000010.jpg")
    (tiny / "raw" / "images" / "ISIC_0000011.jpg").write_bytes(b"")
    res = _run(tiny, on_image_error="quarantine")
    assert res.passed and res.metrics["n_quarantined"] == 2 and res.metrics["images_fail_decodes"] == 1
    q = pd.read_csv(tiny / "validated" / "quarantine.csv")
    assert list(q.columns) == ["image_id", "file", "reason"]
    assert q["image_id"].tolist() == ["ISIC_0000010", "ISIC_0000011"]
    assert q["file"].tolist() == ["images/ISIC_0000010.jpg", "images/ISIC_0000011.jpg"]
    assert q["reason"][0].startswith("does not decode fully: image file is truncated")
    assert q["reason"][1] == "empty file (0 bytes)"
    out = pd.read_csv(tiny / "validated" / "split.csv")
    assert len(out) == 47 and not out["image_id"].isin(q["image_id"]).any()


def test_quarantine_lists_missing_and_orphan_files_and_trusts_undecodable_csv(tiny):
    (tiny / "raw" / "images" / "ISIC_0000020.jpg").unlink()
    make_jpeg(tiny / "raw" / "images" / "ISIC_0099999.jpg")
    # The split stage could not hash this one, listed it and left it out of split.csv.
    truncate(tiny / "raw" / "images" / "ISIC_0000032.jpg")
    (tiny / "split" / "undecodable.csv").write_text("image_id,error\nISIC_0000032,truncated\n")
    split = pd.read_csv(tiny / "split" / "split.csv", dtype=str)
    split[split["image_id"] != "ISIC_0000032"].to_csv(tiny / "split" / "split.csv", index=False)
    msg = _fail(tiny)  # fail mode: named once, by the images suite, not again as "missing from split.csv"
    assert "images: does not decode fully: 1 file, first: ISIC_0000032.jpg (row 33)" in msg
    assert "missing from split.csv" not in msg
    res = _run(tiny, on_image_error="quarantine")
    q = pd.read_csv(tiny / "validated" / "quarantine.csv").set_index("image_id")["reason"].to_dict()
    assert q == {
        "ISIC_0000020": "metadata row without an image file: no such file in images/",
        "ISIC_0000032": q["ISIC_0000032"],
        "ISIC_0099999": "image file without a metadata row",
    }
    assert q["ISIC_0000032"].startswith("does not decode fully: image file is truncated")
    out = set(pd.read_csv(tiny / "validated" / "split.csv")["image_id"])
    assert res.passed and res.n_validated == 47 and not {"ISIC_0000020", "ISIC_0000032"} & out


def test_quarantine_still_fails_when_the_remainder_breaks_the_split(tiny):
    # ISIC_0000001 is the only akiec image in val: without it val has no akiec.
    truncate(tiny / "raw" / "images" / "ISIC_0000001.jpg")
    msg = _fail(tiny, on_image_error="quarantine")
    assert "split: class missing from a split: 1 class, first: val has no akiec image" in msg
    assert "after quarantining 1 image(s)" in msg and "images:" not in msg
    assert not (tiny / "validated").exists()


def test_split_leakage_and_consistency_are_named(tiny):
    split = pd.read_csv(tiny / "split" / "split.csv", dtype=str)
    split.loc[split["image_id"] == "ISIC_0000004", "split"] = "val"  # its lesion's other image is in train
    split.loc[split["image_id"] == "ISIC_0000010", "dx"] = "mel"
    split = split[split["image_id"] != "ISIC_0000012"]
    split.to_csv(tiny / "split" / "split.csv", index=False, lineterminator="\n")
    msg = _fail(tiny)
    assert (
        "split: group in more than one split: 1 group, first: group HAM_0000003 in train, val "
        "(ISIC_0000003, ISIC_0000004)" in msg
    )
    assert "split: lesion in more than one split: 1 lesion, first: lesion HAM_0000003 in train, val" in msg
    assert (
        "split: split.csv dx differs from metadata: 1 image, first: ISIC_0000010 dx='mel', metadata has 'bcc'"
        in msg
    )
    assert "split: metadata image missing from split.csv: 1 image, first: ISIC_0000012" in msg
    assert "\n  metadata:" not in msg and "\n  images:" not in msg


def test_split_fractions_are_checked_against_split_params(tiny):
    msg = _fail(tiny, fraction_tolerance=0.01)
    assert (
        "split: split fraction off target by more than 0.01: 1 split, first: train 0.714 of 49 images" in msg
    )
    assert "target 0.7" in msg
    assert _run(tiny, fraction_tolerance=0.02).passed  # 0.714 vs 0.70, 0.143 vs 0.15


def test_dropped_rows_are_not_training_rows(tiny):
    split = pd.read_csv(tiny / "split" / "split.csv", dtype=str)
    split.loc[split["image_id"] == "ISIC_0000005", "split"] = "dropped"
    split.to_csv(tiny / "split" / "split.csv", index=False, lineterminator="\n")
    assert _run(tiny).passed
    out = pd.read_csv(tiny / "validated" / "split.csv")
    assert len(out) == 48 and "ISIC_0000005" not in set(out["image_id"])


def test_missing_columns_are_named_and_other_checks_still_run(tiny):
    meta = pd.read_csv(tiny / "raw" / "metadata.csv", dtype=str, keep_default_na=False)
    meta = meta.rename(columns={"sex": "Sex"}).drop(columns=["dx_type"])
    meta.to_csv(tiny / "raw" / "metadata.csv", index=False, lineterminator="\n")
    msg = _fail(tiny)
    assert (
        "metadata: columns are not the HAM10000 set: 3 columns, first: missing ['dx_type', 'sex']; "
        "unexpected ['Sex']" in msg
    )
    assert msg.count("\n  ") == 2  # that line and the details line: nothing else fails


def test_bomb_in_a_run_is_refused_by_pixels_and_sides(tiny):
    huge_header_jpeg(tiny / "raw" / "images" / "ISIC_0000007.jpg")
    msg = _fail(tiny)
    assert (
        "images: more than max_pixels=100000000 pixels (refused before decoding): 1 file, "
        "first: ISIC_0000007.jpg (row 8) 20000x20000 = 400000000 pixels" in msg
    )
    assert "images: width outside [32, 8192]: 1 file" in msg and "does not decode" not in msg


def test_summary_lists_one_line_per_expectation_with_first_examples():
    examples = tuple(f"row {i} ISIC_00243{i - 7} dx='healthy'" for i in (17, 18, 19))
    f = Failure(
        "metadata", "metadata", "dx_in_set", "dx not in the class set", "row", 5, (17, 18, 19), examples
    )
    g = Failure(
        "images", "images", "has_row", "image file without a metadata row", "file", 1, ("x.jpg",), ("x.jpg",)
    )
    text = failure_summary([g, f], Path("reports/validation/index.html"))
    lines = text.splitlines()
    assert lines[0] == "validation failed: 2 expectation(s) in metadata, images (row = line in metadata.csv)"
    assert lines[1] == "  images: image file without a metadata row: 1 file, first: x.jpg"
    assert lines[2] == (
        "  metadata: dx not in the class set: 5 rows, first: row 17 ISIC_0024310 dx='healthy'; "
        "row 18 ISIC_0024311 dx='healthy'; row 19 ISIC_0024312 dx='healthy'"
    )
    assert lines[3] == "  details: reports/validation/index.html"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"classes": []}, "validate.classes: list each value once"),
        ({"sexes": ["male", "male"]}, "validate.sexes: list each value once"),
        ({"on_non_jpeg": "keep"}, "validate.on_non_jpeg: 'keep' is not one of ['convert', 'reject']"),
    ],
)
def test_validate_params_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params({"validate": raw})
