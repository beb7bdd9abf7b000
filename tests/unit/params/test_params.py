"""params.yaml is read in one place; every mistake names its key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from skinlesion.core.errors import ParamsError
from skinlesion.params.load import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[3]


def test_repo_params_yaml_loads_and_matches_defaults_for_every_key():
    """The shipped params.yaml is valid and spells out every key the code knows."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)

    def keys(obj, prefix=""):
        out = set()
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            out |= keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else {prefix + f.name}
        return out

    def yaml_keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out |= yaml_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    assert keys(params) == yaml_keys(raw)


def test_params_are_frozen():
    p = parse_params({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.base.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"splt": {}}, "splt: unknown key (did you mean 'split'?)"),
        ({"split": {"hash_radus": 3}}, "split.hash_radus: unknown key (did you mean 'split.hash_radius'?)"),
        ({"download": {"synthetic": {"n_image": 5}}}, "download.synthetic.n_image: unknown key"),
        (
            {"download": {"synthetic": {"profile": "clinic_x"}}},
            "download.synthetic.profile: 'clinic_x' is not one of ['default', 'clinic_b', 'clinic_c']",
        ),
        ({"download": {"extra_sources": "../batch"}}, "download.extra_sources: expected a list"),
        ({"download": {"extra_sources": [3]}}, "download.extra_sources[0]: expected a string, got 3"),
        ({"base": {"seed": "42"}}, "base.seed: expected an integer, got '42'"),
        ({"base": {"seed": 4.0}}, "base.seed: expected an integer"),
        ({"base": {"seed": -1}}, "base.seed: -1 is below the minimum 0"),
        ({"split": {"fractions": {"train": 0.8}}}, "split.fractions: train+val+test must be 1.0"),
        (
            {"split": {"dedupe_majority_in_train": "yes"}},
            "split.dedupe_majority_in_train: expected true or false",
        ),
        ({"split": {"eval_images": "some"}}, "split.eval_images: 'some' is not one of ['all', 'canonical']"),
        ({"calibrate": {"target_recall": 1.5}}, "calibrate.target_recall: 1.5 is above the maximum 1.0"),
        ({"download": {"source": "ftp://x"}}, "download.source: unknown source 'ftp://x'"),
        ({"download": {"source": "local:"}}, "download.source: unknown source 'local:'"),
        ({"download": "synthetic"}, "download: expected a mapping"),
        ({"train": {"backbones": "mobilenetv2"}}, "train.backbones: expected a list"),
        ({"validate": {"image_id_pattern": "ISIC_(\\d"}}, "validate.image_id_pattern: not a valid regex"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert message in str(e.value)


def test_load_params_names_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("base:\n  seeed: 1\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: base\.seeed: unknown key"):
        load_params(p)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    p.write_text("base: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(p)


def test_local_source_path():
    p = parse_params({"download": {"source": "local:../shared/data/ham10000"}})
    assert p.download.local_path == Path("../shared/data/ham10000")
    assert parse_params({}).download.local_path is None


def test_optional_knob_accepts_null_and_checks_bounds_otherwise():
    assert parse_params({"promote": {"min_test_recall": None}}).promote.min_test_recall is None
    assert parse_params({"promote": {"min_test_recall": 0.9}}).promote.min_test_recall == 0.9
    with pytest.raises(ParamsError, match="promote.min_test_recall: 1.5 is above the maximum 1.0"):
        parse_params({"promote": {"min_test_recall": 1.5}})
    with pytest.raises(ParamsError, match="promote.min_test_recall: expected a number, got 'x'"):
        parse_params({"promote": {"min_test_recall": "x"}})


# Output folders the pipeline writes (the drift stage's Evidently workspace, the monitor flow's
# ledger and per-batch reports) must stay inside the repository whatever params.yaml says.
WRITTEN = ("drift.workspace", "drift.monitor_state")


@pytest.mark.parametrize("key", WRITTEN)
@pytest.mark.parametrize(
    "value, why",
    [
        ("../../etc", "not a path through '..'"),
        ("data/../../etc", "not a path through '..'"),
        ("/etc/cron.d", "not an absolute path"),
        ("/tmp/monitor", "not an absolute path"),
        ("~/monitor", "not a home-relative path"),
        (".git/hooks", "not inside .git/ (git's own folder)"),
        (".dvc/tmp", "not inside .dvc/ (dvc's own folder)"),
        (".", "not the repository root itself"),
        ("", "not an empty path"),
    ],
)
def test_output_paths_outside_the_repo_are_refused_naming_the_key(key, value, why):
    section, name = key.split(".")
    with pytest.raises(ParamsError) as e:
        parse_params({section: {name: value}})
    assert str(e.value) == (
        f"{key}: {value!r} must be a relative path inside the repository, e.g. 'data/monitor', "
        f"{why}: the pipeline writes there"
    )


def test_hostile_output_path_in_params_yaml_names_the_file_and_the_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("drift:\n  monitor_state: ../../etc\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: drift\.monitor_state: '\.\./\.\./etc' must be"):
        load_params(p)


@pytest.mark.parametrize("key", WRITTEN)
def test_output_paths_inside_the_repo_are_accepted(key):
    section, name = key.split(".")
    for value in ("data/monitor", "evidently_workspace", "data/monitor/v2/", "./data/x"):
        assert getattr(getattr(parse_params({section: {name: value}}), section), name) == value


def test_input_paths_may_be_outside_the_repo():
    """The pipeline only reads these: a shared data folder, a batch dropped elsewhere."""
    p = parse_params(
        {
            "download": {"source": "local:/srv/ham10000", "extra_sources": ["../inbox/b1", "/mnt/b2.zip"]},
            "drift": {"new_images": "/data/clinic-x/2026-12", "inbox": "../shared-inbox"},
        }
    )
    assert p.download.local_path == Path("/srv/ham10000")
    assert p.download.extra_paths == (Path("../inbox/b1"), Path("/mnt/b2.zip"))
    assert (p.drift.new_images, p.drift.inbox) == ("/data/clinic-x/2026-12", "../shared-inbox")
