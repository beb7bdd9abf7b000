"""The folder tree is the architecture (STYLE.md rules 10-12): these tests keep it so.

- ``stages/`` holds the DVC stage entries and nothing else;
- ``skinlesion/`` is layered (core < params < sources < measure < checks < model): a layer imports
  only the layers before it, and the library never imports an entry package;
- no private name (``_x``) is imported from another module, no test module from another;
- no import cycle among project modules (module-level imports);
- a module over 700 lines says why at its top (a ``# Long:`` line).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("stages", "flows", "serve", "skinlesion", "tools", "bench", "tests")
LAYERS = ("core", "params", "sources", "measure", "checks", "model")
MAX_LINES = 700


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            out[".".join(rel.parts)] = path
    return out


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for each absolute ``from``/``import`` of a project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return [(m, n) for m, n in out if m.split(".")[0] in PACKAGES]


def stage_modules() -> set[str]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {re.search(r"python -m ([\w.]+)", s.get("do", s)["cmd"]).group(1) for s in spec.values()}


def test_every_module_under_stages_is_a_dvc_stage():
    in_folder = {f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py") if p.stem != "__init__"}
    assert len(in_folder) >= 10
    assert in_folder == stage_modules(), (
        f"not a stage in dvc.yaml: {sorted(in_folder - stage_modules())}; "
        f"a stage whose module is elsewhere: {sorted(stage_modules() - in_folder)}"
    )


def test_the_library_is_layered():
    bad = []
    for mod, path in modules().items():
        if not mod.startswith("skinlesion."):
            continue
        parts = mod.split(".")
        layer = LAYERS.index(parts[1]) if parts[1] in LAYERS else None
        for imported, _ in imports(path):
            top = imported.split(".")[0]
            if top != "skinlesion":
                bad.append(f"{mod} imports {imported} (the library never imports an entry package)")
                continue
            sub = imported.split(".")[1] if imported.count(".") else None
            if layer is not None and sub in LAYERS and LAYERS.index(sub) > layer:
                bad.append(f"{mod} ({parts[1]}) imports {imported} (a later layer)")
    assert not bad, "\n".join(bad)


def test_measure_and_lower_layers_never_import_tensorflow():
    bad = []
    for mod, path in modules().items():
        parts = mod.split(".")
        if parts[0] != "skinlesion" or parts[1] == "model" or len(parts) < 3:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{mod} imports {n}" for n in names if n.split(".")[0] in ("tensorflow", "keras")]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for mod, path in modules().items():
        for imported, names in imports(path):
            bad += [f"{mod}: from {imported} import {n}" for n in names if n.startswith("_")]
    assert not bad, "\n".join(bad)


def test_no_test_module_imports_another_test_module():
    """Shared test code lives in tests/builders/ or a conftest, not in another test's module."""
    bad = []
    for mod, path in modules().items():
        if mod.startswith("tests."):
            bad += [
                f"{mod}: from {m} import ..."
                for m, _ in imports(path)
                if m.split(".")[-1].startswith("test_")
            ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_among_project_modules():
    mods = modules()
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for imported, names in imports(path, top_level_only=True):
            deps |= {c for c in [imported, *(f"{imported}.{n}" for n in names)] if c in mods and c != mod}
        graph[mod] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_a_long_module_says_why_at_its_top():
    bad = []
    for path in modules().values():
        text = path.read_text(encoding="utf-8").splitlines()
        if len(text) > MAX_LINES and not any(line.startswith("# Long: ") for line in text[:15]):
            bad.append(f"{path.relative_to(REPO)}: {len(text)} lines and no '# Long: <why>' line at its top")
    assert not bad, "\n".join(bad)
