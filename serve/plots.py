"""The evaluation figures the web app shows beside the model card, found in the metrics folder.

The pipeline writes them (``dvc.yaml``'s ``plots:``): per member ``eval/<bb>/confusion_normalized.png``,
``eval/<bb>/confidence_grid.png``, ``eval/<bb>/roc/<class>.csv`` and the DVCLive training curves
``train/<bb>/plots/metrics/{train,val}/<metric>.tsv``; for the ensemble
``ensemble/confusion_normalized.png`` and ``ensemble/roc/``; ``calibration/reliability.png``.
PNGs are served as they are; ROC curves and training histories are drawn here (matplotlib's
object API, no pyplot: safe in a server's threads) once, on first request.

A figure is reached by its key in :func:`find_figures`'s table, never by a path from a request.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HISTORY_METRICS = ("loss", "accuracy", "macro_auc", "macro_f1")


@dataclass
class Figure:
    key: str
    title: str
    section: str
    render: Callable[[], bytes]
    _png: bytes | None = field(default=None, repr=False)

    def png(self) -> bytes:
        if self._png is None:
            self._png = self.render()
        return self._png


def _file(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _read_table(path: Path, delimiter: str) -> dict[str, list[float]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter=delimiter))
    cols: dict[str, list[float]] = {k: [] for k in (rows[0] if rows else {})}
    for row in rows:
        for k, v in row.items():
            try:
                cols[k].append(float(v))
            except (TypeError, ValueError):
                cols[k].append(float("nan"))
    return cols


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _roc(folder: Path, title: str) -> Callable[[], bytes]:
    def render() -> bytes:
        from matplotlib.figure import Figure as MplFigure

        fig = MplFigure(figsize=(5.2, 4.6))
        ax = fig.add_subplot()
        for path in sorted(folder.glob("*.csv")):
            t = _read_table(path, ",")
            if "fpr" in t and "tpr" in t:
                style = {"lw": 2.5, "color": "black"} if path.stem == "malignant" else {"lw": 1.2}
                ax.plot(t["fpr"], t["tpr"], label=path.stem, **style)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(
            xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1)
        )
        ax.legend(loc="lower right", fontsize=8)
        return _png(fig)

    return render


def _history(folder: Path, title: str) -> Callable[[], bytes]:
    def render() -> bytes:
        from matplotlib.figure import Figure as MplFigure

        metrics = [
            m for m in HISTORY_METRICS if any((folder / s / f"{m}.tsv").is_file() for s in ("train", "val"))
        ]
        fig = MplFigure(figsize=(4.0 * max(1, len(metrics)), 3.4))
        for i, metric in enumerate(metrics):
            ax = fig.add_subplot(1, len(metrics), i + 1)
            for split in ("train", "val"):
                path = folder / split / f"{metric}.tsv"
                if path.is_file():
                    t = _read_table(path, "\t")
                    ax.plot(t.get("step", []), t.get(metric, []), marker=".", label=split)
            ax.set(xlabel="epoch", title=metric)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        return _png(fig)

    return render


def find_figures(metrics_dir: Path | None, members: Sequence[str]) -> list[Figure]:
    """The figures present under ``metrics_dir``, in page order; missing ones are left out."""
    if metrics_dir is None or not metrics_dir.is_dir():
        return []
    out: list[Figure] = []

    def add(
        key: str, title: str, section: str, path: Path, render: Callable[[], bytes] | None = None
    ) -> None:
        if path.exists():
            out.append(Figure(key, title, section, render or _file(path)))

    add("ensemble-confusion", "Confusion matrix (row-normalised), ensemble, test", "Ensemble",
        metrics_dir / "ensemble" / "confusion_normalized.png")  # fmt: skip
    add("ensemble-roc", "ROC curves, ensemble, test", "Ensemble", metrics_dir / "ensemble" / "roc",
        _roc(metrics_dir / "ensemble" / "roc", "ensemble (test)"))  # fmt: skip
    add("calibration-reliability", "Reliability diagram before and after temperature scaling",
        "Calibration", metrics_dir / "calibration" / "reliability.png")  # fmt: skip
    for name in members:
        section = f"Member {name}"
        ev = metrics_dir / "eval" / name
        add(f"{name}-confusion", f"Confusion matrix (row-normalised), {name}, test", section,
            ev / "confusion_normalized.png")  # fmt: skip
        add(
            f"{name}-roc",
            f"ROC curves, {name}, test",
            section,
            ev / "roc",
            _roc(ev / "roc", f"{name} (test)"),
        )
        add(f"{name}-confidence", f"Confidence of right and wrong predictions, {name}", section,
            ev / "confidence_grid.png")  # fmt: skip
        hist = metrics_dir / "train" / name / "plots" / "metrics"
        add(f"{name}-history", f"Training history, {name}", section, hist, _history(hist, f"{name} training"))
    return out
