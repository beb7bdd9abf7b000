"""The run-to-run noise of training: ``python -m tools.noise --seeds K`` (``make noise SEEDS=K``).

Re-runs train -> calibrate K times on the current data and params, each with another
``train.seed_offset`` (1..K; the data, split and every other param stay as they are), and writes
the spread of the headline metrics (ensemble) and of each member's eval metrics to
``metrics/noise.json``. A metric's *band* is the largest difference two runs of the same data and
params are expected to show from training randomness alone: ``max(max - min, 2*sqrt(2)*sd)``
(the observed range, or about two standard deviations of a difference of two runs, whichever is
larger). The file's format (writing its record, reading it back) is :mod:`tools.noisefile`'s;
``tools.summary`` and ``make compare`` read the bands through it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import write_json
from tools.noisefile import NOISE_FILE, noise_record
from tools.runs import dvc_command, git_show, lock_out_md5

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- collecting one run

# Per member, from metrics/eval/<backbone>.json: val (what the ensemble is fitted on) and test.
MEMBER_KEYS: tuple[str, ...] = (
    "val_macro_auc",
    "val_malignant_auc",
    "val_balanced_accuracy",
    "macro_auc",
    "malignant_auc",
    "balanced_accuracy",
)
# ... and its ensemble weight (metrics/ensemble.json weight_<backbone>) under this name.
WEIGHT_KEY = "weight"


def run_values(
    headline_metrics: Mapping[str, Any],
    member_metrics: Mapping[str, Mapping[str, Any]],
    ensemble_metrics: Mapping[str, Any],
) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]]:
    """One run's numbers: (ensemble headline, {member: {metric: value}}); absent keys are None."""

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    ensemble = {k: num(v) for k, v in headline_metrics.items()}
    members = {
        bb: {**{k: num(m.get(k)) for k in MEMBER_KEYS}, WEIGHT_KEY: num(ensemble_metrics.get(f"weight_{bb}"))}
        for bb, m in member_metrics.items()
    }
    return ensemble, members


def params_digest(params: Mapping[str, Any]) -> str:
    """md5 of the params a run used, ``train.seed_offset`` left out (what the seeds share)."""
    p = copy.deepcopy(dict(params))
    if isinstance(p.get("train"), dict):
        p["train"].pop("seed_offset", None)
    return hashlib.md5(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- running the seeds

# The stage whose run ends a seed: it writes the headline (metrics/headline.json) and needs every
# member retrained, evaluated and ensembled first.
TARGET = "calibrate"
SEED_KEY = "train.seed_offset"
EXP_PREFIX = "noise-s"
TAIL_LINES = 15


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # DVC runs each stage's `python -m stages.X` through PATH: this interpreter's, as make does.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def tail(text: str, n: int = TAIL_LINES) -> str:
    """The last ``n`` non-blank lines of a command's output, progress-bar redraws collapsed."""
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.splitlines()]
    return "\n".join([ln for ln in lines if ln.strip()][-n:])


