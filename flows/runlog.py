"""The logger a flow's helpers write to: Prefect's run logger inside a flow or task run (its lines
reach the Prefect UI), the caller's module logger outside one (``task.fn()`` in tests, a helper
called directly)."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

__all__ = ["run_logger"]


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """The run logger; ``logging.getLogger(name)`` when there is no run (pass ``__name__``)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)
