"""The ``dataverse`` source of the download stage: list, fetch (resumable) and verify files, then
import them (:func:`import_dataverse_files`: the zips extracted safely, read as a ``local:PATH`` folder is).

Harvard Dataverse's native API lists a dataset's files with their ids, sizes and checksums;
the access API serves each file. The HAM10000 zips are 1.3 GB each, so a transfer that breaks
must not start again from zero: bytes go to ``<cache>/<name>.part`` and the next attempt (a
retry within this run, or the next ``dvc repro``) asks for the rest with ``Range: bytes=N-``.
A file counts as downloaded only once its checksum matches the listing; then the ``.part`` is
renamed to its final name, so a name without ``.part`` in the cache always means "verified".

Ingested tabular files (``HAM10000_metadata.tab``) are a special case: Dataverse converts the
uploaded CSV into a ``.tab`` archival copy, but the checksum it lists is that of the uploaded
original, so the original (``?format=original``) is what we fetch, saved under its own name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_file
from skinlesion.params.download import DataverseParams
from skinlesion.sources.local import DownloadResult, import_folder, safe_extract_zip

__all__ = ["RemoteFile", "fetch_dataverse", "import_dataverse_files", "parse_listing", "file_digest"]

log = logging.getLogger(__name__)

# Dataverse checksum type names -> hashlib names.
_HASHES = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}
# Extension for an ingested file whose listing lacks originalFileName.
_FORMAT_EXT = {
    "text/csv": ".csv",
    "text/comma-separated-values": ".csv",
    "text/tab-separated-values": ".tsv",
    "application/x-stata": ".dta",
    "application/x-spss-sav": ".sav",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
}
_LISTING_CACHE = "dataverse-listing.json"
_HASH_BLOCK = 4 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch, as the listing describes it."""

    key: str  # the name asked for in download.dataverse.files
    file_id: int
    save_name: str  # local name; the original's name for ingested tabular files
    size: int | None  # bytes of what we download (the original for ingested files)
    hash_name: str | None  # hashlib name, None when the listing gives no usable checksum
    checksum: str | None
    original: bool  # fetch with ?format=original


class _Transient(Exception):
    """A failure worth retrying (timeout, broken connection, 5xx/429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Unreachable(Exception):
    """The host cannot be resolved or refuses connections: most likely no internet at all."""


# --------------------------------------------------------------------------- pure helpers


def _safe_name(name: Any, file_id: Any) -> str:
    # The name comes from the server and becomes a path in the cache: keep it a plain file name.
    if not isinstance(name, str) or not name or name in (".", "..") or re.search(r"[/\\\x00]", name):
        raise StageError(f"dataverse listing: file id {file_id} has an unusable file name {name!r}")
    return name


def _remote_file(key: str, df: dict[str, Any]) -> RemoteFile:
    file_id = df.get("id")
    if not isinstance(file_id, int):
        raise StageError(f"dataverse listing: {key!r} has no numeric dataFile.id (got {file_id!r})")
    filename = _safe_name(df.get("filename"), file_id)
    original = bool(df.get("originalFileFormat") or df.get("originalFileName"))
    if original:
        orig_name = df.get("originalFileName")
        if not orig_name:
            ext = _FORMAT_EXT.get(str(df.get("originalFileFormat")), ".orig")
            orig_name = Path(filename).stem + ext
        save_name = _safe_name(orig_name, file_id)
        size = df.get("originalFileSize")
    else:
        save_name = filename
        size = df.get("filesize")
    checksum = df.get("checksum") or {}
    ctype, cvalue = checksum.get("type"), checksum.get("value")
    if not cvalue and df.get("md5"):
        ctype, cvalue = "MD5", df["md5"]
    hash_name = _HASHES.get(str(ctype).upper()) if cvalue else None
    if cvalue and hash_name is None:
        log.warning("%s: unsupported checksum type %r; only the size will be checked", key, ctype)
    return RemoteFile(
        key=key,
        file_id=file_id,
        save_name=save_name,
        size=size if isinstance(size, int) and size >= 0 else None,
        hash_name=hash_name,
        checksum=str(cvalue).lower() if hash_name else None,
        original=original,
    )


def check_verifiable(files: list[RemoteFile], policy: str) -> None:
    """A listed file with neither a usable checksum nor a size cannot be verified at all: refuse
    it (``download.dataverse.unverified: refuse``, the default) or say so loudly (``warn``)."""
    blind = [rf.key for rf in files if rf.checksum is None and rf.size is None]
    if not blind:
        return
    msg = f"the Dataverse listing gives neither a checksum nor a size for {', '.join(blind)}"
    if policy == "refuse":
        raise StageError(
            f"download.dataverse: {msg}: refusing files that cannot be verified (set "
            "download.dataverse.unverified: warn to accept them unchecked)"
        )
    log.warning("%s: accepted UNVERIFIED (download.dataverse.unverified: warn)", msg)


def parse_listing(payload: Any, wanted: tuple[str, ...] | list[str]) -> list[RemoteFile]:
    """Pick ``wanted`` out of a native-API dataset JSON (``data.latestVersion.files[]``).

    A name matches the listed ``filename`` (or label); for an ingested file it also matches the
    original's name, so ``HAM10000_metadata.csv`` finds ``HAM10000_metadata.tab``.
    """
    try:
        entries = payload["data"]["latestVersion"]["files"]
        if not isinstance(entries, list):
            raise TypeError
    except (KeyError, TypeError):
        raise StageError("dataverse listing: unexpected JSON (no data.latestVersion.files list)") from None
    by_name: dict[str, dict[str, Any]] = {}
    for entry in entries:
        df = entry.get("dataFile") if isinstance(entry, dict) else None
        if not isinstance(df, dict):
            continue
        for n in (df.get("filename"), entry.get("label"), df.get("originalFileName")):
            if isinstance(n, str) and n:
                by_name.setdefault(n, df)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        listed = sorted({str(e.get("dataFile", {}).get("filename")) for e in entries if isinstance(e, dict)})
        raise StageError(
            f"dataverse: {', '.join(missing)} not in the dataset's file list; it has: "
            f"{', '.join(listed) or '(no files)'}"
        )
    return [_remote_file(n, by_name[n]) for n in wanted]


def content_range_start(header: str | None) -> int | None:
    """First byte of a ``Content-Range: bytes a-b/total`` header, None when absent or malformed."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    return int(m.group(1)) if m else None


