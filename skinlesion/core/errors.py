"""The two expected failures: their message is for the user, so no traceback is shown."""

from __future__ import annotations


class StageError(RuntimeError):
    """An expected failure with a message meant for the user (no traceback is shown)."""


class ParamsError(ValueError):
    """A problem in params.yaml; the message always names the key."""
