"""A real HTTP server on 127.0.0.1 that plays a tiny Dataverse installation for tests.

It serves every file in ``root`` through the two endpoints the download stage uses:

* ``GET /api/datasets/:persistentId/?persistentId=DOI`` -> the native-API JSON listing
  (``data.latestVersion.files[].dataFile`` with id, filename, filesize, md5 and checksum);
* ``GET /api/access/datafile/ID`` -> the bytes, honouring single ``Range: bytes=a-b`` requests
  (206 + Content-Range, 416 past the end), which Python's ``http.server`` does not do.

A ``.csv`` named in ``ingest`` is listed the way Dataverse lists an ingested table: as ``X.tab``
with ``originalFileName`` ``X.csv`` and the original's checksum; the plain download then serves
a tab-separated rendering and only ``?format=original`` serves the listed bytes.

Knobs (set them between requests): ``cut_after`` / ``cut_first`` drop the connection after K body
bytes on the first N requests of each file, ``stall_s`` waits that long before dropping, ``fail_first``
answers ``fail_status`` to the first N requests of each file (or of the listing, per ``fail_on``),
``ignore_range`` answers 200 with the whole file, ``status_for`` forces a status per file name,
``checksums`` overrides listed md5s, ``list_sizes=False`` omits sizes. ``requests`` records
every request (method, path, query, Range header, status) for assertions.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

TEST_DOI = "doi:10.5072/FK2/TESTHAM"


@dataclass
class Hit:
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    status: int = 0


@dataclass
class _Entry:
    file_id: int
    name: str  # name on disk in root
    listed: str  # filename in the listing (X.tab for an ingested X.csv)
    ingested: bool


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end inclusive) for a satisfiable single range, "unsatisfiable", or None (ignore)."""
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if not m or m.groups() == ("", ""):
        return None  # absent or not a form we support: RFC 9110 says serve the whole file
    a, b = m.groups()
    if a == "":
        n = int(b)
        return (max(0, size - n), size - 1) if n and size else "unsatisfiable"
    start = int(a)
    end = int(b) if b else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, size - 1)


def to_tab(csv_bytes: bytes) -> bytes:
    """Dataverse-style archival rendering of a CSV: tab-separated, LF (different bytes)."""
    rows = csv.reader(io.StringIO(csv_bytes.decode("utf-8-sig")))
    return "".join("\t".join(r) + "\n" for r in rows).encode()


