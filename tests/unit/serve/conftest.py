"""Fixtures of the serving tests: one small bundle (an untrained custom CNN, as calibrate lays it
out: tests/builders/bundles.make_bundle) and its predictor, built once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.predictor import Predictor
from tests.builders.bundles import make_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def predictor(bundle_dir) -> Predictor:
    return Predictor.load(bundle_dir)
