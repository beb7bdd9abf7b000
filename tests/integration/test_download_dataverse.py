"""download.run() with source=dataverse against a local fake Dataverse (tests/range_server.py).

The served files have the real release's layout: two zips of ``<image_id>.jpg`` at the zip root
and ``HAM10000_metadata`` ingested as ``.tab`` (its original a CRLF CSV).
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.core.errors import StageError
from skinlesion.core.schema import HAM_COLUMNS
from skinlesion.params.download import DataverseParams, DownloadParams
from stages.download import run
from tests.conftest import make_jpeg, write_raw

PART_1, PART_2 = "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip"


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _crlf_csv(rows: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    rows.to_csv(buf, index=False, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    return buf.getvalue().encode()


def _params(server, **kw) -> DownloadParams:
    dv = DataverseParams(
        base_url=server.url, doi=server.doi, retries=1, backoff_s=0.0, chunk_bytes=4096, **kw
    )
    return DownloadParams(source="dataverse", dataverse=dv)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataverse_release_layout_lands_in_raw(shared_ham, range_server, tmp_path):
    meta = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    rows = pd.concat([meta.head(4), meta[meta["age"] == ""].head(1)], ignore_index=True)
    assert len(rows) == 5 and rows["image_id"].is_unique
    images = {i: (shared_ham / "images_200x150" / f"{i}.jpg").read_bytes() for i in rows["image_id"]}
    ids = list(images)
    _zip(range_server.root / PART_1, {f"{i}.jpg": images[i] for i in ids[:3]})
    _zip(range_server.root / PART_2, {f"{i}.jpg": images[i] for i in ids[3:]})
    range_server.ingest = {"HAM10000_metadata.csv"}
    (range_server.root / "HAM10000_metadata.csv").write_bytes(_crlf_csv(rows))
    # Every file's first request breaks after 200 bytes: the stage must resume, not restart.
    range_server.cut_after, range_server.cut_first = 200, 1
    out = tmp_path / "data" / "raw"

    result = run(_params(range_server), seed=0, out_dir=out, cache_dir=tmp_path / "cache")

    assert (result.n_rows, result.n_images) == (5, 5)
    text = (out / "metadata.csv").read_bytes()
    assert b"\r" not in text and text.startswith(",".join(HAM_COLUMNS).encode() + b"\n")
    got = pd.read_csv(out / "metadata.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(got, rows[list(HAM_COLUMNS)])
    assert _tree(out / "images") == {f"{i}.jpg": b for i, b in images.items()}
    for name in (PART_1, PART_2, "HAM10000_metadata.tab"):
        assert [h.range for h in range_server.file_hits(name)] == [None, "bytes=200-"], name


def test_zip_slip_entry_is_refused_and_raw_is_kept(range_server, tmp_path):
    good, evil = tmp_path / "good.jpg", tmp_path / "src_evil.jpg"
    make_jpeg(good, seed=1)
    make_jpeg(evil, seed=2)
    _zip(range_server.root / PART_1, {"ISIC_0000001.jpg": good.read_bytes()})
    _zip(
        range_server.root / PART_2, {"ISIC_0000002.jpg": good.read_bytes(), "../evil.jpg": evil.read_bytes()}
    )
    rows = pd.DataFrame(
        [["HAM_1", f"ISIC_000000{k}", "nv", "histo", "50.0", "male", "back"] for k in (1, 2)],
        columns=list(HAM_COLUMNS),
    )
    range_server.ingest = {"HAM10000_metadata.csv"}
    (range_server.root / "HAM10000_metadata.csv").write_bytes(_crlf_csv(rows))
    out = tmp_path / "work" / "data" / "raw"
    write_raw(out, [{"lesion_id": "HAM_9", "image_id": "ISIC_0000009", "dx": "mel"}])
    before = _tree(out)

    with pytest.raises(StageError) as err:
        run(_params(range_server), seed=0, out_dir=out, cache_dir=tmp_path / "work" / "cache")

    assert "refusing entry '../evil.jpg' that escapes the target folder" in str(err.value)
    assert PART_2 in str(err.value)
    assert _tree(out) == before
    assert [p for p in tmp_path.rglob("evil.jpg")] == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]  # no temp dir left beside it
