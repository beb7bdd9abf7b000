"""Fixtures of the model tests: a tiny real prepared folder (tests/builders/training.make_prepared),
built once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builders.training import make_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prep"))
