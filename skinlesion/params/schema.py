"""Typed, validated view of ``params.yaml``: the loader every section schema shares.

``params.yaml`` is read here and nowhere else. Every section becomes a frozen dataclass; the
loader walks the dataclass fields, so an unknown or misspelled key, a missing key, a wrong type
or a value out of range fails at load time with a message naming the full key
(``split.fractions.train``), never later as a ``KeyError`` deep inside a stage.

Bounds live next to the field (``bounded(0.7, lo=0, hi=1)``), choices are ``Literal`` types, and
rules that tie several fields together live in ``__post_init__`` and raise :class:`ParamsError`.
Each section's dataclass lives in its own module (``skinlesion.params.<section>``), so a DVC stage
depends only on the schemas it reads; a stage loads just those sections with :func:`load_sections`
(the whole file, with its cross-section rules, is :mod:`skinlesion.params.load`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from skinlesion.core.errors import ParamsError

__all__ = ["ParamsError", "bounded", "build_section", "inside_repo", "load_sections", "read_params_file"]


def bounded(default: Any, *, lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    """A dataclass field with inclusive numeric bounds checked by the loader."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or default_factory for mutable defaults")
    return field(default=default, metadata={"lo": lo, "hi": hi}, **kw)


# Inside the repository but never ours to write: git's and DVC's own folders (a hook is code).
_NOT_WRITABLE = (".git", ".dvc")


def inside_repo(key: str, value: str) -> None:
    """A path the pipeline *writes* must stay inside the repository: relative, no ``..``, no
    ``~`` (the monitor flow expands it), not the root itself, not in .git or .dvc. A params
    change (``dvc exp run -S``, a deployment's overrides) must not write anywhere else.
    Paths the pipeline only reads (download.source, download.extra_sources, drift.new_images,
    drift.inbox) may be anywhere."""
    why = ""
    p = Path(value)
    if not value.strip():
        why = "an empty path"
    elif p.is_absolute() or value.startswith("\\"):
        why = "an absolute path"
    elif value.startswith("~"):
        why = "a home-relative path"
    elif ".." in p.parts:
        why = "a path through '..'"
    elif not p.parts:
        why = "the repository root itself"
    elif p.parts[0] in _NOT_WRITABLE:
        why = f"inside {p.parts[0]}/ ({p.parts[0][1:]}'s own folder)"
    if why:
        raise ParamsError(
            f"{key}: {value!r} must be a relative path inside the repository, e.g. 'data/monitor', "
            f"not {why}: the pipeline writes there"
        )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's shape."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping of keys, got {value!r}")
        return build_section(tp, value, f"{key}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, arm, key)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        # YAML's `1e3` is a float and `true` is a bool: neither is an int here.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ParamsError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {_type_name(tp)}")  # a bug in this module


def build_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ParamsError(f"{prefix}{key}: unknown key{hint}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            continue  # the dataclass default applies
        value = _convert(raw[name], hints[name], key)
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if value is None:  # an optional knob left unset: no bounds to check
            kwargs[name] = value
            continue
        if lo is not None and value < lo:
            raise ParamsError(f"{key}: {value!r} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ParamsError(f"{key}: {value!r} is above the maximum {hi}")
        kwargs[name] = value
    return cls(**kwargs)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The parsed ``params.yaml`` mapping; :class:`ParamsError` names the file when it is missing or bad."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: params: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


class Sections(types.SimpleNamespace):
    """The sections one stage reads (``sections.split``, ``sections.base.seed``)."""


def load_sections(path: str | Path, **schemas: type) -> Sections:
    """Read only the named sections of ``params.yaml`` (``load_sections(p, split=SplitParams)``).

    A stage reads its own sections and imports only their schemas, so DVC reruns it when those
    change and not when, say, the promotion gate's section does. A missing section takes the
    dataclass defaults; an unknown key inside one fails naming it, exactly as the full loader."""
    raw = read_params_file(path)
    out = {}
    for name, cls in schemas.items():
        try:
            out[name] = build_section(cls, raw.get(name) or {}, f"{name}.")
        except ParamsError as e:
            raise ParamsError(f"{path}: {e}") from None
    return Sections(**out)
