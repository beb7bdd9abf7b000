"""Reading a run for the tools: a git revision, a DVC experiment or the workspace.

A run's files are read as it holds them: git files from git, DVC outputs from the DVC cache
(``dvc.api.DVCFileSystem``), the workspace from disk (:class:`RunFiles`). What ``tools.compare``
reads of a run (:func:`load_run`): its served test predictions (the calibrate stage's
``data/served/test*.csv``), its headline metrics, params and data version (data/raw's md5 in its
``dvc.lock``, :func:`lock_out_md5`). The noise bands a run is judged by (:func:`read_bands`,
:func:`committed_bands`; the file's format is :mod:`tools.noisefile`'s), and what DVC and git say
about a revision (:func:`dvc_metrics_diff`, :func:`dvc_params_diff`, :func:`git_show`) for
``tools.summary`` and ``tools.noise``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from skinlesion.core.errors import StageError
from skinlesion.measure.paired import headline, served_statistics
from skinlesion.measure.scoring import IMAGE_ONLY, IMAGE_ONLY_SUFFIX, METADATA
from tools.noisefile import NOISE_FILE, NoiseFileError, bands_of, noise_bands, parse_noise, read_noise

log = logging.getLogger(__name__)

WORKSPACE = "workspace"

# How a file missing from a run is made: shown after the run and the path.
HOW = {
    "served": "run `dvc repro calibrate`",
    "bundle": "run `dvc repro calibrate`",
    "raw": "run `dvc repro download`",
    "split": "run `dvc repro validate`",
}


@dataclass(frozen=True)
class Layout:
    """Where a run keeps what a comparison reads (as dvc.yaml names them)."""

    served: str = "data/served"
    headline: str = "metrics/headline.json"
    calibration: str = "metrics/calibration.json"
    split: str = "data/validated/split.csv"
    bundle: str = "models/ensemble"
    raw: str = "data/raw"
    noise: str = NOISE_FILE
    params: str = "params.yaml"
    lock: str = "dvc.lock"


# --------------------------------------------------------------------------- a run and its files


@dataclass(frozen=True)
class Run:
    """A run to compare: ``name`` as the user gave it, ``sha`` its commit (None: the workspace)."""

    name: str
    sha: str | None
    experiment: bool = False

    @property
    def label(self) -> str:
        if self.sha is None:
            return WORKSPACE
        kind = "experiment " if self.experiment else ""
        return f"{self.name} ({kind}{self.sha[:7]})"


def resolve(root: Path, name: str) -> Run:
    """A git revision or a DVC experiment name, resolved to its commit as DVC resolves it
    (``dvc exp diff`` and ``dvc.api`` take the same names), or ``workspace``."""
    if name == WORKSPACE:
        return Run(name, None)
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.scm import resolve_rev

    try:
        with Repo(str(root)) as repo:
            sha = resolve_rev(repo.scm, name)
            try:
                is_exp = repo.scm.resolve_rev(name) != sha
            except Exception:  # noqa: BLE001 - git alone does not know the name: an experiment
                is_exp = True
    except DvcException as e:
        raise StageError(
            f"{name}: not a git revision or a DVC experiment name in {root} ({e}); see git log, "
            "dvc exp list, or use 'workspace'"
        ) from None
    return Run(name, sha, is_exp)


class RunFiles:
    """One run's files on disk: the workspace's own, or a revision's copied from git and the DVC
    cache into ``scratch``. A missing file is one error naming the run, the path and the fix."""

    def __init__(self, root: Path, run: Run, scratch: Path, lock: str = "dvc.lock") -> None:
        self.root, self.run, self.scratch, self.lock_rel = root, run, scratch, lock
        self._fs: Any = None
        self._lock: dict[str, Any] | None = None
        self._lock_read = False

    def fs(self) -> Any:
        """The revision's files as DVC sees them (git files and DVC outputs from the cache)."""
        if self._fs is None:
            from dvc.api import DVCFileSystem

            self._fs = DVCFileSystem(str(self.root), rev=self.run.sha)
        return self._fs

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fs is not None:
            self._fs.close()

    def shown(self, rel: str) -> str:
        return rel if self.run.sha is None else f"{self.run.name}:{rel}"

    def lock(self) -> dict[str, Any] | None:
        """The run's ``dvc.lock``, parsed (None when it has none)."""
        if not self._lock_read:
            self._lock_read = True
            path = self.get(self.lock_rel, required=False)
            self._lock = read_yaml(path, self.shown(self.lock_rel)) if path else None
        return self._lock

    def get(self, rel: str, *, required: bool = True, how: str = "make it") -> Path | None:
        """``rel`` (a file or a folder) on disk, or None when the run has none and not ``required``."""
        if self.run.sha is None:
            path = self.root / rel
            if path.exists():
                return path
            if required:
                raise StageError(f"workspace: no {rel}: {how} (or dvc pull)")
            return None
        dest = self.scratch / rel
        if dest.exists():
            return dest
        fs = self.fs()
        error = None
        try:
            if fs.exists(rel):
                dest.parent.mkdir(parents=True, exist_ok=True)
                if fs.isdir(rel):
                    fs.get(rel, str(dest), recursive=True)
                else:
                    fs.get_file(rel, str(dest))
                return dest
        except Exception as e:  # noqa: BLE001 - DVC's cache errors have no common base worth naming
            error = e
        # An output its dvc.lock records was made there: its data is missing from the cache. One
        # that dvc.yaml declares but no lock records (or a file git never held) was never made.
        if rel != self.lock_rel and lock_tracks(self.lock(), rel):
            why = f" ({error})" if error is not None else ""
            raise StageError(
                f"{self.run.label}: {rel}: made at that revision but its data is not in the DVC cache{why}; "
                f"{self.fetch_hint(rel)}"
            )
        if required:
            raise StageError(
                f"{self.run.label}: no {rel} at that revision: {how} there (git checkout {self.run.name}), "
                "or compare with the workspace"
            )
        return None

    def fetch_hint(self, rel: str) -> str:
        if self.run.experiment:
            return (
                f"get it with `dvc exp pull <remote> {self.run.name}` (or `dvc pull` after `dvc exp apply`)"
            )
        return f"get it with `dvc fetch -A {rel}`, or `git checkout {self.run.name} && dvc pull`"


