"""DVC must see every change: each stage's deps list every project module its command imports.

The imports are read from the source (``ast``), transitively, including imports inside
functions (a stage that imports ``skinlesion.model.networks`` lazily still runs it). A stage whose deps miss
one would not rerun when that module changes, and ``dvc.lock`` would claim a result the code no
longer produces.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("stages", "flows", "serve", "skinlesion", "tools")
# Modules every stage imports that cannot change an output: logging set-up and turning an
# exception into a one-line message and an exit code. They are left out of the deps, so a change
# to how a stage logs does not rerun the whole DAG (~40 min on real data). The test below keeps
# them that narrow: standard library and the error types only.
NOT_OUTPUT_SHAPING = {"skinlesion/core/cli.py": {"skinlesion.core.errors"}}


def project_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Project modules ``module`` imports, transitively (as dotted names, itself included)."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.is_file():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                project_imports(name, seen)
    return seen


def templates(modules: set[str]) -> set[str]:
    """The Jinja2 templates those modules render (a ``"<name>.j2"`` literal, read from the module's
    ``templates/`` folder): they shape an output as much as the code does."""
    out = set()
    for module in modules:
        path = REPO / (module.replace(".", "/") + ".py")
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".j2"):
                out.add((path.parent / "templates" / node.value).relative_to(REPO).as_posix())
    return out


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """``{stage: (cmd, deps)}`` with foreach stages expanded over one sample item."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in spec.items():
        body = stage.get("do", stage)
        out[name] = (body["cmd"], [str(d) for d in body.get("deps", [])])
    return out


def test_the_import_walker_sees_lazy_and_transitive_imports():
    mods = project_imports("stages.drift")
    assert {
        "skinlesion.model.bundle",
        "skinlesion.measure.imagefeatures",
        "skinlesion.core.images",
        "skinlesion.core.parallel",
    } <= mods
    # skinlesion.model.bundle imports skinlesion.model.networks inside Bundle.load(), not at module level
    assert "skinlesion.model.networks" in project_imports("skinlesion.model.bundle")
    assert (
        "skinlesion.model.networks" in mods and "skinlesion.model.losses" in mods
    )  # ... and models imports losses lazily


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_every_imported_project_module_is_a_dependency(stage):
    cmd, deps = stage_commands()[stage]
    m = re.search(r"python -m ([\w.]+)", cmd)
    assert m, f"{stage}: command does not run a project module: {cmd}"
    modules = project_imports(m.group(1))
    files = {m.replace(".", "/") + ".py" for m in modules} | templates(modules)
    missing = sorted(f for f in files if f not in deps and f not in NOT_OUTPUT_SHAPING)
    assert not missing, f"dvc.yaml stage {stage!r}: add to its deps: {missing}"
    listed = sorted(f for f in deps if f in NOT_OUTPUT_SHAPING)
    assert not listed, f"dvc.yaml stage {stage!r}: {listed} cannot change an output; leave it out"


@pytest.mark.parametrize("path", sorted(NOT_OUTPUT_SHAPING))
def test_a_module_left_out_of_the_deps_stays_logging_and_exit_codes_only(path):
    """Left out of every stage's deps, so it must not grow into code that shapes an output: it may
    import only the standard library and the named project modules, and write no file."""
    source = (REPO / path).read_text(encoding="utf-8")
    module = path.removesuffix(".py").replace("/", ".")
    imported = project_imports(module) - {module}
    assert imported <= NOT_OUTPUT_SHAPING[path], f"{path} now imports {sorted(imported)}"
    for word in ("open(", "write_text", "write_bytes", "atomic_", "np.", "pd.", "random"):
        assert word not in source, f"{path} uses {word!r}: it would shape outputs"
    assert len(source.splitlines()) < 120, f"{path} grew past logging and exit codes"


def test_the_model_card_template_is_a_dependency_of_calibrate():
    """Editing the card's template must rerun calibrate (it writes the card)."""
    found = templates(project_imports("stages.calibrate"))
    assert "skinlesion/measure/templates/model_card.md.j2" in found
    assert all((REPO / f).is_file() for f in found)


def test_no_stage_module_imports_another_stage_module():
    """What two stages share lives in a helper module (STYLE.md, rule 10)."""
    stage_modules = {re.search(r"python -m ([\w.]+)", cmd).group(1) for cmd, _ in stage_commands().values()}
    assert {"stages.drift", "stages.calibrate", "stages.evaluate"} <= stage_modules
    offenders = {}
    for mod in sorted(stage_modules):
        others = sorted((project_imports(mod) - {mod}) & stage_modules)
        if others:
            offenders[mod] = others
    assert not offenders, f"stage modules importing stage modules: {offenders}"