def file_digest(path: Path, hash_name: str) -> str:
    h = hashlib.new(hash_name)
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _check(path: Path, rf: RemoteFile) -> str | None:
    """None when ``path`` is the file the listing describes, else the reason it is not."""
    size = path.stat().st_size
    if rf.size is not None and size != rf.size:
        return f"size {size} bytes, expected {rf.size}"
    if rf.hash_name:
        got = file_digest(path, rf.hash_name)
        if got != rf.checksum:
            return f"checksum mismatch for {rf.key}: expected {rf.checksum}, got {got}"
    return None


def _short(e: BaseException) -> str:
    """The innermost useful reason of a requests/urllib3 error, on one line."""
    while True:
        inner = getattr(e, "reason", None)
        if not isinstance(inner, BaseException) and e.args and isinstance(e.args[0], BaseException):
            inner = e.args[0]
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    m = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", text)
    return m.group(1).strip() if m else text.splitlines()[0][:200] if text else type(e).__name__


def _is_unreachable(e: requests.ConnectionError) -> bool:
    # urllib3 wraps DNS failures (NameResolutionError) and refused/unroutable connections in
    # NewConnectionError: the request never reached a server, so retrying will not help.
    from urllib3.exceptions import NewConnectionError

    reason = e.args[0] if e.args else None
    return isinstance(getattr(reason, "reason", reason), NewConnectionError)


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


# --------------------------------------------------------------------------- HTTP


def _with_retries(what: str, params: DataverseParams, attempt_fn, *, on_give_up=lambda: "") -> Any:
    """Call ``attempt_fn()`` until it stops raising _Transient, at most ``1 + retries`` times.

    Backoff doubles from ``backoff_s`` without jitter so runs (and tests) are deterministic;
    a server's ``Retry-After`` lengthens the wait, capped so a bad header cannot stall us.
    """
    attempt = 0
    while True:
        try:
            return attempt_fn()
        except _Transient as e:
            if attempt >= params.retries:
                raise StageError(
                    f"{what}: {e} (gave up after {attempt + 1} attempt(s)){on_give_up()}"
                ) from None
            delay = params.backoff_s * 2**attempt
            if e.retry_after is not None:
                delay = max(delay, min(e.retry_after, 300.0))
            log.warning("%s: %s; retry %d/%d in %.1f s", what, e, attempt + 1, params.retries, delay)
            time.sleep(delay)
            attempt += 1