@dataclass
class RunData:
    """What a comparison reads of one run."""

    run: Run
    frames: dict[str, pd.DataFrame]  # by headline suffix: "" (test.csv), "_image_only"
    modes: dict[str, str]  # the input mode of each frame
    headline: dict[str, Any] | None  # metrics/headline.json, else the calibration metrics' subset
    params: dict[str, Any]
    data_md5: str | None
    files: RunFiles = field(repr=False)


def served_files(served_dir: Path) -> dict[str, Path]:
    """The served prediction files of a run by headline suffix: ``test.csv`` (the first mode)
    and ``test_image_only.csv`` beside it for a bundle that fuses metadata."""
    out = {"": served_dir / "test.csv"}
    other = served_dir / f"test{IMAGE_ONLY_SUFFIX}.csv"
    if other.is_file():
        out[IMAGE_ONLY_SUFFIX] = other
    return out


def read_served(path: Path, shown: str) -> pd.DataFrame:
    """A served predictions file, checked (its errors name ``shown``)."""
    from skinlesion.measure.predictions import read_predictions

    if not path.is_file():
        raise StageError(f"{shown}: not found; {HOW['served']}")
    try:
        df = read_predictions(path, producer="calibrate")
    except StageError as e:
        raise StageError(str(e).replace(str(path), shown)) from None
    missing = [c for c in ("refer", "predicted") if c not in df.columns]
    if missing:
        raise StageError(f"{shown}: no column(s) {missing}: written by an older calibrate; {HOW['served']}")
    return df


def load_run(files: RunFiles, layout: Layout) -> RunData:
    """A run's served frames, headline, params and data version."""
    served_dir = files.get(layout.served, how=HOW["served"])
    assert served_dir is not None
    paths = served_files(served_dir)
    frames = {sfx: read_served(p, files.shown(f"{layout.served}/{p.name}")) for sfx, p in paths.items()}
    modes = {"": METADATA if IMAGE_ONLY_SUFFIX in frames else IMAGE_ONLY}
    if IMAGE_ONLY_SUFFIX in frames:
        modes[IMAGE_ONLY_SUFFIX] = IMAGE_ONLY
    head = None
    path = files.get(layout.headline, required=False)
    if path is not None:
        head = read_json(path, files.shown(layout.headline))
    else:
        path = files.get(layout.calibration, required=False)
        if path is not None:
            head = headline(read_json(path, files.shown(layout.calibration)), tuple(frames))
    params_path = files.get(layout.params, required=False)
    params = read_yaml(params_path, files.shown(layout.params)) if params_path else {}
    data = RunData(
        run=files.run,
        frames=frames,
        modes=modes,
        headline=head,
        params=params or {},
        data_md5=lock_out_md5(files.lock(), layout.raw),
        files=files,
    )
    check_in_step(data, layout)
    return data


def check_in_step(data: RunData, layout: Layout) -> None:
    """Warn when a run's served file does not give the metrics its headline reports (outputs
    out of step, e.g. a workspace where calibrate's outputs were edited or partly restored)."""
    if not data.headline:
        return
    for sfx, frame in data.frames.items():
        stats = served_statistics(frame)
        for key in ("macro_auc", "test_malignant_recall"):
            reported = data.headline.get(key + sfx)
            if reported is not None and abs(stats[key] - float(reported)) > 1e-6:
                log.warning(
                    "%s: %s/test%s.csv gives %s %.6f, its headline %.6f: the outputs are out of step "
                    "(dvc status; dvc repro calibrate)",
                    data.run.label, layout.served, sfx, key, stats[key], float(reported),
                )  # fmt: skip
                return