class Repo:
    """Read-only git questions about the project at ``root`` (nothing here changes the worktree
    or the index: ``--no-optional-locks`` keeps even ``git status`` from refreshing it)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def git(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=self.root, capture_output=True, text=True
        )
        if check and r.returncode != 0:
            raise StageError(f"git {' '.join(args)} failed in {self.root}: {r.stderr.strip()[-500:]}")
        return r.stdout if r.returncode == 0 else ""

    def baseline(self) -> str:
        try:
            return self.git("rev-parse", "--verify", "HEAD^{commit}").strip()
        except StageError:
            raise StageError(
                f"{self.root}: not a git repository with a commit; the noise runs are DVC experiments, "
                "which start from the current commit (git commit first)"
            ) from None

    def exp_ref(self, baseline: str, name: str) -> str | None:
        """The ref DVC 3 stores experiment ``name`` of ``baseline`` under (refs/exps/ab/cdef.../name)."""
        ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
        return ref if self.git("for-each-ref", "--format=%(refname)", ref).strip() == ref else None

    def show(self, rev: str, path: str) -> str | None:
        return git_show(rev, path, self.root)

    def untracked(self) -> list[str]:
        return [p for p in self.git("ls-files", "--others", "--exclude-standard", "-z").split("\0") if p]

    def modified(self) -> list[str]:
        return [p for p in self.git("diff", "HEAD", "--name-only", "-z").split("\0") if p]

    def state(self, ignore: Sequence[str] = ()) -> str:
        """A fingerprint of the worktree and index as git sees them (status, both diffs), paths in
        ``ignore`` left out: equal before and after = the workspace was left as it was."""
        ignored = set(ignore)
        status = [
            ln for ln in self.git("status", "--porcelain=v1", "-uall").splitlines() if ln[3:] not in ignored
        ]
        h = hashlib.md5("\n".join(status).encode())
        for args in (("diff", "--binary"), ("diff", "--cached", "--binary")):
            h.update(self.git(*args, "--", ".", *(f":(exclude){p}" for p in ignored)).encode())
        return h.hexdigest()


def code_paths(dvc_yaml: Mapping[str, Any]) -> set[str]:
    """The folders and files of the stages' code (``deps`` that are not templated outputs of
    other stages), as written in dvc.yaml: what a run cannot do without."""
    outs = set()
    deps = set()
    for stage in (dvc_yaml.get("stages") or {}).values():
        body = (stage or {}).get("do", stage) or {}
        for o in body.get("outs") or []:
            outs.add(str(next(iter(o)) if isinstance(o, dict) else o))
        for d in body.get("deps") or []:
            if "${" not in str(d):
                deps.add(str(d))
    return {d for d in deps if d not in outs}


def missing_from_runs(untracked: Sequence[str], code: set[str]) -> list[str]:
    """The untracked files a ``--temp`` run would lack that the pipeline needs: code deps, the
    params and dvc.yaml, or a file beside a code dep (a new module the listed ones import)."""
    folders = {str(Path(d).parent) for d in code if Path(d).suffix}
    return [
        p
        for p in untracked
        if p in code
        or p in ("params.yaml", "dvc.yaml")
        or (p.endswith(".py") and str(Path(p).parent) in folders)
    ]


def run_seed(repo: Repo, name: str, seed: int, sets: Sequence[str], log_path: Path) -> None:
    """``dvc exp run --temp -n NAME -S train.seed_offset=SEED [-S ...] calibrate``, its output
    in ``log_path``; a failure raises with dvc's last lines."""
    cmd = [*dvc_command(), "exp", "run", "--temp", "-n", name, "-S", f"{SEED_KEY}={seed}"]
    for s in sets:
        cmd += ["-S", s]
    cmd.append(TARGET)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=repo.root, stdout=fh, stderr=subprocess.STDOUT, env=_env()).returncode
    if rc != 0:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        raise StageError(
            f"seed {seed} ({SEED_KEY}={seed}): dvc exp run failed (exit {rc}); its last lines:\n"
            + "\n".join("  " + ln for ln in tail(text).splitlines())
            + f"\nfull log: {log_path}"
        )


def collect(repo: Repo, ref: str, seed: int, metrics_dir: str) -> tuple[dict[str, Any], tuple]:
    """(the run's params, its :func:`run_values`) read from the experiment commit ``ref``."""
    from skinlesion.measure.paired import headline
    from skinlesion.measure.scoring import IMAGE_ONLY_SUFFIX

    def load(path: str) -> dict[str, Any] | None:
        text = repo.show(ref, path)
        if text is None:
            return None
        try:
            data = yaml.safe_load(text) if path.endswith((".yaml", ".lock")) else json.loads(text)
        except ValueError as e:
            raise StageError(f"seed {seed}: {path} of experiment {ref} is not readable: {e}") from None
        return data if isinstance(data, dict) else None

    params = load("params.yaml") or {}
    head = load(f"{metrics_dir}/headline.json")
    if head is None:
        cal = load(f"{metrics_dir}/calibration.json")
        if cal is None:
            raise StageError(
                f"seed {seed}: experiment {ref} has neither {metrics_dir}/headline.json nor "
                f"{metrics_dir}/calibration.json: the {TARGET} stage did not write its metrics"
            )
        suffixes = ("", IMAGE_ONLY_SUFFIX) if any(k.endswith(IMAGE_ONLY_SUFFIX) for k in cal) else ("",)
        head = headline(cal, suffixes)
    members = list((params.get("ensemble") or {}).get("members") or [])
    member_metrics = {}
    for bb in members:
        m = load(f"{metrics_dir}/eval/{bb}.json")
        if m is None:
            raise StageError(
                f"seed {seed}: experiment {ref} has no {metrics_dir}/eval/{bb}.json (member {bb})"
            )
        member_metrics[bb] = m
    ensemble = load(f"{metrics_dir}/ensemble.json") or {}
    lock = load("dvc.lock") or {}
    return {"params": params, "lock": lock}, run_values(head, member_metrics, ensemble)


