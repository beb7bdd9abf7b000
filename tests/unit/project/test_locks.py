"""The two pinned sets: requirements-gpu.lock is requirements.lock with the CUDA build of the same
TensorFlow (and its nvidia-* wheels), and `make setup GPU=1` installs it, remembered by its stamp."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# The packages the two locks may differ in: the TensorFlow build and the CUDA libraries it brings.
TF_CUDA = re.compile(r"^(tensorflow|tensorflow-cpu|nvidia-.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a lock by canonical name; anything else but comments fails."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        assert m, f"{path.name}:{n}: not a name==version pin: {line!r}"
        assert _canonical(m[1]) not in out, f"{path.name}:{n}: {m[1]} pinned twice"
        out[_canonical(m[1])] = m[2]
    return out


def test_the_gpu_lock_is_the_cpu_lock_with_the_cuda_build_of_the_same_tensorflow():
    cpu, gpu = pins(REPO / "requirements.lock"), pins(REPO / "requirements-gpu.lock")
    assert set(cpu) - set(gpu) == {"tensorflow-cpu"}
    assert gpu["tensorflow"] == cpu["tensorflow-cpu"]  # same TensorFlow version, the CUDA build
    added = set(gpu) - set(cpu) - {"tensorflow"}
    assert added and all(n.startswith("nvidia-") for n in added), sorted(added)
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= added  # what TensorFlow's GPU kernels load
    differ = {n: (cpu[n], gpu[n]) for n in set(cpu) & set(gpu) if cpu[n] != gpu[n] and not TF_CUDA.match(n)}
    assert differ == {}, f"pinned differently in the two locks (run `make lock-gpu`): {differ}"


def test_requirements_in_pins_the_tensorflow_both_locks_hold():
    line = next(
        ln for ln in (REPO / "requirements.in").read_text().splitlines() if ln.startswith("tensorflow")
    )
    assert line.split("==")[1].split()[0] == pins(REPO / "requirements.lock")["tensorflow-cpu"]


@pytest.fixture
def project(tmp_path) -> Path:
    """The Makefile and what its setup target reads, in a folder of its own (no venv yet)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "requirements.lock", "requirements-gpu.lock", "pyproject.toml"):
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


def _dry(project: Path, *args: str) -> subprocess.CompletedProcess:
    """``make -n``: the commands make would run, none run (the venv's stamp decides what is due)."""
    return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=project, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_make_setup_gpu_installs_the_gpu_lock_and_later_commands_keep_it(project):
    gpu = _dry(project, ".venv/.installed-gpu", "GPU=1")
    assert gpu.returncode == 0, gpu.stderr
    assert "pip install --quiet -r requirements-gpu.lock" in gpu.stdout
    assert "touch .venv/.installed-gpu" in gpu.stdout
    assert "-r requirements.lock" not in gpu.stdout

    cpu = _dry(project, "setup")  # no venv: the CPU build, as before
    assert (
        "pip install --quiet -r requirements.lock" in cpu.stdout and "touch .venv/.installed\n" in cpu.stdout
    )

    (project / ".venv").mkdir()
    (project / ".venv" / ".installed-gpu").touch()  # a venv set up with GPU=1
    kept = _dry(project, "setup")
    assert kept.returncode == 0, kept.stderr
    assert "pip install" not in kept.stdout  # nothing to do: the GPU build is remembered
    back = _dry(project, "setup", "GPU=0")  # switching back reinstalls from the CPU lock
    assert (
        "pip install --quiet -r requirements.lock" in back.stdout
        and "touch .venv/.installed\n" in back.stdout
    )


def test_a_bad_gpu_value_is_refused_naming_it(project):
    bad = _dry(project, "setup", "GPU=yes")
    assert bad.returncode != 0
    assert "GPU=yes: use GPU=1 (CUDA build of TensorFlow) or GPU=0 (CPU build)" in bad.stderr
