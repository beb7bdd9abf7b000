"""`make setup GPU=1` for real: the GPU lock resolves against the package index as pinned, switching
a venv between the two builds removes the other's packages, and (heavy: GBs of CUDA wheels) the
GPU lock installs in a scratch venv, where the GPU profile's refusal names the CUDA build."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    return {
        _canonical(n): v
        for n, v in (ln.split("==") for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))
    }


def _pip(python: str | Path, *args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=timeout, **kw
    )


@pytest.fixture(scope="module")
def index_reachable() -> None:
    """The package index pip is configured with answers for TensorFlow's CUDA build; else skip."""
    probe = _pip(sys.executable, "index", "versions", "tensorflow", timeout=120)
    if probe.returncode != 0 or "2." not in probe.stdout:
        pytest.skip(f"the package index is not reachable from here: {probe.stderr.strip()[-300:]}")


def test_the_gpu_lock_resolves_to_exactly_its_pins(index_reachable, tmp_path):
    """pip resolves requirements-gpu.lock (metadata only, nothing installed) to the lock's own set:
    no conflict, no missing dependency, no other version."""
    t0 = time.perf_counter()
    report = tmp_path / "report.json"
    lock_file = str(REPO / "requirements-gpu.lock")
    proc = _pip(
        sys.executable,
        "install",
        "--dry-run",
        "--ignore-installed",
        "-q",
        "--report",
        str(report),
        "-r",
        lock_file,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {
        _canonical(p["metadata"]["name"]): p["metadata"]["version"]
        for p in json.loads(report.read_text())["install"]
    }
    lock = _pins(REPO / "requirements-gpu.lock")
    # pip freeze leaves pip, setuptools and wheel out of a lock; pip may still bring them.
    assert {n: v for n, v in resolved.items() if n not in ("pip", "setuptools", "wheel")} == lock
    print(f"requirements-gpu.lock: {len(lock)} pins resolved in {time.perf_counter() - t0:.0f} s")


def test_switching_a_venv_between_the_builds_removes_the_other_builds_packages(index_reachable, tmp_path):
    """The Makefile's real recipe on two stand-in locks: ``typing_extensions`` plays tensorflow-cpu
    (only in the CPU lock, spelt with an underscore as pip freeze spells tensorflow_cpu), ``idna``
    plays the CUDA wheels (only in the GPU lock); ``six`` is pinned in both."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cpu = _pins(REPO / "requirements.lock")
    (tmp_path / "requirements.lock").write_text(
        f"six=={cpu['six']}\ntyping_extensions=={cpu['typing-extensions']}\n"
    )
    (tmp_path / "requirements-gpu.lock").write_text(f"idna=={cpu['idna']}\nsix=={cpu['six']}\n")
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "switch-probe"
        version = "0"
        [tool.setuptools]
        packages = []
    """)
    )
    shutil.copy2(REPO / "Makefile", tmp_path / "Makefile")
    venv = tmp_path / ".venv"

    def make(*args: str) -> str:
        cmd = ["make", "--no-print-directory", f"PYTHON={sys.executable}", *args]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    def installed() -> set[str]:
        freeze = _pip(venv / "bin" / "python", "freeze").stdout.splitlines()
        return {_canonical(ln.split("==")[0]) for ln in freeze if "==" in ln}

    def stamps() -> set[str]:
        return {p.name for p in venv.glob(".installed*")}

    make(".venv/.installed")  # a plain `make setup`
    assert {"six", "typing-extensions"} <= installed() and "idna" not in installed()
    assert stamps() == {".installed"}

    out = make(".venv/.installed-gpu", "GPU=1")  # `make setup GPU=1`
    assert "removing the other build's packages: typing-extensions" in out
    assert {"six", "idna"} <= installed() and "typing-extensions" not in installed()
    assert stamps() == {".installed-gpu"}

    assert "pip" not in make(".venv/.installed-gpu")  # later commands keep the GPU build: nothing to do

    make(".venv/.installed", "GPU=0")  # and back
    assert {"six", "typing-extensions"} <= installed() and "idna" not in installed()
    assert stamps() == {".installed"}


@pytest.fixture
def scratch_venv(tmp_path):
    """A venv folder deleted after the test: it grows to 8 GB, which pytest would keep in its temp."""
    yield tmp_path / "venv"
    shutil.rmtree(tmp_path / "venv", ignore_errors=True)


@pytest.mark.heavy
def test_the_gpu_lock_installs_in_a_scratch_venv_and_the_refusal_names_the_cuda_build(
    index_reachable, scratch_venv, tmp_path
):
    """A full install of requirements-gpu.lock (about 4 GB downloaded into pip's cache the first
    time); then the venv holds exactly the lock, TensorFlow is the CUDA build, and train.device: gpu
    with the GPUs hidden stops with the CUDA build's line (check the driver), not the CPU build's."""
    t0 = time.perf_counter()
    venv = scratch_venv
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    proc = _pip(python, "install", "--quiet", "-r", str(REPO / "requirements-gpu.lock"), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = time.perf_counter() - t0
    freeze = _pip(python, "freeze").stdout.splitlines()
    assert {_canonical(n): v for n, v in (ln.split("==") for ln in freeze if "==" in ln)} == _pins(
        REPO / "requirements-gpu.lock"
    )
    check = _pip(python, "check")
    assert check.returncode == 0, check.stdout
    probe = textwrap.dedent("""
        import tensorflow as tf
        from skinlesion.core.errors import StageError
        from skinlesion.model.distribute import visible_gpus
        assert tf.test.is_built_with_cuda()
        try:
            visible_gpus("gpu")
        except StageError as e:
            print(e)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    line = run.stdout.strip().splitlines()[-1]
    assert (
        line.startswith("train.device: gpu, but TensorFlow ") and "the installed build, tensorflow " in line
    )
    assert "has CUDA but finds no device" in line and "CUDA_VISIBLE_DEVICES=''" in line, line
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 1e9
    print(f"requirements-gpu.lock installed in {seconds:.0f} s; the venv holds {size:.1f} GB")
