"""DVC as the flows see it: the stage graph, running one stage, dvc.lock, metrics, remotes.

No Prefect here. These functions run the real ``dvc`` commands (so ``dvc.lock`` and the DVC
cache stay the record, exactly as after a plain ``dvc repro``) and return plain values; the flow
in :mod:`flows.retrain` only composes them. (The module is not called ``dvc.py``: Prefect puts
``flows/`` on ``sys.path`` when it loads an entrypoint, and that name would shadow DVC itself.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DvcError",
    "Layout",
    "Pipeline",
    "PushFailed",
    "PushResult",
    "StageFailed",
    "StageRun",
    "apply_overrides",
    "committed_text",
    "diff_metrics",
    "default_remote",
    "dvc_argv",
    "is_transient",
    "load_pipeline",
    "lock_hashes",
    "parse_dot",
    "push_to_remote",
    "run_stage",
    "stream_command",
    "subprocess_env",
]


@dataclass(frozen=True)
class Layout:
    """Where the flow finds what the pipeline wrote. dvc.yaml owns these paths (the stage cmd
    arguments); this is the one place the flows spell them."""

    root: Path
    params: str = "params.yaml"
    raw: str = "data/raw"
    # The data a model learns and is tested from, as dvc.lock versions it: the raw set, the
    # split (which lesion is in the test set) and what passed validation (what the stages read).
    data_outputs: tuple[str, ...] = ("data/raw", "data/split", "data/validated")
    split_metrics: str = "metrics/split.json"
    validation_metrics: str = "metrics/validation.json"
    eval_metrics_dir: str = "metrics/eval"
    ensemble_metrics: str = "metrics/ensemble.json"
    calibration_metrics: str = "metrics/calibration.json"
    bundle: str = "models/ensemble"
    # the bundle's own answers for its test images (calibrate's --served): the gate's candidate side
    served: str = "data/served"
    production: str = "models/production"
    reports: str = "reports"
    plots_out: str = "reports/plots"
    # The stage that writes the bundle: a candidate exists only when a run reproduced it.
    bundle_stage: str = "calibrate"
    # Stages the retrain flow leaves to others by default: the monitor flow checks batches for
    # drift; demo_batch only feeds the demo's drift check.
    not_retrain: tuple[str, ...] = ("drift", "demo_batch")

    def path(self, rel: str) -> Path:
        return self.root / rel


# --------------------------------------------------------------------------- commands


def dvc_argv(*args: str) -> list[str]:
    """``dvc`` of this interpreter's environment, whatever PATH the worker was started with."""
    return [sys.executable, "-m", "dvc", *args]


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for ``dvc`` and the stage commands it starts."""
    env = dict(os.environ)
    # dvc runs each stage's `python -m stages.X` through the shell: this venv's python first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # stage log lines reach the Prefect UI as they are written
    env.setdefault("TQDM_MININTERVAL", "15")  # progress bars: a line every 15 s, not 10 a second
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra or {})
    return env


class DvcError(RuntimeError):
    """A ``dvc`` (or ``git``) command failed; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class StageFailed(DvcError):
    """``dvc repro`` of one stage exited non-zero; ``tail`` holds its last output lines."""

    def __init__(self, stage: str, returncode: int, tail: str) -> None:
        transient = is_transient(tail)
        kind = "transient failure" if transient else "failed"
        super().__init__(f"stage {stage!r} {kind} (exit {returncode}):\n{tail}", transient=transient)
        self.stage = stage
        self.returncode = returncode
        self.tail = tail


