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

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("stages", "flows", "serve", "skinlesion", "tools")


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
    files = {m.replace(".", "/") + ".py" for m in project_imports(m.group(1))}
    missing = sorted(f for f in files if f not in deps)
    assert not missing, f"dvc.yaml stage {stage!r}: add to its deps: {missing}"


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
