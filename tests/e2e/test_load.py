"""Load on loopback: the prediction web app (``python -m serve.web``) and the Prefect API
(``prefect server start``) each take 200 requests from 20 concurrent clients with no error, and
their memory stays flat: the resident set of the server's process tree, sampled after a warm-up
and after the 200, grows by less than ``RSS_GROWTH_MB``.

The bundle is the unit tests' small untrained one (tests/builders/bundles.make_bundle): memory and
errors under concurrency do not depend on what the weights are. Batch prediction over 10,000 images is a
benchmark, not a test (bench/bench_batch_memory.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import Background, free_port, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[2]
N_REQUESTS, CLIENTS, WARMUP = 200, 20, 40
# A leak of one uploaded 200x150 image (~90 kB decoded) per request would add ~18 MB over 200;
# one Grad-CAM overlay per request much more. Allocator noise after the warm-up stays well below.
RSS_GROWTH_MB = 40.0


def _tree_rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(19, 25, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small, "RGB").resize((200, 150), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _hammer(n: int, clients: int, one) -> tuple[list[str], list[float]]:
    """``n`` calls of ``one(client, i)`` from ``clients`` threads, each a client with its own
    connection (kept alive between its requests, as a browser or a batch script does); returns
    the errors (one line each) and the latencies."""
    errors: list[str] = []
    latencies: list[float] = []

    def client_loop(k: int) -> None:
        with httpx.Client(timeout=300) as client:
            for i in range(k, n, clients):
                t0 = time.perf_counter()
                try:
                    problem = one(client, i)
                except httpx.HTTPError as e:
                    problem = f"{type(e).__name__}: {e}"
                latencies.append(time.perf_counter() - t0)
                if problem:
                    errors.append(f"request {i}: {problem}")

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client_loop, range(clients)))
    return errors, latencies


def _report(name: str, before: float, after: float, latencies: list[float], seconds: float) -> str:
    lat = np.asarray(latencies)
    return (
        f"{name}: {len(lat)} requests, {CLIENTS} clients, {seconds:.1f} s; latency p50 "
        f"{np.percentile(lat, 50):.2f} s, p95 {np.percentile(lat, 95):.2f} s; RSS {before:.0f} -> "
        f"{after:.0f} MB ({after - before:+.1f} MB)"
    )


def test_web_app_takes_200_requests_from_20_clients_with_flat_memory(tmp_path):
    from tests.builders.bundles import make_bundle

    bundle = make_bundle(tmp_path / "bundle")
    port = free_port()
    app = Background(
        "web",
        [sys.executable, "-m", "serve.web", "--bundle", str(bundle), "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, logs=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    images = [_jpeg(i) for i in range(N_REQUESTS + WARMUP)]

    def one(client: httpx.Client, i: int) -> str | None:
        name = f"lesion_{i:04d}.jpg"
        if i % 10 == 5:  # the page, with Grad-CAM overlays, as a browser posts it
            r = client.post(f"{url}/predict", files={"files": (name, images[i], "image/jpeg")})
            ok = r.status_code == 200 and f'data-image="{name}"' in r.text
        elif i % 10 == 9:
            r = client.get(f"{url}/healthz")
            ok = r.status_code == 200 and r.json()["status"] == "ok"
        else:  # the JSON API, with the overlay every fourth time
            explain = "true" if i % 4 == 0 else "false"
            r = client.post(
                f"{url}/api/predict?explain={explain}", files={"files": (name, images[i], "image/jpeg")}
            )
            ok = r.status_code == 200 and r.json()["results"][0]["image"] == name
        return None if ok else f"HTTP {r.status_code}: {r.text[:200]}"

    try:
        wait_healthy(f"{url}/healthz", app, 180, "the web app did not come up")
        errors, _ = _hammer(WARMUP, CLIENTS, lambda c, i: one(c, N_REQUESTS + i))
        assert not errors, errors[:5]
        before = _tree_rss_mb(app.proc.pid)
        t0 = time.perf_counter()
        errors, latencies = _hammer(N_REQUESTS, CLIENTS, one)
        seconds = time.perf_counter() - t0
        after = _tree_rss_mb(app.proc.pid)
        print(_report("web app", before, after, latencies, seconds))
        assert not errors, f"{len(errors)} failed: {errors[:5]}\n{app.tail()}"
        assert after - before < RSS_GROWTH_MB, f"RSS grew {after - before:.1f} MB over {N_REQUESTS} requests"
        assert app.proc.poll() is None, app.tail()
    finally:
        app.stop()


def _send(client: httpx.Client, method: str, url: str, retried: list[int], **kw) -> httpx.Response:
    """One API call, retried on 503 after its Retry-After as Prefect's own client does (SQLite
    answers 503 when its one writer is busy for too long)."""
    for _attempt in range(5):
        r = client.request(method, url, **kw)
        if r.status_code != 503:
            return r
        retried.append(1)
        time.sleep(float(r.headers.get("Retry-After", "1")))
    return r


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_prefect_api_takes_200_requests_from_20_clients_with_flat_memory(request, database):
    fixture = "prefect_server" if database == "sqlite" else "prefect_server_postgres"
    env, server = request.getfixturevalue(fixture)
    api = env["PREFECT_API_URL"]
    flow = httpx.post(f"{api}/flows/", json={"name": "load-test"}, timeout=60)
    flow.raise_for_status()
    flow_id = flow.json()["id"]
    retried: list[int] = []

    def one(client: httpx.Client, i: int) -> str | None:
        # what workers, the UI and `prefect flow-run ls` do most: create runs, list and read them
        kind = i % 4
        if kind == 0:
            body = {"flow_id": flow_id, "name": f"load-{i}"}
            r = _send(client, "POST", f"{api}/flow_runs/", retried, json=body)
            ok = r.status_code == 201
        elif kind == 1:
            body = {"limit": 20, "sort": "START_TIME_DESC"}
            r = _send(client, "POST", f"{api}/flow_runs/filter", retried, json=body)
            ok = r.status_code == 200 and isinstance(r.json(), list)
        elif kind == 2:
            r = _send(client, "POST", f"{api}/work_pools/filter", retried, json={})
            ok = r.status_code == 200
        else:
            r = _send(client, "GET", f"{api}/health", retried)
            ok = r.status_code == 200
        return None if ok else f"HTTP {r.status_code}: {r.text[:200]}"

    errors, _ = _hammer(WARMUP, CLIENTS, one)
    assert not errors, errors[:5]
    before = _tree_rss_mb(server.proc.pid)
    t0 = time.perf_counter()
    errors, latencies = _hammer(N_REQUESTS, CLIENTS, one)
    seconds = time.perf_counter() - t0
    after = _tree_rss_mb(server.proc.pid)
    print(
        _report(f"prefect API ({database})", before, after, latencies, seconds)
        + f"; 503s retried: {len(retried)}"
    )
    assert not errors, f"{len(errors)} failed: {errors[:5]}\n{server.tail()}"
    if database == "postgresql":  # no single-writer lock: nothing to retry
        assert not retried, f"{len(retried)} answers 503 on PostgreSQL"
    runs = httpx.post(f"{api}/flow_runs/count", json={}, timeout=60).json()
    assert runs == (N_REQUESTS + WARMUP) // 4
    assert after - before < RSS_GROWTH_MB, f"RSS grew {after - before:.1f} MB over {N_REQUESTS} requests"