def run(
    seeds: Sequence[int],
    *,
    repo: Path,
    out: Path,
    metrics_dir: str = "metrics",
    raw: str = "data/raw",
    sets: Sequence[str] = (),
    remove: bool = False,
) -> dict[str, Any]:
    """Run one experiment per seed offset, then write the noise file to ``out`` (returned)."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 1 for s in seeds):
        raise StageError(
            f"--seeds: seed offsets must be distinct and >= 1 (0 is the committed run), got {seeds}"
        )
    git = Repo(repo)
    baseline = git.baseline()
    out_rel = os.path.relpath(Path(out).resolve(), Path(repo).resolve())
    dvc_yaml = yaml.safe_load((Path(repo) / "dvc.yaml").read_text(encoding="utf-8")) or {}
    lacking = missing_from_runs(git.untracked(), code_paths(dvc_yaml))
    if lacking:
        raise StageError(
            "untracked files the runs need would be missing from them (dvc exp run --temp copies only "
            f"files git knows): {', '.join(lacking)}; commit them or `git add` them first"
        )
    changed = [p for p in git.modified() if p != out_rel]
    if changed:
        log.warning(
            "uncommitted changes are part of every run (as dvc exp run takes them): %s", _listing(changed)
        )
    before = git.state(ignore=[out_rel])
    logs = Path(repo) / ".dvc" / "tmp" / "noise"
    runs, seconds, created, contexts = [], [], [], []
    t_all = time.perf_counter()
    try:
        for i, seed in enumerate(seeds, 1):
            name = f"{EXP_PREFIX}{seed}"
            if git.exp_ref(baseline, name):
                log.info("replacing experiment %s of an earlier noise run on this commit", name)
                _dvc_quiet(git, "exp", "remove", name)
            log.info(
                "seed %d/%d: dvc exp run --temp -n %s -S %s=%d%s %s (log: %s)",
                i,
                len(seeds),
                name,
                SEED_KEY,
                seed,
                "".join(f" -S {s}" for s in sets),
                TARGET,
                logs / f"{name}.log",
            )
            t0 = time.perf_counter()
            run_seed(git, name, seed, sets, logs / f"{name}.log")
            seconds.append(time.perf_counter() - t0)
            created.append(name)
            ref = git.exp_ref(baseline, name)
            if ref is None:
                now = git.baseline()
                if now != baseline:
                    raise StageError(
                        f"seed {seed}: HEAD moved from {baseline[:7]} to {now[:7]} while the noise runs ran "
                        "(a commit or checkout): the experiments belong to different commits; run make "
                        "noise again and commit only after it ends"
                    )
                raise StageError(
                    f"seed {seed}: dvc exp run succeeded but experiment {name} is not under refs/exps"
                )
            context, values = collect(git, ref, seed, metrics_dir)
            contexts.append(context)
            runs.append(values)
            eta = sum(seconds) / len(seconds) * (len(seeds) - i)
            shown = ", ".join(
                f"{k} {v:.4f}"
                for k, v in values[0].items()
                if k in ("macro_auc", "malignant_auc") and v is not None
            )
            log.info("seed %d/%d done in %s (%s); ETA %s", i, len(seeds), _hms(seconds[-1]), shown, _hms(eta))
    finally:
        if remove and created:
            _dvc_quiet(git, "exp", "remove", *created)
    cost = time.perf_counter() - t_all
    if not changed:
        # The committed run is one more run of the same data, params and code (seed offset 0):
        # it counts when its record says so, which makes the spread of K + 1 runs for K's cost.
        committed = _committed_run(git, baseline, metrics_dir, raw, contexts[0])
        if committed is not None:
            seeds, contexts, runs = [0, *seeds], [committed[0], *contexts], [committed[1], *runs]
    record = noise_record(
        seeds,
        runs,
        cost_s=round(cost, 1),
        seconds_per_seed=[round(s, 1) for s in seconds],
        base_seed=(contexts[0]["params"].get("base") or {}).get("seed"),
        data=_same(contexts, seeds, lambda c: lock_out_md5(c["lock"], raw), f"{raw} md5"),
        params=_same(contexts, seeds, lambda c: params_digest(c["params"]), "params (all but the seed)"),
        set=list(sets),
        baseline=baseline,
        experiments=[] if remove else created,
    )
    workspace_lock = yaml.safe_load((Path(repo) / "dvc.lock").read_text(encoding="utf-8")) or {}
    if record["data"] != lock_out_md5(workspace_lock, raw):
        log.warning(
            "the runs used %s %s, the workspace's dvc.lock records %s: the noise is of that data "
            "(the workspace pipeline was not up to date: dvc status)",
            raw,
            record["data"],
            lock_out_md5(workspace_lock, raw),
        )
    write_json(out, record)
    if git.state(ignore=[out_rel]) != before:
        log.warning(
            "the workspace changed while the noise runs ran (git status differs from before): "
            "another process, or dvc touched it; check git status"
        )
    return record


def _committed_run(
    git: Repo, baseline: str, metrics_dir: str, raw: str, like: Mapping[str, Any]
) -> tuple[dict[str, Any], tuple] | None:
    """The run committed at ``baseline`` as a (context, values) like :func:`collect` gives, when
    its data version and params (but the seed) are those of the noise runs; else None (said)."""
    try:
        context, values = collect(git, baseline, 0, metrics_dir)
    except StageError as e:
        log.info("the committed run is not counted: %s", e)
        return None
    if lock_out_md5(context["lock"], raw) != lock_out_md5(like["lock"], raw) or params_digest(
        context["params"]
    ) != params_digest(like["params"]):
        log.info("the committed run is not counted: its data version or params differ from the runs'")
        return None
    if (context["params"].get("train") or {}).get("seed_offset", 0) != 0:
        log.info("the committed run is not counted: its train.seed_offset is not 0")
        return None
    log.info("the committed run (%s, seed offset 0) is counted with the new runs", baseline[:7])
    return context, values


def _same(contexts: Sequence[Mapping[str, Any]], seeds: Sequence[int], get: Any, what: str) -> Any:
    values = [get(c) for c in contexts]
    for s, v in zip(seeds, values, strict=True):
        if v != values[0]:
            raise StageError(
                f"seed {s} ran with other {what} ({v}) than seed {seeds[0]} ({values[0]}): not noise of one "
                "setup; is another process changing the workspace?"
            )
    return values[0]


def _dvc_quiet(repo: Repo, *args: str) -> None:
    r = subprocess.run([*dvc_command(), *args], cwd=repo.root, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise StageError(f"dvc {' '.join(args)} failed: {tail(r.stdout + r.stderr, 5)}")


def _listing(paths: Sequence[str], n: int = 10) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------- CLI


def _bands_text(bands: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in bands.items()) or "none"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.noise",
        description="Measure the run-to-run noise of training: train -> calibrate once per seed offset "
        "as DVC experiments (the workspace is not touched), then write the spread of every headline "
        "metric to a metrics file.",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        required=True,
        metavar="K",
        help="new runs, with train.seed_offset 1..K; the committed run (offset 0) joins them when its "
        "data, params and code are the same",
    )
    ap.add_argument("--first", type=int, default=1, help="first seed offset (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path(NOISE_FILE), help="default: %(default)s")
    ap.add_argument(
        "--metrics", default="metrics", help="the pipeline's metrics folder (default: %(default)s)"
    )
    ap.add_argument(
        "--raw", default="data/raw", help="the raw data output whose md5 is recorded (default: %(default)s)"
    )
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: %(default)s")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more params override for every run (repeatable), e.g. train.common.epochs=1",
    )
    ap.add_argument(
        "--remove",
        action="store_true",
        help="remove the experiments after reading them (default: keep them as noise-s<N> "
        "for dvc exp show / make compare)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        if args.seeds < 1:
            raise StageError(f"--seeds {args.seeds}: give at least 1 (2 or more for a band)")
        if args.seeds < 2:
            log.warning("--seeds 1: one run has no spread; the file will hold no band")
        from tools.profile import build_overrides

        if any(s.partition("=")[0].strip() == SEED_KEY for s in args.set):
            raise StageError(f"--set {SEED_KEY}: the noise runs set it themselves ({args.first}..)")
        overrides = build_overrides(args.params, {}, args.set)
        sets = [f"{k}={v}" for k, v in overrides.items()]
        seeds = list(range(args.first, args.first + args.seeds))
        record = run(
            seeds,
            repo=Path.cwd(),
            out=args.out,
            metrics_dir=args.metrics,
            raw=args.raw,
            sets=sets,
            remove=args.remove,
        )
        bands = {k: s["band"] for k, s in record["ensemble"].items() if s["band"] is not None}
        log.info(
            "%s: %d seeds in %s (%s per seed); bands: %s",
            args.out,
            len(seeds),
            _hms(record["cost_s"]),
            _hms(record["cost_s"] / len(seeds)),
            _bands_text(bands),
        )
        if record["experiments"]:
            log.info(
                "experiments kept: %s (dvc exp show; dvc exp remove %s to drop them)",
                ", ".join(record["experiments"]),
                " ".join(record["experiments"]),
            )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
