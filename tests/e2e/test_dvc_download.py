"""`dvc repro download` for real, in a fresh copy of the repository."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import run_cmd

pytestmark = pytest.mark.e2e


def _set_params(repo: Path, **download) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"].update(download)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.realdata
def test_repro_download_local_real_data_then_bad_params_keep_raw(repo_copy, shared_ham):
    _set_params(repo_copy, source=f"local:{shared_ham}")
    run_cmd(["dvc", "repro", "download"], repo_copy)

    raw = repo_copy / "data" / "raw"
    df = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    # counts from the source folder itself, not pasted from one copy of the data
    source_ids = {p.stem for p in (shared_ham / "images_200x150").glob("*.jpg")}
    assert set(df["image_id"]) == source_ids
    images = sorted((raw / "images").iterdir())
    assert len(images) == len(source_ids)
    for p in images[::211]:
        assert p.read_bytes() == (shared_ham / "images_200x150" / p.name).read_bytes()
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    assert lock["stages"]["download"]["outs"][0]["nfiles"] == len(source_ids) + 1  # + metadata.csv

    # a second repro is a no-op
    out = run_cmd(["dvc", "repro", "download"], repo_copy).stdout
    assert "didn't change, skipping" in out

    before = _snapshot(raw)
    for bad, message in [
        ({"sourcee": "synthetic"}, "download.sourcee: unknown key"),
        ({"source": "gopher"}, "download.source: unknown source 'gopher'"),
        ({"source": "local:/nowhere/ham"}, "local path '/nowhere/ham' does not exist"),
    ]:
        params_text = (repo_copy / "params.yaml").read_text()
        _set_params(repo_copy, **bad)
        proc = run_cmd(["dvc", "repro", "download"], repo_copy, check=False)
        assert proc.returncode != 0
        assert message in proc.stderr
        assert _snapshot(raw) == before, f"data/raw changed after failing with {bad}"
        (repo_copy / "params.yaml").write_text(params_text)
