"""The noise file (``metrics/noise.json``, written by ``python -m tools.noise``): its format, one owner.

A metric's *band* is the largest difference two runs of the same data and params are expected to
show from training randomness alone: ``max(max - min, 2*sqrt(2)*sd)`` (the observed range, or
about two standard deviations of a difference of two runs, whichever is larger). This module
builds the file's content (:func:`noise_record`) and reads it back with its format version
checked (:func:`read_noise`, :func:`parse_noise`); ``tools.summary`` and ``make compare`` read the
bands through :func:`noise_bands` / :func:`bands_of` (via :mod:`tools.runs`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

NOISE_FILE = "metrics/noise.json"  # where make noise writes it (its default --out)
NOISE_FORMAT_VERSION = 1
SPREAD_KEYS: tuple[str, ...] = ("mean", "sd", "min", "max", "band")


class NoiseFileError(ValueError):
    """The noise file exists but cannot be read (the message names the file and what is wrong)."""


def band(values: Sequence[float]) -> float:
    """The largest difference two runs are expected to show: ``max(max - min, 2*sqrt(2)*sd)``.

    ``sd`` is the sample standard deviation (ddof 1); the sd of a difference of two independent
    runs is sqrt(2) sd, and two of those cover ~95% of them. One value: no spread known (nan)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if len(v) < 2:
        return math.nan
    return max(max(v) - min(v), 2 * math.sqrt(2) * _sd(v))


def _sd(v: Sequence[float]) -> float:
    # statistics computes exactly: identical runs give sd 0, not 1e-17
    return statistics.stdev(v) if len(v) > 1 else math.nan


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """``mean``, ``sd``, ``min``, ``max`` and ``band`` of one metric over the runs (None when no
    run has it, as JSON cannot hold nan; sd and band None with a single run)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return dict.fromkeys(SPREAD_KEYS)

    def clean(x: float) -> float | None:
        # 6 digits, as every metrics file of the pipeline: diffs show the number, not float noise
        return None if math.isnan(x) else round(x, 6)

    return {
        "mean": clean(statistics.fmean(v)),
        "sd": clean(_sd(v)),
        "min": clean(min(v)),
        "max": clean(max(v)),
        "band": clean(band(v)),
    }


def read_noise(path: str | Path) -> dict[str, Any] | None:
    """The noise file as written (None when absent); a wrong format version or shape raises
    :class:`NoiseFileError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NoiseFileError(f"{path}: cannot read it ({e.strerror})") from e
    return parse_noise(text, str(path))


def parse_noise(text: str, where: str) -> dict[str, Any]:
    """The noise file's content from its text (e.g. ``git show REV:metrics/noise.json``), checked;
    ``where`` names it in errors."""
    path = where
    try:
        data = json.loads(text)
    except ValueError as e:
        raise NoiseFileError(f"{path}: not JSON ({e}); rewrite it with make noise") from e
    if not isinstance(data, dict):
        raise NoiseFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != NOISE_FORMAT_VERSION:
        raise NoiseFileError(
            f"{path}: format_version {version!r:.40}; this code reads {NOISE_FORMAT_VERSION} (rewrite it "
            "with make noise)"
        )
    for section in ("ensemble", "members"):
        if not isinstance(data.get(section), dict):
            raise NoiseFileError(f"{path}: '{section}' is missing or not an object")
    return data


def _bands(section: Mapping[str, Any], where: str) -> dict[str, float]:
    out = {}
    for key, s in section.items():
        if not isinstance(s, dict):
            raise NoiseFileError(f"{where}.{key}: expected an object with {', '.join(SPREAD_KEYS)}")
        b = s.get("band")
        if b is None:
            continue  # not measured (one seed, or no run had the metric)
        if isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b) or b < 0:
            raise NoiseFileError(f"{where}.{key}.band: {b!r:.40} is not a non-negative number")
        out[key] = float(b)
    return out


def noise_bands(path: str | Path) -> dict[str, float]:
    """The ensemble's headline bands of the noise file ``{headline key: band}``; ``{}`` when the
    file is absent (nothing measured: callers fall back to the CI alone). Keys without a band
    (a single seed) are left out."""
    data = read_noise(path)
    return {} if data is None else bands_of(data, str(path))


def bands_of(data: Mapping[str, Any], where: str) -> dict[str, float]:
    """:func:`noise_bands` of a file already read (:func:`parse_noise`)."""
    return _bands(data["ensemble"], f"{where}: ensemble")


def member_bands(path: str | Path) -> dict[str, dict[str, float]]:
    """``{backbone: {metric: band}}`` of the noise file's members; ``{}`` when absent."""
    data = read_noise(path)
    if data is None:
        return {}
    out = {}
    for bb, m in data["members"].items():
        if not isinstance(m, dict):
            raise NoiseFileError(f"{path}: members.{bb}: expected an object of metrics")
        out[bb] = _bands(m, f"{path}: members.{bb}")
    return out


def noise_record(
    seeds: Sequence[int],
    runs: Sequence[tuple[Mapping[str, float | None], Mapping[str, Mapping[str, float | None]]]],
    **meta: Any,
) -> dict[str, Any]:
    """The noise file's content from the runs' :func:`tools.noise.run_values` (one per seed, in order):
    the spread of every ensemble headline key and of every member metric, plus ``meta``
    (``cost_s``, ``data``, ``params`` ...)."""
    if len(seeds) != len(runs):
        raise ValueError(f"{len(seeds)} seeds but {len(runs)} runs")
    keys = list(dict.fromkeys(k for ens, _ in runs for k in ens))
    ensemble = {k: spread([ens.get(k) for ens, _ in runs]) for k in keys}
    backbones = list(dict.fromkeys(bb for _, mem in runs for bb in mem))
    members = {}
    for bb in backbones:
        mkeys = list(dict.fromkeys(k for _, mem in runs for k in mem.get(bb, {})))
        members[bb] = {k: spread([mem.get(bb, {}).get(k) for _, mem in runs]) for k in mkeys}
    return {
        "format_version": NOISE_FORMAT_VERSION,
        "seeds": list(seeds),
        **meta,
        "ensemble": ensemble,
        "members": members,
        # each run's headline, so a reader can see the spread is not one outlier
        "runs": {f"seed_offset_{s}": dict(ens) for s, (ens, _) in zip(seeds, runs, strict=True)},
    }
