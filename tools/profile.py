"""Run the pipeline with a committed parameter profile, as a DVC experiment.

A profile (``profiles/*.yaml``) is a partial ``params.yaml``: only the keys it changes. It is
validated against the full params schema (an unknown key or a bad value fails before anything
runs), flattened into ``dvc exp run -S key=value`` arguments and handed to DVC, so DVC stays
the record: the experiment's params, ``dvc.lock`` and metrics are in ``dvc exp show``.

    python -m tools.profile profiles/real-cpu.yaml --set download.source=local:../shared/data/ham10000
    python -m tools.profile profiles/real-cpu.yaml --print     # the dvc command, not run
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from skinlesion.core.cli import run_main
from skinlesion.core.errors import ParamsError, StageError
from skinlesion.core.outputs import write_json
from skinlesion.params.load import parse_params
from tools.runs import dvc_command, run_members


def read_profile(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: profile not found (see profiles/)") from None
    except yaml.YAMLError as e:
        raise StageError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StageError(f"{path}: a profile is a mapping of params.yaml keys")
    return raw


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.get(p)
        if not isinstance(node, dict):
            node = tree[p] = {}
        tree = node
    tree[leaf] = value


def _yaml_value(v: Any) -> str:
    """A value as DVC's -S parses it (YAML flow style: true, 0.5, [a, b])."""
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def merge(
    params_file: Path, profile: dict[str, Any], sets: Sequence[str], *, source: str = "profile"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params_file`` with the profile and ``--set key=value`` items applied, checked against
    the schema. Returns (the merged params mapping, {dotted key: value} of the overrides).

    An error names where the bad value came from: ``source`` (the profile, e.g. "profile
    profiles/real-cpu.yaml") or the ``--set`` item."""
    from_sets: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StageError(f"--set {item!r}: expected key=value")
        try:
            from_sets[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise StageError(f"--set {item!r}: the value is not YAML: {e}") from None
    try:
        base = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise StageError(f"{params_file}: params file not found") from None
    _check(base, str(params_file))
    merged = copy.deepcopy(base)
    for k, v in flatten(profile).items():
        _set(merged, k, v)
    _check(merged, source)
    for k, v in from_sets.items():
        _set(merged, k, v)
    try:
        parse_params(merged)
    except ParamsError as e:
        bad = str(e).split(":", 1)[0]
        named = [
            i
            for i in sets
            if bad == i.partition("=")[0].strip() or bad.startswith(i.partition("=")[0].strip() + ".")
        ]
        raise StageError(f"--set {' '.join(named or sets)}: {e}") from None
    return merged, {**flatten(profile), **from_sets}


def _check(merged: dict[str, Any], source: str) -> None:
    try:
        parse_params(merged)
    except ParamsError as e:
        raise StageError(f"{source}: {e}") from None


def build_overrides(
    params_file: Path, profile: dict[str, Any], sets: Sequence[str], *, source: str = "profile"
) -> dict[str, str]:
    """{dotted key: DVC -S value} for the profile plus ``--set`` items (see :func:`merge`)."""
    _merged, overrides = merge(params_file, profile, sets, source=source)
    return {k: _yaml_value(v) for k, v in overrides.items()}


STAGE_MARK = re.compile(rb"Running stage '([^']+)'")


def run_timed(cmd: Sequence[str]) -> tuple[int, dict[str, float]]:
    """Run ``cmd``, passing its output through unchanged (progress bars included), and time
    each DVC stage from its "Running stage 'X'" line to the next one (or the end)."""
    seconds: dict[str, float] = {}
    current, started = None, time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = sys.stdout.buffer
    while chunk := proc.stdout.read1(65536):
        out.write(chunk)
        out.flush()
        for m in STAGE_MARK.finditer(chunk):  # a mark split across two reads is missed: cosmetic
            now = time.perf_counter()
            if current:
                seconds[current] = seconds.get(current, 0.0) + now - started
            current, started = m.group(1).decode(), now
    rc = proc.wait()
    if current:
        seconds[current] = seconds.get(current, 0.0) + time.perf_counter() - started
    return rc, seconds


def _git(*args: str) -> str:
    r = subprocess.run(["git", *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def lock_outputs(lock: Path, stages: Sequence[str] | None = None) -> list[Path]:
    """Every output (``outs``, metrics, plots) ``dvc.lock`` records for ``stages`` (None: all).

    DVC keeps the entries of foreach items a params change removed (``train@mobilenetv2`` after
    a run without it), so the current stage list is what says which entries are this run's."""
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    return [
        Path(str(o["path"]))
        for name, stage in (data.get("stages") or {}).items()
        if stages is None or name in stages
        for o in stage.get("outs") or []
        if isinstance(o, dict) and "path" in o
    ]


def current_stages() -> list[str] | None:
    """``dvc stage list --name-only`` (the DAG with today's params); None when DVC cannot say."""
    try:
        r = subprocess.run([*dvc_command(), "stage", "list", "--name-only"], capture_output=True, text=True)
    except OSError:
        return None
    return r.stdout.split() if r.returncode == 0 else None


def other_backbones(params: Path) -> frozenset[str]:
    """The backbones the run with ``params`` did not train (every known one but its
    ``train.backbones``); empty when the file cannot say."""
    from skinlesion.params.train import BACKBONES

    trained = run_members(params)
    return frozenset(BACKBONES) - set(trained) if trained else frozenset()


def write_record(
    path: Path,
    *,
    command: str,
    profile: Path,
    seconds: dict[str, float],
    total: float,
    params: Path = Path("params.yaml"),
) -> None:
    """The run's record: the exact command, the code and data versions, wall time per stage and
    every metrics file, so a result in the README can be traced to what produced it.

    Only this run's members: a metrics file that names a backbone the run's ``params`` did not
    train (the demo's metrics/eval/mobilenetv2.json after a real run without it) is left out."""
    metrics = {}
    written = lock_outputs(Path("dvc.lock"), current_stages())
    others = other_backbones(params)
    for f in sorted(Path("metrics").rglob("*.json")):
        if others & {part.removesuffix(".json") for part in f.parts}:
            continue
        # ... and only what this run's stages wrote. A lock that records no output at all says
        # nothing either way: every file is kept.
        if written and not any(f == o or o in f.parents for o in written):
            continue
        try:
            metrics[f.as_posix()] = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    lock = Path("dvc.lock")
    record = {
        "command": command,
        "profile": profile.as_posix(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "dvc_lock_md5": hashlib.md5(lock.read_bytes()).hexdigest() if lock.is_file() else None,
        "cpu_count": os.cpu_count(),
        "wall_minutes": round(total / 60, 1),
        "stage_minutes": {k: round(v / 60, 2) for k, v in seconds.items()},
        "metrics": metrics,
    }
    write_json(path, record)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.profile",
        description="Run `dvc exp run` with a committed params profile (profiles/*.yaml).",
    )
    ap.add_argument("profile", type=Path, help="a partial params.yaml, e.g. profiles/real-cpu.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more override on top of the profile (repeatable)")  # fmt: skip
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the base params file")
    ap.add_argument("--print", action="store_true", help="print the dvc command instead of running it")
    ap.add_argument("--name", default=None, help="experiment name (dvc exp run -n)")
    ap.add_argument(
        "--record", type=Path, default=None,
        help="after a successful run, write the command, git commit, dvc.lock hash, wall time "
        "per stage and all metrics to this JSON file (e.g. results/real-cpu.json)",
    )  # fmt: skip
    args = ap.parse_args(argv)

    def body() -> int:
        profile = read_profile(args.profile)
        merged, raw = merge(args.params, profile, args.set, source=f"profile {args.profile}")
        overrides = {k: _yaml_value(v) for k, v in raw.items()}
        cmd = ["dvc", "exp", "run"] + (["-n", args.name] if args.name else [])
        for k, v in overrides.items():
            cmd += ["-S", f"{k}={v}"]
        print(shlex.join(cmd), flush=True)
        if args.print:
            return 0
        if merged.get("train", {}).get("device") == "gpu":
            # Refuse now, not after download, split, validate and prepare have run (the train
            # stage would refuse the same way, with the same line).
            from skinlesion.model.distribute import visible_gpus

            visible_gpus("gpu")
        t0 = time.perf_counter()
        rc, seconds = run_timed(cmd)
        total = time.perf_counter() - t0
        stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items())
        print(f"profile {args.profile}: dvc exp run exited {rc} after {total / 60:.1f} min ({stages})",
              file=sys.stderr if rc else sys.stdout)  # fmt: skip
        if rc == 0 and args.record:
            # dvc exp run applied the overrides to args.params: it names this run's members
            write_record(
                args.record, command=shlex.join(cmd), profile=args.profile, seconds=seconds, total=total,
                params=args.params,
            )  # fmt: skip
            print(f"record: {args.record}")
        return rc

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