def _get_listing(session: requests.Session, params: DataverseParams, base: str) -> Any:
    url = f"{base}/api/datasets/:persistentId/"
    first = True

    def attempt() -> Any:
        nonlocal first
        was_first, first = first, False
        try:
            resp = session.get(url, params={"persistentId": params.doi}, timeout=params.timeout_s)
        except requests.ConnectionError as e:
            if was_first and _is_unreachable(e):
                raise _Unreachable(_short(e)) from None
            raise _Transient(f"connection failed ({_short(e)})") from None
        except requests.Timeout as e:
            raise _Transient(f"timed out ({_short(e)})") from None
        with resp:
            if resp.status_code == 429 or resp.status_code >= 500:
                raise _Transient(f"HTTP {resp.status_code}", _retry_after(resp))
            if resp.status_code == 404:
                raise StageError(f"dataverse: dataset {params.doi} not found (HTTP 404 from {resp.url})")
            if resp.status_code != 200:
                raise StageError(f"dataverse: HTTP {resp.status_code} {resp.reason} from {resp.url}")
            try:
                return resp.json()
            except ValueError:
                raise StageError(f"dataverse: {resp.url} did not return JSON") from None

    return _with_retries(f"listing {params.doi} at {base}", params, attempt)


def _transfer(
    session: requests.Session,
    url: str,
    query: dict[str, str],
    part: Path,
    rf: RemoteFile,
    params: DataverseParams,
) -> None:
    """One attempt: bring ``part`` as far as the server lets us. Raises _Transient to retry."""
    offset = part.stat().st_size if part.exists() else 0
    if rf.size is not None and offset > rf.size:
        log.warning("%s: partial file is larger than the listed size; starting again", part)
        part.unlink()
        offset = 0
    if rf.size is not None and offset == rf.size and offset > 0:
        return  # complete from an earlier attempt; the caller verifies it
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if offset:
        log.info("resuming %s from byte %d of %s", rf.key, offset, rf.size if rf.size is not None else "?")
    try:
        resp = session.get(url, params=query, headers=headers, stream=True, timeout=params.timeout_s)
    except requests.ConnectionError as e:
        raise _Transient(f"connection failed ({_short(e)})") from None
    except requests.Timeout as e:
        raise _Transient(f"timed out ({_short(e)})") from None
    with resp:
        status = resp.status_code
        if status == 416:
            # Nothing left to send from `offset`: the part is complete (or longer than the
            # file, which the checksum then rejects). Verification decides.
            if offset == 0:
                raise StageError(f"dataverse: HTTP 416 for {resp.url} without a Range request")
            return
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}", _retry_after(resp))
        if status >= 400:
            raise StageError(f"dataverse: HTTP {status} {resp.reason} for {resp.url}")
        if status == 206:
            start = content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                # A server answering a different range than asked: trust nothing on disk.
                part.unlink(missing_ok=True)
                raise _Transient(f"server sent range starting at {start}, asked for {offset}")
            mode = "ab"
        elif status == 200:
            if offset:
                log.info("%s: server ignored the Range request; downloading from byte 0", rf.key)
            offset, mode = 0, "wb"
        else:
            raise StageError(f"dataverse: unexpected HTTP {status} for {resp.url}")
        total = rf.size
        if total is None and resp.headers.get("Content-Length", "").isdigit():
            total = offset + int(resp.headers["Content-Length"])
        written = 0
        with (
            open(part, mode) as fh,
            tqdm(
                total=total, initial=offset, desc=rf.save_name, unit="B", unit_scale=True,
                unit_divisor=1024, mininterval=0.5, leave=False,
            ) as bar,
        ):  # fmt: skip
            while True:
                # read1 on the raw stream, not iter_content: when the connection breaks, urllib3
                # drops the bytes iter_content had buffered but not yielded, and the resume
                # would then start before the true end of the part. read1 hands over every byte
                # received; decode_content=False keeps offsets in the file's own bytes.
                try:
                    chunk = resp.raw.read1(params.chunk_bytes, decode_content=False)
                except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                    raise _Transient(f"transfer broke at byte {offset + written} ({_short(e)})") from None
                if not chunk:
                    break
                try:
                    fh.write(chunk)
                except OSError as e:
                    raise StageError(f"cannot write {part}: {e.strerror or e}") from None
                written += len(chunk)
                bar.update(len(chunk))
    if rf.size is not None and offset + written < rf.size:
        raise _Transient(f"transfer ended early at byte {offset + written} of {rf.size}")