class RangeServer:
    """Start with ``start()`` (or as a context manager); ``url`` is the base URL."""

    def __init__(self, root: Path, *, doi: str = TEST_DOI, ingest: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.doi = doi
        self.ingest = set(ingest)
        self.requests: list[Hit] = []
        self.cut_after: int | None = None
        self.cut_first = 0
        self.stall_s = 0.0
        self.fail_first = 0
        self.fail_status = 503
        self.fail_on = "datafile"  # "datafile" | "listing"
        self.ignore_range = False
        self.status_for: dict[str, int] = {}
        self.checksums: dict[str, str] = {}
        self.list_sizes = True
        self._ids: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RangeServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a stalled handler must not hang the test teardown
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ content

    def entries(self) -> list[_Entry]:
        out = []
        with self._lock:
            for p in sorted(self.root.iterdir()):
                if not p.is_file():
                    continue
                file_id = self._ids.setdefault(p.name, 1001 + len(self._ids))
                ingested = p.name in self.ingest
                listed = f"{p.stem}.tab" if ingested else p.name
                out.append(_Entry(file_id, p.name, listed, ingested))
        return out

    def file_id(self, name: str) -> int:
        """The id of a served file, by its name on disk or its listed name."""
        for e in self.entries():
            if name in (e.name, e.listed):
                return e.file_id
        raise KeyError(name)

    def file_hits(self, name: str) -> list[Hit]:
        path = f"/api/access/datafile/{self.file_id(name)}"
        return [h for h in self.requests if h.path == path]

    def listing(self) -> dict:
        files = []
        for e in self.entries():
            data = (self.root / e.name).read_bytes()
            md5 = self.checksums.get(e.name, hashlib.md5(data).hexdigest())
            df: dict = {
                "id": e.file_id,
                "persistentId": "",
                "filename": e.listed,
                "contentType": "application/zip" if e.name.endswith(".zip") else "application/octet-stream",
                "storageIdentifier": f"file://{e.file_id:x}",
                "rootDataFileId": -1,
                "md5": md5,
                "checksum": {"type": "MD5", "value": md5},
                "creationDate": "2018-06-04",
            }
            if self.list_sizes:
                df["filesize"] = len(data)
            if e.ingested:
                df["contentType"] = "text/tab-separated-values"
                df["originalFileFormat"] = "text/csv"
                df["originalFormatLabel"] = "Comma Separated Values"
                df["originalFileName"] = e.name
                df["UNF"] = "UNF:6:testtesttesttesttesttes=="
                if self.list_sizes:
                    df["filesize"] = len(to_tab(data))
                    df["originalFileSize"] = len(data)
            files.append(
                {"label": e.listed, "restricted": False, "version": 1, "datasetVersionId": 1, "dataFile": df}
            )
        return {
            "status": "OK",
            "data": {
                "id": 1,
                "identifier": self.doi.split("/", 1)[-1],
                "persistentUrl": f"https://doi.org/{self.doi[4:]}",
                "latestVersion": {"id": 1, "versionNumber": 1, "versionState": "RELEASED", "files": files},
            },
        }

    def _count(self, key: str) -> int:
        """How many requests for ``key`` came before this one."""
        with self._lock:
            n = self._counts.get(key, 0)
            self._counts[key] = n + 1
            return n


class _Handler(BaseHTTPRequestHandler):
    owner: RangeServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers; every reply has Content-Length

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _reply(self, hit: Hit, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        hit.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, hit: Hit, status: int, obj: dict) -> None:
        self._reply(hit, status, json.dumps(obj).encode(), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        srv = self.owner
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        hit = Hit(self.command, parts.path, query, self.headers.get("Range"))
        srv.requests.append(hit)

        if parts.path.rstrip("/") == "/api/datasets/:persistentId":
            if srv.fail_on == "listing" and srv._count("listing") < srv.fail_first:
                return self._json(hit, srv.fail_status, {"status": "ERROR", "message": "try later"})
            if query.get("persistentId") != srv.doi:
                msg = f"Dataset with Persistent ID {query.get('persistentId')} not found."
                return self._json(hit, 404, {"status": "ERROR", "message": msg})
            return self._json(hit, 200, srv.listing())

        m = re.fullmatch(r"/api/access/datafile/(\d+)/?", parts.path)
        entry = next((e for e in srv.entries() if m and e.file_id == int(m.group(1))), None)
        if entry is None:
            return self._json(hit, 404, {"status": "ERROR", "message": "File not found"})
        n_before = srv._count(entry.name)
        if entry.name in srv.status_for:
            return self._json(hit, srv.status_for[entry.name], {"status": "ERROR", "message": "forced"})
        if srv.fail_on == "datafile" and n_before < srv.fail_first:
            return self._json(hit, srv.fail_status, {"status": "ERROR", "message": "try later"})

        data = (srv.root / entry.name).read_bytes()
        if entry.ingested and query.get("format") != "original":
            data = to_tab(data)
        size = len(data)
        rng = None if srv.ignore_range else parse_range(hit.range, size)
        if rng == "unsatisfiable":
            return self._reply(hit, 416, b"", "text/plain", {"Content-Range": f"bytes */{size}"})
        ctype = "application/octet-stream"
        headers = {"Accept-Ranges": "none" if srv.ignore_range else "bytes"}
        if rng is None:
            status, body = 200, data
        else:
            start, end = rng
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if srv.cut_after is not None and n_before < srv.cut_first and srv.cut_after < len(body):
            return self._cut(hit, status, body, ctype, headers, srv.cut_after, srv.stall_s)
        self._reply(hit, status, body, ctype, headers)

    def _cut(
        self, hit: Hit, status: int, body: bytes, ctype: str, headers: dict, k: int, stall: float
    ) -> None:
        """Promise the whole body, send ``k`` bytes, then drop the connection (a broken transfer)."""
        hit.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, v in headers.items():
            self.send_header(key, v)
        self.end_headers()
        self.wfile.write(body[:k])
        self.wfile.flush()
        if stall:
            time.sleep(stall)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
