"""The web app as the benchmarks measure it: ``python -m serve.web`` in its own process on 127.0.0.1.

with web_app(bundle, "--decode-workers", "8") as app:
    httpx.post(app.url + "/api/predict", files=...)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WebApp:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen  # the server (its pid: the memory benchmark reads /proc/<pid>/status)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def web_app(bundle: Path, *options: str, start_timeout_s: float = 180.0) -> Iterator[WebApp]:
    """The app serving ``bundle`` (no evaluation plots) with ``options``, once ``/healthz`` answers;
    stopped when the block ends. A server that exits or does not answer in time raises, with the
    end of its stderr."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "serve.web", "--bundle", str(bundle), "--metrics", "/nonexistent",
           "--host", "127.0.0.1", "--port", str(port), *options]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a long run never fills it
        server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    stderr.seek(0)
                    tail = stderr.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"the web app did not start: {tail}")
                time.sleep(0.3)
            yield WebApp(url, server)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
