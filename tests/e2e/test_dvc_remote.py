"""DVC remotes for real: ``dvc push`` / ``dvc pull`` against an S3-compatible server (moto on
127.0.0.1) and against the default local remote of ``.dvc/config``, and the flows' push helper
(``flows.dvcops.push_to_remote``) after a promotion, including a push that fails."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from flows.dvcops import Layout, PushFailed, push_to_remote
from flows.promote import dvc_track, promote_bundle
from tests.conftest import REPO, run_cmd
from tests.integration.toy_pipeline import make_toy_repo

pytestmark = pytest.mark.e2e

DVC = [sys.executable, "-m", "dvc"]
BUCKET = "skinlesion-test"
# A download that takes a second: the real stage, drawing a few tiny synthetic images.
TINY_DOWNLOAD = {"synthetic": {"n_images": 24, "width": 32, "height": 32}}


def dvc(repo: Path, *args: str, check: bool = True):
    return run_cmd([*DVC, *args], repo, check=check, timeout=600)


def _hashes(repo: Path, *folders: str) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted((repo / folder).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(repo))] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert out, f"nothing under {folders}"
    return out


def _status(repo: Path, *args: str) -> dict:
    """``dvc status [--cloud] --json``: {} when the workspace (or the remote) is in sync."""
    return json.loads(dvc(repo, "status", *args, "--json").stdout or "{}")


def _tiny_download(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"].update(TINY_DOWNLOAD)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _wipe(repo: Path, *outputs: str) -> None:
    """What a fresh machine has: no DVC cache, no outputs."""
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in outputs:
        shutil.rmtree(repo / out)


@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """Credentials for the fake server only: never a profile or a config file of the user's."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the dvc subprocesses inherit them
    return env


@pytest.fixture
def s3_server(aws_env):
    """moto's S3 on 127.0.0.1 (a free port) with an empty bucket; yields (endpoint, client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        server.stop()


def _objects(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _add_s3_remote(repo: Path, endpoint: str) -> None:
    """A team's override, as docs/operations.md shows it: in .dvc/config.local, not in git."""
    dvc(repo, "remote", "add", "--local", "-d", "team", f"s3://{BUCKET}/skinlesion")
    dvc(repo, "remote", "modify", "--local", "team", "endpointurl", endpoint)


# --------------------------------------------------------------------------- S3 (moto)


def test_s3_remote_push_wipe_pull_restores_identical_outputs(repo_copy, s3_server):
    endpoint, client = s3_server
    _tiny_download(repo_copy)
    _add_s3_remote(repo_copy, endpoint)
    assert dvc(repo_copy, "remote", "default").stdout.strip() == "team"

    dvc(repo_copy, "repro", "download")
    before = _hashes(repo_copy, "data/raw")
    lock = (repo_copy / "dvc.lock").read_text()
    assert len(before) == 25  # 24 images + metadata.csv

    out = dvc(repo_copy, "push").stdout
    assert "26 files pushed" in out, out  # 25 files + the directory listing (.dir)
    stored = _objects(client, "skinlesion/files/md5/")
    assert len(stored) == 26 and any(k.endswith(".dir") for k in stored), stored
    assert _status(repo_copy, "--cloud") == {}  # the remote holds everything dvc.lock names

    _wipe(repo_copy, "data/raw")
    assert _status(repo_copy, "download") != {}  # sanity: the workspace really lost its outputs
    out = dvc(repo_copy, "pull", "download").stdout  # the stages this copy ran (not the others)
    assert "26 files fetched" in out, out

    assert _hashes(repo_copy, "data/raw") == before
    assert (repo_copy / "dvc.lock").read_text() == lock
    assert _status(repo_copy, "download") == {}
    assert _status(repo_copy, "--cloud") == {}
    # The override stayed out of the tracked config: the project default is still the local one.
    assert run_cmd(["git", "status", "--porcelain", ".dvc/config"], repo_copy).stdout == ""


# --------------------------------------------------------------------------- the default remote


def test_default_local_remote_works_on_a_fresh_clone_and_can_be_overridden(repo_copy, tmp_path):
    """.dvc/config's remote is a folder beside the clone: here tmp_path/skinlesion-dvc-remote,
    never the real one beside the project. A second clone on the machine pulls what the first
    pushed; `dvc remote add --local -d` redirects a clone without touching the tracked config."""
    shared = tmp_path / "skinlesion-dvc-remote"
    assert dvc(repo_copy, "remote", "default").stdout.strip() == "local-store"
    assert dvc(repo_copy, "config", "remote.local-store.url").stdout.strip() == str(shared)

    _tiny_download(repo_copy)
    dvc(repo_copy, "repro", "download")
    before = _hashes(repo_copy, "data/raw")
    assert "26 files pushed" in dvc(repo_copy, "push").stdout
    assert len(list((shared / "files" / "md5").rglob("*"))) > 26  # the objects and their folders
    assert _status(repo_copy, "--cloud") == {}
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    run_cmd([*git, "add", "-A"], repo_copy)
    run_cmd([*git, "commit", "-qm", "data version"], repo_copy)

    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    assert not (clone / "data" / "raw").exists()
    dvc(clone, "pull", "download")
    assert _hashes(clone, "data/raw") == before
    assert _status(clone, "download") == {}

    _wipe(repo_copy, "data/raw")  # the first clone too can start over from the remote
    dvc(repo_copy, "pull", "download")
    assert _hashes(repo_copy, "data/raw") == before and _status(repo_copy, "download") == {}

    mine = tmp_path / "elsewhere"
    dvc(clone, "remote", "add", "--local", "-d", "mine", str(mine))
    assert "26 files pushed" in dvc(clone, "push").stdout
    assert _status(clone, "--cloud") == {}
    assert len(list((mine / "files" / "md5").rglob("*.dir"))) == 1
    assert run_cmd(["git", "status", "--porcelain"], clone).stdout == ""  # config.local is ignored