# What a retry can fix: another dvc process holding the repository lock (or an output's
# read/write lock), and network trouble while downloading or pushing. Everything else (a failed
# validation, a bad parameter, a crash in a stage) fails the same way again, so it is not retried.
_TRANSIENT = re.compile(
    r"Unable to acquire lock"
    r"|is busy, it is being blocked by"  # DVC's rwlock on an output another process uses
    r"|Connection (?:reset|refused|aborted)"
    r"|(?:Read|Connect)?Timeout(?:Error)?\b|timed out"
    r"|Temporary failure in name resolution|Name or service not known|Network is unreachable"
    r"|RemoteDisconnected|IncompleteRead"
    r"|Could not connect to the endpoint URL"  # botocore, pushing to an S3-compatible remote
    r"|HTTP (?:Error )?(?:429|502|503|504)\b|status(?: code)?:? (?:429|502|503|504)\b"
    r"|\b(?:429 Too Many Requests|502 Bad Gateway|503 Service Unavailable|504 Gateway Time-?out)",
    re.IGNORECASE,
)


def is_transient(text: str) -> bool:
    """True when a failed command's output shows a failure that retrying may fix."""
    return bool(_TRANSIENT.search(text))


def run_quiet(args: list[str], repo: Path, *, timeout: float = 600) -> str:
    """Run a short command in ``repo``; its stdout, or :class:`DvcError` with its stderr."""
    shown = " ".join(["dvc", *args[3:]] if args[:3] == dvc_argv() else args)
    try:
        proc = subprocess.run(
            args, cwd=repo, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise DvcError(f"`{shown}` timed out after {timeout:g} s", transient=True) from None
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise DvcError(f"`{shown}` exited {proc.returncode}: {out}", transient=is_transient(out))
    return proc.stdout


# --------------------------------------------------------------------------- the stage graph


_DOT_NODE = re.compile(r'^\s*"([^"]+)";\s*$')
_DOT_EDGE = re.compile(r'^\s*"([^"]+)"\s*->\s*"([^"]+)";\s*$')


def parse_dot(text: str) -> tuple[list[str], set[tuple[str, str]]]:
    """Nodes (in file order) and edges (upstream, downstream) of ``dvc dag --dot``."""
    nodes, edges = [], set()
    for line in text.splitlines():
        if m := _DOT_EDGE.match(line):
            edges.add((m.group(1), m.group(2)))
        elif m := _DOT_NODE.match(line):
            nodes.append(m.group(1))
    return nodes, edges


@dataclass(frozen=True)
class Pipeline:
    """The stages of dvc.yaml (foreach items expanded, as ``train@mobilenetv2``) and their edges."""

    stages: tuple[str, ...]
    edges: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    def upstream(self, stage: str) -> set[str]:
        return {a for a, b in self.edges if b == stage}

    def ancestors(self, stage: str) -> set[str]:
        seen: set[str] = set()
        todo = [stage]
        while todo:
            for up in self.upstream(todo.pop()):
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen

    def resolve(self, names: Iterable[str] | None, *, exclude: Iterable[str] = ()) -> list[str]:
        """The stages a run reproduces, like ``dvc repro NAMES``: the named stages and everything
        upstream of them. A foreach group's name (``train``) means all its items. ``None``
        means every stage except ``exclude`` (and what only they need)."""
        if names is None:
            excluded = {s for s in self.stages if s in set(exclude) or s.split("@")[0] in set(exclude)}
            targets = [s for s in self.stages if s not in excluded]
        else:
            targets = []
            for name in names:
                hit = [s for s in self.stages if s == name or s.split("@", 1)[0] == name]
                if not hit:
                    raise DvcError(f"unknown stage {name!r}; dvc.yaml has: {', '.join(self.stages)}")
                targets += hit
        wanted = set(targets)
        for t in targets:
            wanted |= self.ancestors(t)
        return [s for s in self.stages if s in wanted]

    def levels(self, selected: Iterable[str]) -> list[list[str]]:
        """``selected`` in waves: every stage comes after all of its upstream stages; stages in one
        wave do not depend on each other (train@a and train@b), in dvc.yaml order."""
        chosen = [s for s in self.stages if s in set(selected)]
        depth: dict[str, int] = {}

        def level(s: str) -> int:
            if s not in depth:
                ups = [u for u in self.upstream(s) if u in chosen]
                depth[s] = 1 + max((level(u) for u in ups), default=-1)
            return depth[s]

        out: list[list[str]] = []
        for s in chosen:
            d = level(s)
            while len(out) <= d:
                out.append([])
            out[d].append(s)
        return [w for w in out if w]


def load_pipeline(repo: Path) -> Pipeline:
    """Read the stage list and the DAG from DVC itself (after params overrides: foreach lists
    come from params.yaml)."""

    # `.dvc` files (data tracked with `dvc add`, such as models/production.dvc) are stages to DVC
    # but have no command: there is nothing to reproduce, and repro would re-hash them.
    def keep(name: str) -> bool:
        return not name.endswith(".dvc")

    names = [n for n in run_quiet(dvc_argv("stage", "list", "--name-only"), repo).split() if keep(n)]
    nodes, edges = parse_dot(run_quiet(dvc_argv("dag", "--dot"), repo))
    stages = names + [n for n in nodes if keep(n) and n not in names]
    edges = {(a, b) for a, b in edges if keep(a) and keep(b)}
    return Pipeline(stages=tuple(stages), edges=frozenset(edges))


# --------------------------------------------------------------------------- one stage


@dataclass(frozen=True)
class StageRun:
    stage: str
    status: str  # "ran" | "skipped" (dvc found nothing changed)
    seconds: float
    device: str | None = None


def run_stage(
    repo: Path,
    stage: str,
    *,
    on_line: Callable[[str], None],
    device: str | None = None,
    pull: bool = False,
    tail_lines: int = 60,
) -> StageRun:
    """``dvc repro --single-item STAGE``: every output line goes to ``on_line`` as it comes.

    ``device`` pins the stage to one GPU (``CUDA_VISIBLE_DEVICES``); ``pull`` lets DVC fetch
    unchanged outputs from the remote instead of recomputing them (a fresh worker machine).
    Raises :class:`StageFailed` with the last output lines when the stage fails.
    """
    argv = dvc_argv("repro", "--single-item", *(["--pull"] if pull else []), stage)
    env = subprocess_env({"CUDA_VISIBLE_DEVICES": device} if device is not None else None)
    skipped = False

    def seen(line: str) -> None:
        nonlocal skipped
        skipped = skipped or f"Stage '{stage}' didn't change, skipping" in line
        on_line(line)

    t0 = time.monotonic()
    returncode, tail = stream_command(argv, repo, on_line=seen, env=env, tail_lines=tail_lines)
    if returncode != 0:
        raise StageFailed(stage, returncode, "\n".join(tail))
    return StageRun(stage, "skipped" if skipped else "ran", round(time.monotonic() - t0, 1), device)


def stream_command(
    argv: list[str],
    cwd: Path,
    *,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    tail_lines: int = 60,
) -> tuple[int, list[str]]:
    """Run a command, handing each output line (stdout and stderr) to ``on_line`` as it comes;
    return its exit status and its last ``tail_lines`` lines."""
    tail: deque[str] = deque(maxlen=tail_lines)
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=dict(env) if env is not None else subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    ) as proc:
        assert proc.stdout is not None
        pending = b""
        # Read raw chunks: tqdm ends its updates with '\r', which a line iterator would hold back.
        while chunk := os.read(proc.stdout.fileno(), 65536):
            pending += chunk
            *complete, pending = re.split(rb"\r\n|\r|\n", pending)
            for raw in complete:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail.append(line)
                    on_line(line)
        if pending.strip():
            line = pending.decode("utf-8", "replace").rstrip()
            tail.append(line)
            on_line(line)
        returncode = proc.wait()
    return returncode, list(tail)


