"""Shared fixtures. Tests need no network and no GPU; real-data tests skip when it is absent."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion.core.schema import HAM_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SHARED_HAM = Path(os.environ.get("HAM10000_DIR", REPO.parent / "shared" / "data" / "ham10000"))

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def shared_ham() -> Path:
    """The real HAM10000 copy in ../shared (read-only); skips the test when it is absent."""
    if not (SHARED_HAM / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 data not found at {SHARED_HAM}")
    return SHARED_HAM


def make_jpeg(path: Path, *, size=(64, 48), seed: int = 0, color=None, mode: str = "RGB") -> Path:
    """Write a real JPEG: smooth noise (or a flat colour) of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if color is None:
        small = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    else:
        img = Image.new("RGB", (w, h), color)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)
    return path


def write_raw(root: Path, rows: list[dict], *, size=(64, 48)) -> Path:
    """Write a ``data/raw``-shaped folder: metadata.csv (HAM columns) + images/<image_id>.jpg."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HAM_COLUMNS, lineterminator="\n")
        w.writeheader()
        for i, r in enumerate(rows):
            full = {"dx_type": "histo", "age": "50", "sex": "male", "localization": "back", **r}
            w.writerow({k: full[k] for k in HAM_COLUMNS})
            make_jpeg(root / "images" / f"{r['image_id']}.jpg", size=size, seed=i)
    return root


# --------------------------------------------------------------------------- e2e: a repo copy

_NOT_COPIED = ("data/", "models/", "metrics/", "reports/", "dvc.lock", ".dvc/cache", ".dvc/tmp")


def copy_project_files(dest: Path) -> Path:
    """Copy the project's files as git sees them (tracked and untracked, not ignored) into
    ``dest``, without data, models, metrics, reports or dvc.lock: what a fresh clone holds."""
    import shutil
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in files:
        if not rel or rel.startswith(_NOT_COPIED) or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def run_cmd(args: list[str], cwd: Path, *, check: bool = True, timeout: float = 1800, env=None):
    """Run a real command with the venv's bin first on PATH (dvc stages call `python -m ...`)."""
    import subprocess
    import sys

    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    full_env.update(env or {})
    proc = subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A fresh git + DVC repository holding the project's files (no data, no cache, no lock),
    as a user's clone would, so e2e tests run the real `dvc` commands without touching ours."""
    dest = copy_project_files(tmp_path / "repo")
    for args in (
        ["git", "init", "-q"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        run_cmd(args, dest)
    return dest


@pytest.fixture
def range_server(tmp_path: Path):
    """A fake Dataverse on 127.0.0.1 (tests/range_server.py) serving the files put in ``.root``."""
    from tests.range_server import RangeServer

    with RangeServer(tmp_path / "served") as server:
        yield server


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (its own SQLite database) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
