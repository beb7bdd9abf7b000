"""Platform-exact data: the same params and seed give the same bytes on every x86 CPU.

numpy picks its SIMD kernels (sin, exp, power, arctan2, complex multiply ...) at run time by CPU,
and their last bits differ between AVX-512, AVX2 + FMA and the x86-64 baseline (SSE, no FMA);
libjpeg-turbo inside Pillow picks AVX2, SSE2 or plain C code. NPY_DISABLE_CPU_FEATURES and
JSIMD_FORCESSE2 / JSIMD_FORCENONE make this machine run the kernels another CPU would, so a
subprocess under them is "another machine" (each first shows, from numpy's own dispatch report,
that its kernels really changed). The generator drew 10 of the demo's 700 JPEGs differently
without AVX-512 before it was made exact (issue 20); these tests keep it, split and prepare exact.
"""

from __future__ import annotations

import ast
import hashlib
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

from skinlesion.params.load import parse_params
from skinlesion.sources.synthetic import generate
from tests.conftest import REPO, run_cmd

X86 = platform.machine().lower() in {"x86_64", "amd64"}
# Another CPU, as numpy 2.4's dispatch groups and libjpeg-turbo's switches name it. "cap" = the
# highest numpy kernel the variant may still run (checked on numpy's sin, float32).
CPUS = {
    "no AVX-512 (AVX2 + FMA)": ({"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}, "X86_V3"),
    "x86-64 baseline (SSE, no FMA)": (
        {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR", "JSIMD_FORCESSE2": "1"},
        "baseline",
    ),
    "libjpeg-turbo without SIMD": ({"JSIMD_FORCENONE": "1"}, None),
}
needs_x86 = pytest.mark.skipif(not X86, reason="the CPU-feature switches are x86's")

# The golden set: 24 images at the demo's size, seed 2. Seed 2 because the generator before the
# fix drew both profiles' sets differently without AVX-512 on an AVX-512 machine (checked).
SET = {"n_images": 24, "width": 200, "height": 150}
SEED = 2
PROFILES = ("default", "clinic_b")
# md5 over (relative path, size, bytes) of every file (images and metadata.csv), see tree_md5.
GOLDEN = {
    "default": "004bb96cb9e0f259c587eae68fc0952c",
    "clinic_b": "d319bc57db3f970d778770ab832b652f",
}


def tree_md5(root: Path) -> str:
    h = hashlib.md5()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            h.update(f"{p.relative_to(root).as_posix()}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def tree_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _differing(a: Path, b: Path) -> list[str]:
    fa, fb = tree_files(a), tree_files(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _kernel(env: dict[str, str]) -> str:
    """The numpy kernel that sin (float32) runs under ``env``, by numpy's own dispatch report."""
    probe = "import numpy as np; print(np.lib.introspect.opt_func_info('^sin$')['sin']['ff']['current'])"
    return run_cmd([sys.executable, "-c", probe], REPO, env=env, timeout=120).stdout.strip()


@pytest.fixture(scope="module")
def kernels() -> dict[str, str]:
    """Per CPU variant, the numpy kernel it runs; fails if a switch did not take (the test would
    then compare this CPU with itself and prove nothing)."""
    found = {"this CPU": _kernel({})} if X86 else {}
    for name, (env, cap) in CPUS.items():
        if not X86 or cap is None:
            continue
        got = found[name] = _kernel(env)
        allowed = (
            got.startswith("baseline") if cap == "baseline" else not got.startswith(("X86_V4", "AVX512"))
        )
        assert allowed, (
            f"{name}: {env} left numpy on its {got} kernels (this CPU: {found['this CPU']}); numpy's "
            "dispatch names changed? see np.lib.introspect.opt_func_info and fix CPUS in this file"
        )
    return found


# --------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict[str, Path]:
    """The golden set of each profile, drawn in this process with this CPU's own kernels."""
    out = {}
    for profile in PROFILES:
        root = out[profile] = tmp_path_factory.mktemp(f"golden-{profile}")
        params = parse_params({"download": {"synthetic": {**SET, "profile": profile}}}).download.synthetic
        generate(params, SEED, root, workers=1)
    return out


@pytest.mark.parametrize("profile", PROFILES)
def test_generated_bytes_match_the_committed_md5(drawn, profile):
    got = tree_md5(drawn[profile])
    assert got == GOLDEN[profile], (
        f"synthetic set ({profile}, {SET}, seed {SEED}) has md5 {got}, committed {GOLDEN[profile]}. "
        "If you changed the generator (skinlesion/sources/synthetic*.py, exactmath.py) or its pinned "
        "libraries on purpose, set GOLDEN here "
        "to the new value (and expect data/raw's md5 in dvc.lock to change). If not, this CPU "
        "draws other bits than the one that committed it: find the op whose result depends on the "
        "CPU (test_another_cpu_draws_the_same_bytes narrows it down on an x86 machine)."
    )


@needs_x86
@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_another_cpu_draws_the_same_bytes(drawn, kernels, tmp_path, cpu):
    env, _ = CPUS[cpu]
    for profile in PROFILES:
        out = tmp_path / profile
        run_cmd(
            [sys.executable, "-m", "skinlesion.sources.synthetic", "--out", str(out),
             "--n-images", str(SET["n_images"]), "--width", str(SET["width"]), "--height", str(SET["height"]),
             "--seed", str(SEED), "--profile", profile, "--workers", "1"],
            REPO, env=env, timeout=300,
        )  # fmt: skip
        differ = _differing(drawn[profile], out)
        assert not differ, (
            f"{cpu} ({env}, numpy kernels {kernels.get(cpu, 'as this CPU')} vs {kernels.get('this CPU')}): "
            f"the {profile} set drew {len(differ)} file(s) differently, e.g. {differ[:5]}. An op in "
            "skinlesion/sources/synthetic*.py depends on the CPU: a numpy transcendental (sin, exp, power, "
            "arctan2, hypot), a float ** or math.* call, a BLAS product. Use the exact functions of "
            "skinlesion/sources/exactmath.py."
        )


# --------------------------------------------------------------------------- split and prepare

PIPE_SET = {"n_images": 120, "width": 96, "height": 72}
PIPE_PARAMS = "base: {seed: 5}\nsplit: {workers: 1}\nprepare: {workers: 1, image_size: 32}\n"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    generate(parse_params({"download": {"synthetic": PIPE_SET}}).download.synthetic, SEED, root, workers=1)
    return root


def _split_and_prepare(raw: Path, work: Path, env: dict[str, str]) -> Path:
    """dvc.yaml's split and prepare commands on ``raw`` under ``env``; returns the outputs' folder."""
    work.mkdir()
    (work / "params.yaml").write_text(PIPE_PARAMS)
    out = work / "out"
    run_cmd([sys.executable, "-m", "stages.split", "--params", "params.yaml", "--raw", str(raw),
             "--out", "out/split", "--metrics", "out/split.json", "--plots", "out/plots"],
            work, env=env, timeout=300)  # fmt: skip
    run_cmd([sys.executable, "-m", "stages.prepare", "--params", "params.yaml", "--raw", str(raw),
             "--split", "out/split/split.csv", "--out", "out/prepared"],
            work, env=env, timeout=300)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def pipeline_here(raw, tmp_path_factory) -> Path:
    return _split_and_prepare(raw, tmp_path_factory.mktemp("here") / "w", {})


@needs_x86
@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_split_and_prepare_give_the_same_bytes_on_another_cpu(raw, pipeline_here, kernels, tmp_path, cpu):
    env, _ = CPUS[cpu]
    out = _split_and_prepare(raw, tmp_path / "w", env)
    files = tree_files(pipeline_here)
    assert {"split/split.csv", "split.json", "prepared/manifest.json"} <= files.keys()
    assert any(k.endswith(".tfrecord") for k in files)
    differ = _differing(pipeline_here, out)
    assert not differ, (
        f"{cpu} ({env}): split/prepare wrote {differ} differently from the same data; find the op "
        "in stages/split.py, skinlesion/checks/duplicates.py, stages/prepare.py or skinlesion/core/images.py "
        "whose last bits depend on the CPU"
    )


# split rounds its scores to 4 decimals before writing them, which hides most last-bit
# differences; the raw float32 scores show them (numpy's complex multiply fused into FMA on AVX2
# and AVX-512 but not on the baseline gave other bits here, before split spelled it out).
SCORES = """
import hashlib, sys
from pathlib import Path
import numpy as np
from skinlesion.checks.duplicates import compute_features, verify_scores
paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
f = compute_features(paths)
pairs = np.random.default_rng(0).integers(0, len(paths), (300, 2))
scores = verify_scores(f.thumbs[pairs[:, 0]], f.thumbs[pairs[:, 1]], -1.0)
assert np.isfinite(scores).all()
print(hashlib.md5(scores.tobytes()).hexdigest())
"""


@needs_x86
def test_duplicate_scores_are_the_same_bits_without_fma(raw, kernels):
    def scores(env: dict[str, str]) -> str:
        return run_cmd([sys.executable, "-c", SCORES, str(raw / "images")], REPO, env=env, timeout=300).stdout

    env, _ = CPUS["x86-64 baseline (SSE, no FMA)"]
    assert scores(env) == scores({}), f"duplicates.verify_scores gives other float32 bits under {env}"


# --------------------------------------------------------------------------- the exact functions


def test_exact_functions_are_accurate():
    """They replace numpy's: the look must not change, only the bits become CPU-independent."""
    from skinlesion.sources.exactmath import atan2, diamond_angle, exp, log, power, sincos, sincos_float

    rng = np.random.default_rng(0)
    x = rng.uniform(-100, 100, 20_000)
    s, c = sincos(x)
    assert np.abs(s - np.sin(x)).max() < 1e-14 and np.abs(c - np.cos(x)).max() < 1e-14
    assert all(sincos_float(float(v)) == (float(a), float(b)) for v, a, b in zip(x[:500], s, c, strict=False))
    e = rng.uniform(-700, 700, 20_000)
    assert np.abs(exp(e) / np.exp(e) - 1).max() < 1e-14
    pos = np.exp(rng.uniform(-50, 50, 20_000))
    assert np.abs(log(pos) - np.log(pos)).max() < 1e-13
    unit = rng.random(20_000)
    assert np.abs(power(unit, 0.7) - unit**0.7).max() < 1e-14 and power(np.zeros(1), 0.7)[0] == 0
    y, xx = rng.normal(size=20_000), rng.normal(size=20_000)
    y[:5], xx[3:8] = 0, 0
    assert np.abs(atan2(y, xx) - np.arctan2(y, xx)).max() < 1e-14
    # The diamond angle is monotone in the true angle and covers [0, 4).
    order = np.argsort(np.arctan2(y, xx) % (2 * np.pi))
    d = diamond_angle(xx.astype(np.float32), y.astype(np.float32))[order]
    assert (np.diff(d) > -1e-6).all() and d.min() >= 0 and d.max() < 4


# Functions whose last bits depend on the CPU (SIMD dispatch, libm's FMA and non-FMA builds, BLAS).
CPU_DEPENDENT = {
    "np": {"sin", "cos", "tan", "arcsin", "arccos", "arctan", "arctan2", "sinh", "cosh", "tanh", "exp",
           "exp2", "expm1", "log", "log2", "log10", "log1p", "power", "float_power", "hypot", "cbrt",
           "dot", "matmul", "einsum", "inner", "tensordot", "vdot", "linalg", "fft"},
    "math": {"sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "exp", "expm1",
             "log", "log2", "log10", "log1p", "pow", "hypot", "cbrt", "dist", "erf", "erfc", "gamma"},
}  # fmt: skip


# Every module the generator's bytes come from: the catalogue (ids, metadata), the drawing, the exact
# maths it draws with, and the writer (the JPEG export).
GENERATOR_SOURCES = ("exactmath.py", "synthetic_catalogue.py", "synthetic_draw.py", "synthetic.py")


@pytest.mark.parametrize("name", GENERATOR_SOURCES)
def test_the_generator_calls_no_cpu_dependent_function(name):
    """The rule behind the bytes, checked on the source: no numpy/math transcendental, no BLAS,
    no float ``**`` (CPython's ** on floats is libm's pow), no ``@``."""
    tree = ast.parse((REPO / "skinlesion" / "sources" / name).read_text())
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.attr in CPU_DEPENDENT.get(node.value.id, ())
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            found.append(f"line {node.lineno}: @")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            int_base = isinstance(node.left, ast.Constant) and type(node.left.value) is int
            if not int_base:  # 2 ** k is integer arithmetic; anything else may be libm's pow
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not found, (
        f"skinlesion/sources/{name}: CPU-dependent maths, use skinlesion/sources/exactmath.py: {found}"
    )


def test_the_generator_sources_are_all_checked():
    """A module the generator imports is in GENERATOR_SOURCES, so the check above cannot miss it."""
    sources = REPO / "skinlesion" / "sources"
    todo, seen = ["synthetic.py"], set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for node in ast.walk(ast.parse((sources / name).read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("skinlesion.sources")
            ):
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for mod in mods:
                    path = mod.removeprefix("skinlesion.sources.") + ".py"
                    if (sources / path).is_file() and path not in seen:
                        todo.append(path)
    assert seen <= set(GENERATOR_SOURCES), (
        f"add to GENERATOR_SOURCES: {sorted(seen - set(GENERATOR_SOURCES))}"
    )