# --------------------------------------------------------------------------- record and metrics


def lock_hashes(repo: Path) -> dict[str, str]:
    """Every output path in dvc.lock with its md5 (a directory's ends in ``.dir``)."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    out: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            if "md5" in o:
                out[o["path"]] = o["md5"]
    return dict(sorted(out.items()))


def metrics_show(repo: Path) -> dict[str, dict[str, Any]]:
    """``dvc metrics show --json`` of the workspace as {file: {key: value}} (nested keys dotted)."""
    raw = json.loads(run_quiet(dvc_argv("metrics", "show", "--json"), repo) or "{}")
    ws = raw.get("") or raw.get("workspace") or {}
    if "error" in ws:  # dvc reports an unreadable dvc.yaml inside the JSON and exits 0
        raise DvcError(f"dvc metrics show: {ws['error'].get('msg', ws['error'])}")
    files = ws.get("data") or {}
    return {path: _flatten(entry.get("data") or {}) for path, entry in sorted(files.items())}


def metrics_diff_rev(repo: Path, rev: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``dvc metrics diff --json --all REV``: the workspace against a git revision."""
    out = run_quiet(dvc_argv("metrics", "diff", "--json", "--all", rev), repo).strip()
    return json.loads(out) if out else {}


def diff_metrics(
    old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """The shape ``dvc metrics diff --json --all`` prints, computed from two snapshots."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path) or {}, new.get(path) or {}
        rows = {}
        for key in sorted(set(a) | set(b)):
            o, n = a.get(key), b.get(key)
            row: dict[str, Any] = {"old": o, "new": n}
            if _is_num(o) and _is_num(n):
                row["diff"] = n - o
            rows[key] = row
        out[path] = rows
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def has_remote(repo: Path) -> bool:
    """Whether a default DVC remote is set (what ``dvc push`` and ``dvc repro --pull`` use)."""
    try:
        return bool(run_quiet(dvc_argv("remote", "default"), repo).strip())
    except DvcError as e:
        if "No default remote set" in str(e):
            return False
        raise


def default_remote(repo: Path) -> tuple[str, str] | None:
    """The default DVC remote as (name, url), or None when none is set. DVC merges .dvc/config
    with .dvc/config.local, so a ``dvc remote add --local -d`` override wins; a relative local
    url comes back resolved (DVC reads it relative to the config file's folder)."""
    if not has_remote(repo):
        return None
    name = run_quiet(dvc_argv("remote", "default"), repo).strip()
    # `dvc config` rather than `dvc remote list`, whose table wraps a long url at 80 columns.
    return name, run_quiet(dvc_argv("config", f"remote.{name}.url"), repo).strip()


class PushFailed(DvcError):
    """``dvc push`` failed. Nothing local was changed or undone: the workspace, dvc.lock, the
    DVC cache and a promotion made before the push all stand; only the remote is behind."""

    def __init__(self, message: str, *, remote: str | None, transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.remote = remote


@dataclass(frozen=True)
class PushResult:
    remote: str
    url: str
    files_pushed: int  # 0: the remote already had everything
    seconds: float


_PUSHED = re.compile(r"(\d+) files? pushed")


def push_to_remote(repo: Path, *, run_cache: bool = True, timeout: float = 6 * 3600) -> PushResult:
    """``dvc push`` every output dvc.yaml and the ``.dvc`` files (``models/production.dvc``)
    track to the default remote.

    ``run_cache``: push the run cache too, so another machine's ``dvc repro --pull`` restores
    unchanged stages' outputs before this run's dvc.lock reaches it through git.
    Raises :class:`PushFailed` naming the remote, saying that nothing local was undone and how
    to retry; ``transient`` when a retry may help (network, lock).
    """
    try:
        remote = default_remote(repo)
    except DvcError as e:
        raise PushFailed(f"dvc push: cannot read the DVC remote configuration: {e}", remote=None) from None
    if remote is None:
        raise PushFailed(
            "dvc push: no default DVC remote is set (.dvc/config core.remote, or "
            "`dvc remote add --local -d NAME URL`); nothing was pushed",
            remote=None,
        )
    name, url = remote
    argv = dvc_argv("push", *(["--run-cache"] if run_cache else []))
    t0 = time.monotonic()
    try:
        out = run_quiet(argv, repo, timeout=timeout)
    except DvcError as e:
        retry = " --run-cache" if run_cache else ""
        raise PushFailed(
            f"dvc push to remote {name!r} ({url}) failed; nothing local was changed or undone (a "
            f"promotion made before the push stands), only the remote is behind. Once the remote "
            f"works, run `dvc push{retry}` in {repo}. {e}",
            remote=name,
            transient=e.transient,
        ) from e
    m = _PUSHED.search(out)
    return PushResult(name, url, int(m.group(1)) if m else 0, round(time.monotonic() - t0, 1))


# --------------------------------------------------------------------------- params.yaml


def set_params(path: Path, overrides: Mapping[str, Any]) -> bool:
    """Apply ``{"train.common.epochs": 1, ...}`` to params.yaml and keep them, as ``dvc exp run
    -S`` does, so dvc.lock and params.yaml agree after the run. Only the changed values are
    rewritten (comments and layout stay); the result is validated by :mod:`skinlesion.params` before
    anything is written, so a bad override raises :class:`ParamsError` naming the key and leaves
    the file as it was. Returns whether the file changed.
    """
    from skinlesion.core.errors import ParamsError
    from skinlesion.params.load import parse_params

    text = path.read_text(encoding="utf-8")
    before = yaml.safe_load(text) or {}
    intended = apply_overrides(before, overrides, name=path.name)
    try:
        parse_params(intended)
    except ParamsError as e:
        raise ParamsError(f"params override: {e}") from None
    if intended == before:
        return False
    new_text = text
    for key, value in overrides.items():
        parts = key.split(".")
        parent = before
        for part in parts[:-1]:
            parent = parent[part]
        if parts[-1] in parent:
            new_text = _replace_value(new_text, parts, parent[parts[-1]], value) or new_text
    if yaml.safe_load(new_text) != intended:
        new_text = _roundtrip_dump(text, overrides)  # a value the in-place edit cannot express
    from skinlesion.core.outputs import atomic_file

    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(new_text)
    return True


def apply_overrides(
    raw: Mapping[str, Any], overrides: Mapping[str, Any], *, name: str = "params.yaml"
) -> dict[str, Any]:
    """A copy of the parsed params ``raw`` with ``{"section.key": value}`` set (not validated).
    A missing section raises :class:`ParamsError` naming the key; a missing last key is added."""
    import copy

    from skinlesion.core.errors import ParamsError

    out = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                section = ".".join(parts[: i + 1])
                raise ParamsError(f"{section}: no such section in {name} (from {key!r})")
            node = node[part]
        node[parts[-1]] = value
    return out


def committed_text(repo: Path, path: str, rev: str = "HEAD") -> str | None:
    """``path`` (relative to ``repo``) as git holds it at ``rev``; None outside git, before the
    first commit, or when the file is not tracked there."""
    try:
        proc = subprocess.run(
            ["git", "show", f"{rev}:./{path}"], cwd=repo, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _flow_yaml(value: Any) -> str:
    dumped = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False)
    return dumped.removesuffix("...\n").strip()


def _replace_value(text: str, parts: list[str], old: Any, value: Any) -> str | None:
    """``text`` with the value ``old`` at ``parts`` replaced by ``value`` where it is written, or
    None when it does not sit on one line (a block list or mapping)."""
    from ruamel.yaml import YAML

    node = YAML().load(text)  # only for the line and column of the value
    for part in parts[:-1]:
        node = node[part]
    line_no, col = node.lc.value(parts[-1])
    lines = text.splitlines(keepends=True)
    line = lines[line_no]
    body = line.rstrip("\r\n")
    for end in range(col + 1, len(body) + 1):
        if end < len(body) and body[end] not in " ,}]#":
            continue
        try:
            if yaml.safe_load(body[col:end]) == old:
                lines[line_no] = body[:col] + _flow_yaml(value) + body[end:] + line[len(body) :]
                return "".join(lines)
        except yaml.YAMLError:
            continue
    return None


def _roundtrip_dump(text: str, overrides: Mapping[str, Any]) -> str:
    import io

    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 100
    data = rt.load(text)
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    buf = io.StringIO()
    rt.dump(data, buf)
    return buf.getvalue()
