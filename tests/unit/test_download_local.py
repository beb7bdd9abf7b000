"""The download stage's local:PATH import and its failure modes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest

from stages.common import HAM_COLUMNS, StageError
from stages.download import main, run, safe_extract_zip
from stages.params import parse_params
from tests.conftest import make_jpeg

ROWS = [
    # lesion_id, image_id, dx, dx_type, age, sex, localization
    ("HAM_0000001", "ISIC_0000001", "nv", "follow_up", "45", "male", "back"),
    ("HAM_0000001", "ISIC_0000002", "nv", "follow_up", "45", "male", "back"),
    ("HAM_0000002", "ISIC_0000003", "mel", "histo", "80.0", "female", "face"),
    ("HAM_0000003", "ISIC_0000004", "bcc", "histo", "NA", "unknown", "unknown"),
]


def _release_folder(root: Path, *, tab: bool = True, crlf: bool = True) -> Path:
    """A folder shaped like the Dataverse release: two image parts + a .tab metadata table."""
    for i, row in enumerate(ROWS):
        part = "HAM10000_images_part_1" if i < 2 else "HAM10000_images_part_2"
        make_jpeg(root / part / f"{row[1]}.jpg", seed=i)
    sep = "\t" if tab else ","
    eol = "\r\n" if crlf else "\n"
    lines = [sep.join(HAM_COLUMNS)] + [sep.join(f'"{v}"' if tab else v for v in r) for r in ROWS]
    name = "HAM10000_metadata.tab" if tab else "HAM10000_metadata.csv"
    (root / name).write_bytes((eol.join(lines) + eol).encode())
    return root


def _download(source: str, out: Path, cache: Path):
    params = parse_params({"download": {"source": source}}).download
    return run(params, seed=0, out_dir=out, cache_dir=cache)


@pytest.mark.parametrize("tab, crlf", [(True, True), (False, False), (False, True)])
def test_local_folder_is_normalised_and_bytes_kept(tmp_path, tab, crlf):
    src = _release_folder(tmp_path / "release", tab=tab, crlf=crlf)
    res = _download(f"local:{src}", tmp_path / "raw", tmp_path / "cache")
    assert (res.n_rows, res.n_images) == (4, 4)

    text = (tmp_path / "raw" / "metadata.csv").read_bytes()
    assert b"\r" not in text and b'"' not in text
    df = pd.read_csv(tmp_path / "raw" / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(df.columns) == list(HAM_COLUMNS)
    assert df["image_id"].tolist() == [r[1] for r in ROWS]
    # ages written 45, 80.0 and NA all come out numeric-or-empty, like the CSV release
    assert df["age"].tolist() == ["45.0", "45.0", "80.0", ""]

    for i, row in enumerate(ROWS):
        part = "HAM10000_images_part_1" if i < 2 else "HAM10000_images_part_2"
        assert (tmp_path / "raw" / "images" / f"{row[1]}.jpg").read_bytes() == (
            src / part / f"{row[1]}.jpg"
        ).read_bytes()


def test_local_zip_is_imported(tmp_path):
    src = _release_folder(tmp_path / "release")
    archive = tmp_path / "ham.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src))
    res = _download(f"local:{archive}", tmp_path / "raw", tmp_path / "cache")
    assert (res.n_rows, res.n_images) == (4, 4)
    assert sorted(p.name for p in (tmp_path / "raw" / "images").iterdir()) == [f"{r[1]}.jpg" for r in ROWS]
    assert not any((tmp_path / "cache").iterdir()), "extraction scratch must be cleaned up"


@pytest.mark.parametrize("entry", ["../evil.jpg", "/abs/evil.jpg", "a/../../evil.jpg"])
def test_zip_slip_is_refused(tmp_path, entry):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(entry, "payload")
    dest = tmp_path / "x" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(StageError, match="refusing entry .*escapes the target folder"):
        safe_extract_zip(archive, dest)
    assert not (tmp_path / "x" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert not any(dest.iterdir()), "nothing may be extracted from an archive with a bad entry"


def test_missing_columns_name_the_file(tmp_path):
    src = tmp_path / "release"
    make_jpeg(src / "ISIC_0000001.jpg")
    (src / "metadata.csv").write_text("lesion_id,image_id,dx,age\nHAM_1,ISIC_0000001,nv,3\n")
    with pytest.raises(StageError, match=r"metadata\.csv: missing HAM10000 column\(s\) \['dx_type', 'sex'"):
        _download(f"local:{src}", tmp_path / "raw", tmp_path / "cache")


def _good_raw(tmp_path: Path) -> Path:
    src = _release_folder(tmp_path / "release")
    _download(f"local:{src}", tmp_path / "raw", tmp_path / "cache")
    return tmp_path / "raw"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "params_text, message",
    [
        ("download:\n  source: local:/no/such/folder\n", "local path '/no/such/folder' does not exist"),
        ("download:\n  source: s3://bucket\n", "download.source: unknown source 's3://bucket'"),
        ("download:\n  sorce: synthetic\n", "download.sorce: unknown key (did you mean 'download.source'?)"),
    ],
)
def test_cli_errors_are_one_line_and_leave_raw_intact(tmp_path, capsys, params_text, message):
    raw = _good_raw(tmp_path)
    before = _snapshot(raw)
    params = tmp_path / "params.yaml"
    params.write_text(params_text)
    rc = main(["--params", str(params), "--out", str(raw), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in err
    assert _snapshot(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")) == []


def test_failure_midway_leaves_previous_raw_intact(tmp_path):
    """A source that breaks after output started (metadata fine, table unreadable) changes nothing."""
    raw = _good_raw(tmp_path)
    before = _snapshot(raw)
    src = tmp_path / "broken"
    make_jpeg(src / "ISIC_0000009.jpg")
    (src / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")  # header only, columns missing
    with pytest.raises(StageError):
        _download(f"local:{src}", raw, tmp_path / "cache")
    assert _snapshot(raw) == before


@pytest.mark.realdata
def test_real_shared_data_imports_byte_for_byte(tmp_path, shared_ham):
    res = _download(f"local:{shared_ham}", tmp_path / "raw", tmp_path / "cache")
    assert (res.n_rows, res.n_images) == (9247, 9247)
    df = pd.read_csv(tmp_path / "raw" / "metadata.csv", dtype=str, keep_default_na=False)
    src = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    assert df.equals(src)  # the CSV release is already normalised: identical content
    images = sorted((tmp_path / "raw" / "images").iterdir())
    assert len(images) == 9247
    # the thumbnail folder (all 9,247) wins over the 124 originals that share ids
    for p in images[::97] + [tmp_path / "raw" / "images" / "ISIC_0024306.jpg"]:
        assert p.read_bytes() == (shared_ham / "images_200x150" / p.name).read_bytes()
