"""Training's per-epoch metrics for ``dvc plots``: DVCLive (``<live>/plots/metrics/{train,val}/<name>.tsv``
and ``<live>/metrics.json``), or the same files written directly when DVCLive cannot start."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["PlainLive", "live_log", "open_live"]


def live_log(live: Any, row: dict[str, float]) -> None:
    """One history row (an epoch) as one DVCLive step: ``train/<key>`` and ``val/<key>``."""
    if live is None:
        return
    live.step = int(row["epoch"])
    for key in ("loss", "accuracy", "lr", "seconds", "images_per_s"):
        if key in row:
            live.log_metric(f"train/{key}", row[key])
    for key in ("loss", "accuracy", "macro_auc", "macro_f1"):
        if f"val_{key}" in row:
            live.log_metric(f"val/{key}", row[f"val_{key}"])
    live.next_step()


class PlainLive:
    """DVCLive's metric files (``plots/metrics/<name>.tsv``, ``metrics.json``) without DVCLive.

    Used only when DVCLive cannot start: dvclive 3.49 raises "Empty git repo" inside a git
    repository that has no commit yet (a fresh ``git init``), and the plots declared in
    dvc.yaml must exist all the same.
    """

    def __init__(self, directory: Path):
        self.dir, self.step = Path(directory), 0
        shutil.rmtree(self.dir / "plots" / "metrics", ignore_errors=True)
        self.latest: dict[str, float] = {}

    def log_metric(self, name: str, value: float) -> None:
        path = self.dir / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(f"step\t{name.rsplit('/', 1)[-1]}\n")
            fh.write(f"{self.step}\t{value}\n")
        self.latest[name] = value

    def next_step(self) -> None:
        summary: dict[str, Any] = {"step": self.step}
        for name, value in self.latest.items():
            group, _, key = name.rpartition("/")
            summary.setdefault(group, {})[key] = value
        (self.dir / "metrics.json").write_text(json.dumps(summary, indent=4, allow_nan=True) + "\n")
        self.step += 1

    def end(self) -> None:
        pass


def open_live(live_dir: Path | None) -> Any:
    """The logger for ``live_dir`` (None: no logging): DVCLive, else :class:`PlainLive`."""
    if live_dir is None:
        return None
    from dvclive import Live

    try:
        # dvcyaml=None: the plots are declared in the project's dvc.yaml; DVCLive must not write one.
        return Live(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
    except Exception as e:  # scmrepo's SCMError("Empty git repo") and kin: logging must not stop training
        log.warning("DVCLive could not start (%s); writing its plot files directly to %s", e, live_dir)
        return PlainLive(live_dir)