# --------------------------------------------------------------------------- the flows' push


def _toy_with_project_remote(tmp_path: Path) -> tuple[Path, Path]:
    """The toy pipeline (stages of milliseconds) with the project's .dvc/config: its default
    remote resolves to tmp_path/skinlesion-dvc-remote."""
    toy = make_toy_repo(tmp_path / "toy")
    shutil.copyfile(REPO / ".dvc" / "config", toy / ".dvc" / "config")
    return toy, tmp_path / "skinlesion-dvc-remote"


def _promote(toy: Path) -> Layout:
    """What the retrain flow does after a passing gate: copy the bundle, `dvc add` production."""
    layout = Layout(toy)
    promote_bundle(layout, {"git_tag": None, "metrics": {}})
    dvc_track(layout)
    return layout


def test_push_helper_pushes_the_run_and_the_promoted_bundle(tmp_path):
    toy, remote = _toy_with_project_remote(tmp_path)
    dvc(toy, "repro")
    _promote(toy)
    assert _status(toy, "--cloud") != {}  # not pushed yet: the remote lacks everything

    result = push_to_remote(toy)
    assert (result.remote, result.url) == ("local-store", str(remote))
    assert result.files_pushed > 0
    assert _status(toy, "--cloud") == {}  # every output of dvc.lock and models/production.dvc
    prod = yaml.safe_load((toy / "models" / "production.dvc").read_text())["outs"][0]["md5"]
    assert (remote / "files" / "md5" / prod[:2] / prod[2:]).is_file()  # production's listing
    assert any((remote / "runs").iterdir())  # the run cache, for another machine's repro --pull
    # Nothing new: the outputs are not sent again (run-cache entries are always re-sent).
    assert push_to_remote(toy, run_cache=False).files_pushed == 0


def _break_local_remote(toy: Path, tmp_path: Path) -> str:
    """A remote that answers reads ("not there") and refuses every write."""
    broken = tmp_path / "broken-remote"
    broken.mkdir()
    (broken / "files").write_text("a file where the object folder should be")
    dvc(toy, "remote", "modify", "--local", "local-store", "url", str(broken))
    return "local-store"


def _unreachable_s3(toy: Path, tmp_path: Path) -> str:
    # Nothing listens on port 9 (discard): a network failure, which a retry may fix.
    dvc(toy, "remote", "add", "--local", "-d", "team", f"s3://{BUCKET}/skinlesion")
    dvc(toy, "remote", "modify", "--local", "team", "endpointurl", "http://127.0.0.1:9")
    return "team"


@pytest.mark.parametrize(
    "breaker, transient", [(_break_local_remote, False), (_unreachable_s3, True)], ids=["refused", "offline"]
)
def test_push_failure_is_a_clear_error_and_undoes_nothing(tmp_path, aws_env, breaker, transient):
    toy, _ = _toy_with_project_remote(tmp_path)
    (toy / "models" / "ensemble").mkdir(parents=True)  # a candidate bundle, as calibrate leaves it
    (toy / "models" / "ensemble" / "bundle.json").write_text('{"threshold": 0.2}')
    _promote(toy)
    prod = toy / "models" / "production"
    tracked = (toy / "models" / "production.dvc").read_text()
    before = _hashes(toy, "models/production")
    name = breaker(toy, tmp_path)

    with pytest.raises(PushFailed) as e:
        push_to_remote(toy)
    message = str(e.value)
    assert message.startswith(f"dvc push to remote {name!r} (")
    assert "nothing local was changed or undone (a promotion made before the push stands)" in message
    assert f"run `dvc push --run-cache` in {toy}" in message
    assert e.value.remote == name and e.value.transient is transient
    assert ("Not a directory" if not transient else "Could not connect to the endpoint URL") in message

    assert _hashes(toy, "models/production") == before and (prod / "production.json").is_file()
    assert (toy / "models" / "production.dvc").read_text() == tracked
    assert _status(toy, "models/production.dvc") == {}  # the local record is intact


def test_push_without_any_remote_says_so(tmp_path):
    toy = make_toy_repo(tmp_path / "toy")  # `dvc init` only: no remote
    with pytest.raises(PushFailed, match=r"no default DVC remote is set .*nothing was pushed"):
        push_to_remote(toy)


@pytest.mark.slow  # a Prefect test API and the whole toy pipeline: about 100 s on 2 busy cores
def test_retrain_flow_keeps_its_promotion_when_the_push_fails(tmp_path, monkeypatch, prefect_api):
    """The flow promotes, then pushes (flows/retrain.py): a remote that refuses the push fails
    the run and says so, and the promotion (production, its .dvc file, the git tag) stands."""
    from flows.retrain import retrain

    toy, _ = _toy_with_project_remote(tmp_path)
    _break_local_remote(toy, tmp_path)
    monkeypatch.chdir(toy)  # the flow works on the repository it runs in
    state = retrain(return_state=True)

    assert state.is_failed()
    assert "dvc push" in state.message and "Not a directory" in state.message, state.message
    record = json.loads((toy / "models" / "production" / "production.json").read_text())
    assert record["git_tag"].startswith("model-")
    tags = run_cmd(["git", "tag"], toy).stdout.split()
    assert tags == [record["git_tag"]]
    assert _status(toy, "models/production.dvc") == {}