def _fetch_one(
    session: requests.Session, base: str, rf: RemoteFile, cache_dir: Path, params: DataverseParams
) -> Path:
    final = cache_dir / rf.save_name
    if final.is_file():
        problem = _check(final, rf)
        if problem is None:
            log.info("%s: already in the cache, verified", rf.key)
            return final
        log.warning("%s: cached copy is not the listed file (%s); downloading again", rf.key, problem)
        final.unlink()
    part = cache_dir / f"{rf.save_name}.part"
    url = f"{base}/api/access/datafile/{rf.file_id}"
    query = {"format": "original"} if rf.original else {}
    log.info(
        "downloading %s (%s) from %s",
        rf.key, f"{rf.size / 1e6:.1f} MB" if rf.size is not None else "size unknown", url,
    )  # fmt: skip
    _with_retries(
        f"downloading {rf.key}",
        params,
        lambda: _transfer(session, url, query, part, rf, params),
        on_give_up=lambda: (
            f"; {part} is kept and the next run resumes from it"
            if part.exists() and part.stat().st_size
            else ""
        ),
    )
    problem = _check(part, rf)
    if problem is not None:
        # Delete rather than keep: a wrong file must not be resumed or mistaken for complete.
        part.unlink(missing_ok=True)
        raise StageError(problem if problem.startswith("checksum") else f"{rf.key}: downloaded {problem}")
    os.replace(part, final)
    return final


# --------------------------------------------------------------------------- entry point


def _offline_message(base: str, reason: str) -> str:
    return (
        f"cannot reach {base} ({reason}): no internet access? Set download.source to "
        "local:PATH (a HAM10000 folder or zip) or synthetic"
    )


def _cached_listing(cache_dir: Path, base: str, doi: str) -> Any | None:
    try:
        saved = json.loads((cache_dir / _LISTING_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(saved, dict) and saved.get("base_url") == base and saved.get("doi") == doi:
        return saved.get("payload")
    return None


def fetch_dataverse(params: DataverseParams, cache_dir: Path) -> dict[str, Path]:
    """Fetch ``params.files`` of dataset ``params.doi`` into ``cache_dir``; verified paths by name.

    ``cache_dir`` persists between runs: verified files are not fetched again and partial ones
    resume. Offline, a cache that already holds every verified file is used as it is.
    """
    base = params.base_url.rstrip("/")
    if urlsplit(base).scheme not in ("http", "https"):
        raise StageError(f"download.dataverse.base_url: expected an http(s) URL, got {params.base_url!r}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with requests.Session() as session:
        # identity: byte offsets for Range must count the file's bytes, not gzip's.
        session.headers.update(
            {"User-Agent": "skinlesion-mlops (HAM10000 download stage)", "Accept-Encoding": "identity"}
        )
        try:
            payload = _get_listing(session, params, base)
        except _Unreachable as e:
            cached = _cached_listing(cache_dir, base, params.doi)
            if cached is not None:
                files = parse_listing(cached, params.files)
                paths = {rf.key: cache_dir / rf.save_name for rf in files}
                if all(
                    p.is_file() and _check(p, rf) is None for rf, p in zip(files, paths.values(), strict=True)
                ):
                    log.warning(
                        "%s unreachable (%s); using the verified files already in %s", base, e, cache_dir
                    )
                    return paths
            raise StageError(_offline_message(base, str(e))) from None
        files = parse_listing(payload, params.files)
        check_verifiable(files, params.unverified)
        with atomic_file(cache_dir / _LISTING_CACHE, "w", encoding="utf-8") as fh:
            json.dump({"base_url": base, "doi": params.doi, "payload": payload}, fh)
        log.info(
            "%s lists %d file(s); fetching %s",
            params.doi,
            len(payload["data"]["latestVersion"]["files"]),
            ", ".join(params.files),
        )
        return {rf.key: _fetch_one(session, base, rf, cache_dir, params) for rf in files}


def import_dataverse_files(files: dict[str, Path], out_dir: Path, *, scratch: Path) -> DownloadResult:
    """Turn the verified Dataverse files (zips + metadata table) into ``out_dir``."""
    staging = Path(tempfile.mkdtemp(prefix="dataverse-", dir=scratch))
    try:
        for name, path in files.items():
            if zipfile.is_zipfile(path):
                safe_extract_zip(path, staging / Path(name).stem)
            else:
                shutil.copyfile(path, staging / path.name)
        try:
            return import_folder(staging, out_dir, move=True)
        except StageError as e:  # name what was downloaded, not our scratch folder
            raise StageError(
                f"{str(e).replace(str(staging), 'the Dataverse files')} (downloaded: {sorted(files)})"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
