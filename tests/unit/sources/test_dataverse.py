"""The dataverse source against a real HTTP server on 127.0.0.1 (tests/range_server.py)."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from skinlesion.core.errors import StageError
from skinlesion.params.download import DataverseParams
from skinlesion.sources.dataverse import content_range_start, fetch_dataverse, parse_listing
from tests.range_server import RangeServer, parse_range, to_tab

CSV = b"lesion_id,image_id,dx,dx_type,age,sex,localization\r\nHAM_1,ISIC_0000001,nv,histo,50.0,male,back\r\n"


def _blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _params(server: RangeServer, files: tuple[str, ...], **kw) -> DataverseParams:
    base = {"retries": 0, "backoff_s": 0.0, "chunk_bytes": 1024, "timeout_s": 5.0}
    return DataverseParams(base_url=server.url, doi=server.doi, files=files, **{**base, **kw})


def _serve(server: RangeServer, name: str, data: bytes) -> bytes:
    (server.root / name).write_bytes(data)
    return data


def _cache_names(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith("dataverse-listing")}


def test_fresh_download_of_zip_and_ingested_table(range_server, tmp_path):
    z = _serve(range_server, "HAM10000_images_part_1.zip", _blob(5000))
    range_server.ingest = {"HAM10000_metadata.csv"}
    _serve(range_server, "HAM10000_metadata.csv", CSV)
    cache = tmp_path / "cache"

    got = fetch_dataverse(
        _params(range_server, ("HAM10000_images_part_1.zip", "HAM10000_metadata.tab")), cache
    )

    assert got["HAM10000_images_part_1.zip"].read_bytes() == z
    # The .tab is fetched as its original (the listed checksum is the original's) and keeps .csv.
    assert got["HAM10000_metadata.tab"] == cache / "HAM10000_metadata.csv"
    assert got["HAM10000_metadata.tab"].read_bytes() == CSV
    (tab_hit,) = range_server.file_hits("HAM10000_metadata.tab")
    assert tab_hit.query == {"format": "original"}
    (zip_hit,) = range_server.file_hits("HAM10000_images_part_1.zip")
    assert zip_hit.query == {} and zip_hit.range is None
    assert _cache_names(cache) == {"HAM10000_images_part_1.zip", "HAM10000_metadata.csv"}


def test_broken_transfer_resumes_within_one_call(range_server, tmp_path, caplog):
    data = _serve(range_server, "a.zip", _blob(10_000))
    range_server.cut_after, range_server.cut_first = 3000, 1
    caplog.set_level(logging.INFO, logger="skinlesion.sources.dataverse")

    got = fetch_dataverse(_params(range_server, ("a.zip",), retries=2), tmp_path / "cache")

    assert got["a.zip"].read_bytes() == data
    hits = range_server.file_hits("a.zip")
    assert [(h.range, h.status) for h in hits] == [(None, 200), ("bytes=3000-", 206)]
    assert "resuming a.zip from byte 3000 of 10000" in caplog.text
    assert "transfer broke at byte 3000" in caplog.text


def test_broken_transfer_resumes_on_the_next_run(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(10_000, seed=1))
    range_server.cut_after, range_server.cut_first = 4096, 1
    cache = tmp_path / "cache"
    params = _params(range_server, ("a.zip",), retries=0)

    with pytest.raises(StageError) as err:
        fetch_dataverse(params, cache)
    msg = str(err.value)
    assert "downloading a.zip: transfer broke at byte 4096" in msg
    assert "gave up after 1 attempt(s)" in msg and "a.zip.part is kept" in msg
    assert (cache / "a.zip.part").read_bytes() == data[:4096]
    assert not (cache / "a.zip").exists()

    got = fetch_dataverse(params, cache)

    assert got["a.zip"].read_bytes() == data
    assert [h.range for h in range_server.file_hits("a.zip")] == [None, "bytes=4096-"]
    assert _cache_names(cache) == {"a.zip"}


def test_server_ignoring_range_still_gives_the_right_bytes(range_server, tmp_path, caplog):
    data = _serve(range_server, "a.zip", _blob(8000, seed=2))
    range_server.cut_after, range_server.cut_first = 2500, 1
    range_server.ignore_range = True
    caplog.set_level(logging.INFO, logger="skinlesion.sources.dataverse")

    got = fetch_dataverse(_params(range_server, ("a.zip",), retries=1), tmp_path / "cache")

    assert got["a.zip"].read_bytes() == data  # not 2500 stale bytes + the whole file
    assert [(h.range, h.status) for h in range_server.file_hits("a.zip")] == [
        (None, 200),
        ("bytes=2500-", 200),
    ]
    assert "server ignored the Range request" in caplog.text


def test_wrong_checksum_fails_and_leaves_no_file(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(3000, seed=3))
    range_server.checksums["a.zip"] = "0" * 32
    cache = tmp_path / "cache"

    with pytest.raises(StageError) as err:
        fetch_dataverse(_params(range_server, ("a.zip",), retries=3), cache)

    real = hashlib.md5(data).hexdigest()
    assert str(err.value) == f"checksum mismatch for a.zip: expected {'0' * 32}, got {real}"
    assert _cache_names(cache) == set()  # neither a.zip nor a.zip.part
    assert len(range_server.file_hits("a.zip")) == 1  # a bad checksum is not retried


def test_503_twice_then_success(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(2000, seed=4))
    range_server.fail_first = 2

    t0 = time.monotonic()
    got = fetch_dataverse(_params(range_server, ("a.zip",), retries=3, backoff_s=0.05), tmp_path / "c")
    elapsed = time.monotonic() - t0

    assert got["a.zip"].read_bytes() == data
    assert [h.status for h in range_server.file_hits("a.zip")] == [503, 503, 200]
    assert elapsed >= 0.05 + 0.10  # the backoff doubles: 0.05 s, then 0.10 s


def test_persistent_503_gives_up_after_the_retries(range_server, tmp_path):
    _serve(range_server, "a.zip", _blob(100))
    range_server.fail_first = 99

    with pytest.raises(StageError) as err:
        fetch_dataverse(_params(range_server, ("a.zip",), retries=2), tmp_path / "c")

    assert str(err.value) == "downloading a.zip: HTTP 503 (gave up after 3 attempt(s))"
    assert len(range_server.file_hits("a.zip")) == 3


def test_listing_503_is_retried(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(100))
    range_server.fail_on, range_server.fail_first = "listing", 1

    got = fetch_dataverse(_params(range_server, ("a.zip",), retries=1), tmp_path / "c")

    assert got["a.zip"].read_bytes() == data
    assert [h.status for h in range_server.requests if "datasets" in h.path] == [503, 200]


def test_stalled_transfer_times_out_and_resumes(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(6000, seed=5))
    range_server.cut_after, range_server.cut_first, range_server.stall_s = 1500, 1, 2.0

    got = fetch_dataverse(_params(range_server, ("a.zip",), retries=1, timeout_s=0.3), tmp_path / "c")

    assert got["a.zip"].read_bytes() == data
    assert [h.range for h in range_server.file_hits("a.zip")] == [None, "bytes=1500-"]


def test_client_error_names_url_and_status(range_server, tmp_path):
    _serve(range_server, "a.zip", _blob(100))
    range_server.status_for["a.zip"] = 403
    file_id = range_server.file_id("a.zip")

    with pytest.raises(StageError) as err:
        fetch_dataverse(_params(range_server, ("a.zip",), retries=5, backoff_s=5.0), tmp_path / "c")

    assert str(err.value) == (
        f"dataverse: HTTP 403 Forbidden for {range_server.url}/api/access/datafile/{file_id}"
    )
    assert len(range_server.file_hits("a.zip")) == 1


def test_unknown_doi_is_named(range_server, tmp_path):
    params = DataverseParams(base_url=range_server.url, doi="doi:10.5072/FK2/NOPE", retries=0)
    with pytest.raises(StageError, match=r"dataset doi:10\.5072/FK2/NOPE not found \(HTTP 404 from http"):
        fetch_dataverse(params, tmp_path / "c")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_the_offline_hint(tmp_path):
    base = f"http://127.0.0.1:{_closed_port()}"
    params = DataverseParams(base_url=base, retries=5, backoff_s=2.0)

    t0 = time.monotonic()
    with pytest.raises(StageError) as err:
        fetch_dataverse(params, tmp_path / "c")

    assert time.monotonic() - t0 < 2.0
    assert str(err.value) == (
        f"cannot reach {base} (Connection refused): no internet access? Set download.source to "
        "local:PATH (a HAM10000 folder or zip) or synthetic"
    )


def test_cached_complete_file_is_not_downloaded_again(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(3000, seed=6))
    _serve(range_server, "b.zip", _blob(3000, seed=7))
    cache = tmp_path / "cache"
    fetch_dataverse(_params(range_server, ("a.zip",)), cache)
    range_server.requests.clear()

    got = fetch_dataverse(_params(range_server, ("a.zip", "b.zip")), cache)

    assert got["a.zip"].read_bytes() == data
    assert range_server.file_hits("a.zip") == []
    assert len(range_server.file_hits("b.zip")) == 1


def test_corrupted_cached_file_is_fetched_again(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(3000, seed=8))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.zip").write_bytes(data[:-1] + b"\x00")  # same size, wrong bytes

    got = fetch_dataverse(_params(range_server, ("a.zip",)), cache)

    assert got["a.zip"].read_bytes() == data
    assert [h.range for h in range_server.file_hits("a.zip")] == [None]


def test_complete_part_without_listed_size_is_finished_by_416(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(3000, seed=9))
    range_server.list_sizes = False
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.zip.part").write_bytes(data)  # killed after the last byte, before the rename

    got = fetch_dataverse(_params(range_server, ("a.zip",)), cache)

    assert got["a.zip"].read_bytes() == data
    assert [(h.range, h.status) for h in range_server.file_hits("a.zip")] == [("bytes=3000-", 416)]
    assert _cache_names(cache) == {"a.zip"}


def test_part_longer_than_the_listed_size_starts_again(range_server, tmp_path):
    data = _serve(range_server, "a.zip", _blob(3000, seed=10))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.zip.part").write_bytes(data + b"junk")

    got = fetch_dataverse(_params(range_server, ("a.zip",)), cache)

    assert got["a.zip"].read_bytes() == data
    assert [h.range for h in range_server.file_hits("a.zip")] == [None]


def test_offline_with_a_complete_cache_uses_it(tmp_path):
    cache = tmp_path / "cache"
    with RangeServer(tmp_path / "served") as server:
        data = _serve(server, "a.zip", _blob(2000, seed=11))
        params = _params(server, ("a.zip",))
        fetch_dataverse(params, cache)
    # Same params, server gone (connection refused): the verified cache is enough.
    got = fetch_dataverse(params, cache)
    assert got["a.zip"].read_bytes() == data

    # ...but not when a requested file is missing from it.
    (cache / "a.zip").unlink()
    with pytest.raises(StageError, match=r"^cannot reach http://127\.0\.0\.1:\d+ \(Connection refused\)"):
        fetch_dataverse(params, cache)


def test_name_missing_from_the_listing_is_named(range_server, tmp_path):
    _serve(range_server, "HAM10000_images_part_1.zip", b"x")
    range_server.ingest = {"HAM10000_metadata.csv"}
    _serve(range_server, "HAM10000_metadata.csv", CSV)

    with pytest.raises(StageError) as err:
        fetch_dataverse(_params(range_server, ("HAM10000_images_part_2.zip",)), tmp_path / "c")

    assert str(err.value) == (
        "dataverse: HAM10000_images_part_2.zip not in the dataset's file list; it has: "
        "HAM10000_images_part_1.zip, HAM10000_metadata.tab"
    )


# --------------------------------------------------------------------------- pure parts


def _listing(*data_files: dict) -> dict:
    return {
        "data": {
            "latestVersion": {"files": [{"label": d.get("filename"), "dataFile": d} for d in data_files]}
        }
    }


def test_parse_listing_checksum_types_and_original_names():
    payload = _listing(
        {"id": 1, "filename": "a.zip", "filesize": 10, "checksum": {"type": "SHA-256", "value": "AB"}},
        {
            "id": 2,
            "filename": "m.tab",
            "filesize": 5,
            "md5": "cd",
            "originalFileFormat": "text/csv",
            "originalFileSize": 7,
        },  # fmt: skip
        {"id": 3, "filename": "n.tab", "md5": "ef", "originalFileName": "n.xlsx", "originalFileSize": 9},
    )
    a, m, n = parse_listing(payload, ["a.zip", "m.tab", "n.xlsx"])
    assert (a.hash_name, a.checksum, a.size, a.original, a.save_name) == ("sha256", "ab", 10, False, "a.zip")
    assert (m.hash_name, m.checksum, m.size, m.original, m.save_name) == ("md5", "cd", 7, True, "m.csv")
    assert (n.key, n.file_id, n.save_name, n.size) == ("n.xlsx", 3, "n.xlsx", 9)


@pytest.mark.parametrize("bad", ["../evil.zip", "a/b.zip", "..", "a\\b.zip"])
def test_parse_listing_refuses_path_like_names(bad):
    with pytest.raises(StageError, match=r"file id 7 has an unusable file name"):
        parse_listing(_listing({"id": 7, "filename": "ok.zip", "originalFileName": bad}), ["ok.zip"])


def test_parse_listing_rejects_other_json():
    with pytest.raises(StageError, match=r"unexpected JSON \(no data.latestVersion.files list\)"):
        parse_listing({"status": "ERROR", "message": "x"}, ["a.zip"])


def test_range_helpers():
    assert parse_range("bytes=5-", 10) == (5, 9)
    assert parse_range("bytes=2-4", 10) == (2, 4)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("items=1-2", 10) is None
    assert content_range_start("bytes 4096-9999/10000") == 4096
    assert content_range_start("bytes */10000") is None
    assert to_tab(b'a,"b,c"\r\n1,2\r\n') == b"a\tb,c\n1\t2\n"


def test_a_file_listed_without_checksum_or_size_is_refused_unless_warned(range_server, tmp_path, caplog):
    data = _serve(range_server, "a.zip", _blob(3000))
    range_server.checksums = {"a.zip": ""}  # no usable checksum ...
    range_server.list_sizes = False  # ... and no size: nothing to verify the download against
    refused = r"neither a checksum nor a size for a.zip: refusing .*dataverse.unverified: warn"
    with pytest.raises(StageError, match=refused):
        fetch_dataverse(_params(range_server, ("a.zip",)), tmp_path / "cache")
    assert range_server.file_hits("a.zip") == []  # refused before any download
    got = fetch_dataverse(_params(range_server, ("a.zip",), unverified="warn"), tmp_path / "cache")
    assert got["a.zip"].read_bytes() == data
    assert "a.zip: accepted UNVERIFIED" in caplog.text
    range_server.list_sizes = True  # a size alone is still a check: no refusal
    fetch_dataverse(_params(range_server, ("a.zip",)), tmp_path / "cache2")