def read_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise StageError(f"{shown}: not YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def read_json(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StageError(f"{shown}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise StageError(f"{shown}: expected a JSON object")
    return data


def run_members(params: Path) -> tuple[str, ...] | None:
    """The backbones this run trained (``train.backbones`` of its params file); None when the
    file cannot say (then ``tools.summary`` lets the ensemble's weights decide, else shows every
    member file)."""
    try:
        data = yaml.safe_load(params.read_text(encoding="utf-8"))
        backbones = data["train"]["backbones"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return tuple(str(b) for b in backbones) if isinstance(backbones, list) and backbones else None


# --------------------------------------------------------------------------- noise bands


def read_bands(runs: Sequence[RunData], layout: Layout) -> tuple[dict[str, float], str | None]:
    """The headline noise bands of the first run that has a noise file (B, then A), else the
    workspace's."""
    for data in runs:
        path = data.files.get(layout.noise, required=False)
        if path is None:
            continue
        shown = data.files.shown(layout.noise)
        try:
            return noise_bands(path), shown
        except NoiseFileError as e:
            raise StageError(str(e).replace(str(path), shown)) from None
    # Runs made before the noise file (e.g. make noise's own experiments): the band committed
    # now, said as such.
    here = runs[0].files.root / layout.noise if runs else None
    if here is not None and here.is_file():
        try:
            return noise_bands(here), f"{layout.noise} of the workspace (neither run has one)"
        except NoiseFileError as e:
            raise StageError(str(e)) from None
    return {}, None


def committed_bands(
    rev: str, workspace_noise: Path, data_md5: str | None
) -> tuple[dict[str, float], list[str]]:
    """The noise bands to judge the workspace by: REV's committed noise file, else the
    workspace's (said so); with notes when the file was measured on other data than this run's."""
    notes = []
    try:
        text = git_show(rev, workspace_noise.as_posix())
        if text is not None:
            data = parse_noise(text, f"{rev}:{workspace_noise.as_posix()}")
        else:
            data = read_noise(workspace_noise)
            if data is not None:
                notes.append(f"noise band from the uncommitted {workspace_noise} (none committed at {rev})")
    except NoiseFileError as e:
        return {}, [f"noise file unreadable, not used: {e}"]
    if data is None:
        return {}, notes
    if data_md5 and data.get("data") and data["data"] != data_md5:
        notes.append(
            f"the noise band was measured on other data ({str(data['data'])[:8]}, this run {data_md5[:8]}): "
            "make noise on this data for a band that fits it"
        )
    return bands_of(data, str(workspace_noise)), notes


# --------------------------------------------------------------------------- the data version


def lock_out_md5(lock: Mapping[str, Any] | None, path: str) -> str | None:
    """The md5 that ``dvc.lock`` (parsed) records for the output ``path`` of any stage (None when
    it records none)."""
    for stage in ((lock or {}).get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, Mapping) and str(out.get("path", "")).rstrip("/") == path.rstrip("/"):
                return out.get("md5")
    return None


def lock_tracks(lock: Mapping[str, Any] | None, path: str) -> str | None:
    """The DVC output of ``dvc.lock`` that holds ``path`` (itself or a folder above it), if any."""
    for stage in ((lock or {}).get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            p = out.get("path") if isinstance(out, Mapping) else None
            if p and (path == p or path.startswith(p.rstrip("/") + "/")):
                return str(p)
    return None


# --------------------------------------------------------------------------- git and DVC at a revision


def dvc_command() -> list[str]:
    """The venv's dvc beside this interpreter when it is there (``python -m tools.X`` run
    without the venv on PATH), else whatever dvc is on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return [str(beside) if beside.is_file() else "dvc"]


def git_show(rev: str, path: str, cwd: Path | None = None) -> str | None:
    """``path`` as git holds it at ``rev`` (run in ``cwd``, default the current folder); None when
    git has no such file there (or no git)."""
    try:
        r = subprocess.run(
            ["git", "--no-optional-locks", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True
        )
    except OSError:
        return None
    return r.stdout if r.returncode == 0 else None


def dvc_json(*args: str) -> dict:
    """``dvc ARGS --json`` parsed; {} when DVC cannot answer."""
    try:
        r = subprocess.run([*dvc_command(), *args, "--json"], capture_output=True, text=True)
    except OSError:
        return {}
    try:
        out = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def dvc_metrics_diff(rev: str) -> dict:
    """``dvc metrics diff --json --all REV`` (REV against the workspace); {} when DVC cannot."""
    return dvc_json("metrics", "diff", "--all", rev)


def dvc_params_diff(rev: str) -> dict:
    """``dvc params diff --json REV``: {file: {key: {old, new}}} of the params that differ."""
    return dvc_json("params", "diff", rev)
