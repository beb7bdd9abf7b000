"""The committed demo run (dvc.lock + metrics/) is the baseline `make demo` compares against.

It must be the run of the committed params: a change to params.yaml that moves the demo's
results without a new baseline would make every newcomer's `make demo` report "DIFFERS"."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def params_mismatches(lock: dict, params: dict) -> list[str]:
    """Every (stage, key) whose value in dvc.lock differs from params.yaml."""
    out = []
    for stage, entry in sorted((lock.get("stages") or {}).items()):
        for key, value in sorted(((entry.get("params") or {}).get("params.yaml") or {}).items()):
            try:
                now = _lookup(params, key)
            except KeyError:
                out.append(f"{stage}: {key} is in dvc.lock but no longer in params.yaml")
                continue
            if now != value:
                out.append(f"{stage}: {key} = {now!r} in params.yaml, {value!r} in dvc.lock")
    return out


def test_committed_dvc_lock_is_the_run_of_the_committed_params():
    lock_path = REPO / "dvc.lock"
    assert lock_path.is_file(), "no committed baseline: run `make demo` and commit dvc.lock and metrics/"
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8"))
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    bad = params_mismatches(lock, params)
    assert not bad, (
        "params.yaml moved away from the committed demo run; rerun `make demo` and commit dvc.lock "
        "and metrics/ as the new baseline:\n  " + "\n  ".join(bad)
    )
    stages = set(lock["stages"])
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" in stage:
            for item in params["train"]["backbones"]:
                assert f"{name}@{item}" in stages, f"the baseline has no {name}@{item}"
        else:
            assert name in stages, f"the baseline has no stage {name}"
    # the baseline's metrics are committed beside it
    for out in ("metrics/ensemble.json", "metrics/calibration.json", "metrics/split.json"):
        assert (REPO / out).is_file(), f"{out} is not committed with the baseline"


def test_params_mismatches_names_the_stage_and_key():
    lock = {"stages": {"split": {"params": {"params.yaml": {"split.hash_radius": 8, "base.seed": 42}}}}}
    assert params_mismatches(lock, {"split": {"hash_radius": 8}, "base": {"seed": 42}}) == []
    assert params_mismatches(lock, {"split": {"hash_radius": 6}, "base": {"seed": 42}}) == [
        "split: split.hash_radius = 6 in params.yaml, 8 in dvc.lock"
    ]
    assert "no longer in params.yaml" in params_mismatches(lock, {"split": {"hash_radius": 8}})[0]
