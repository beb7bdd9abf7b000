"""The one scoring path (skinlesion/measure/scoring.py): metadata parsing, the mode rule, operating points,
and a member's probabilities over batches and TTA views.

The model-backed tests use real tiny Keras models saved to and loaded from ``tmp_path`` (with
the project's own ``MetadataEncoding`` for the fusion member), called as the stages call them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    META_FIELDS,
    METADATA,
    MODE_RULE,
    MODES,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
    OperatingPoint,
    calibrated,
    decisions,
    malignant_flags,
    member_probabilities,
    mix,
    mode_inputs,
    mode_suffix,
    model_inputs,
    parse_metadata,
    row_modes,
    tta_views,
)
from tests.builders.bundles import tiny_model

MALE, FEMALE = SEXES.index("male"), SEXES.index("female")
BACK, FACE = LOCALIZATIONS.index("back"), LOCALIZATIONS.index("face")


def _images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _meta(n: int, seed: int = 0) -> MetaArrays:
    """``n`` rows with every field known, varied."""
    rng = np.random.default_rng(seed)
    return MetaArrays(
        rng.uniform(5, 90, n).astype(np.float32),
        rng.integers(0, UNKNOWN_SEX, n).astype(np.int32),  # male / female
        rng.choice([i for i in range(len(LOCALIZATIONS)) if i != UNKNOWN_LOCALIZATION], n).astype(np.int32),
    )


# --------------------------------------------------------------------------- metadata text


def test_parse_metadata_reads_hams_vocabulary():
    assert parse_metadata("45", "male", "back") == (45.0, MALE, BACK)
    assert parse_metadata(" 62.5 ", " Female ", "FACE") == (62.5, FEMALE, FACE)
    assert parse_metadata("0", "male", "lower extremity") == (
        0.0,
        MALE,
        LOCALIZATIONS.index("lower extremity"),
    )
    assert parse_metadata("120", "female", "back")[0] == 120.0  # the bounds are inclusive


@pytest.mark.parametrize(
    ("age", "sex", "loc"),
    [("", "", ""), (None, None, None), ("unknown", "unknown", "unknown"), ("nan", "UNKNOWN", " "),
     ("  ", "  ", "unknown"), ("NA", "", ""), ("n/a", "unknown", "")],
)  # fmt: skip
def test_parse_metadata_empty_or_unknown_is_unknown(age, sex, loc):
    a, s, loc_idx = parse_metadata(age, sex, loc)
    assert math.isnan(a) and (s, loc_idx) == (UNKNOWN_SEX, UNKNOWN_LOCALIZATION)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("forty", "male", "back"), "age 'forty' is not a number (years, or empty when unknown)"),
        (("45 years", "male", "back"), "age '45 years' is not a number (years, or empty when unknown)"),
        (("200", "male", "back"), "age '200' is outside 0..120 years"),
        (("-1", "male", "back"), "age '-1' is outside 0..120 years"),
        (("inf", "male", "back"), "age 'inf' is outside 0..120 years"),
        (("45", "robot", "back"), "sex 'robot' is not one of ['male', 'female', 'unknown']"),
        (("45", "m", "back"), "sex 'm' is not one of ['male', 'female', 'unknown']"),
        (("45", "male", "bakc"), f"localization 'bakc' is not one of {list(LOCALIZATIONS)}"),
    ],
)
def test_parse_metadata_refuses_a_bad_value_naming_the_column_and_the_value(args, message):
    with pytest.raises(StageError) as e:
        parse_metadata(*args)
    assert str(e.value) == message


# --------------------------------------------------------------------------- the mode rule


def test_meta_arrays_unknown_of_complete_and_take():
    u = MetaArrays.unknown(3)
    assert len(u) == 3 and np.isnan(u.age).all() and not u.complete().any()
    assert (u.age.dtype, u.sex.dtype, u.localization.dtype) == (np.float32, np.int32, np.int32)
    m = MetaArrays.of([(45.0, MALE, BACK), (math.nan, FEMALE, FACE), (30.0, UNKNOWN_SEX, FACE),
                       (30.0, FEMALE, UNKNOWN_LOCALIZATION), (70.0, FEMALE, FACE)])  # fmt: skip
    assert m.complete().tolist() == [True, False, False, False, True]
    t = m.take([4, 0])
    assert t.age.tolist() == [70.0, 45.0] and t.sex.tolist() == [FEMALE, MALE]
    assert len(MetaArrays.of([])) == 0
    assert META_FIELDS == ("age", "sex", "localization") and MODES == (METADATA, IMAGE_ONLY)
    assert "all known" in MODE_RULE and "image_only" in MODE_RULE


def test_row_modes_metadata_only_when_complete_and_the_bundle_has_the_mode():
    meta = MetaArrays.of([
        (45.0, MALE, BACK),  # complete
        (math.nan, MALE, BACK),  # age unknown
        (45.0, UNKNOWN_SEX, BACK),  # sex unknown
        (45.0, MALE, UNKNOWN_LOCALIZATION),  # site unknown
        (math.nan, UNKNOWN_SEX, UNKNOWN_LOCALIZATION),  # nothing known
        (0.0, FEMALE, FACE),  # age 0 is known
    ])  # fmt: skip
    assert row_modes(meta, 6, MODES).tolist() == [METADATA, *[IMAGE_ONLY] * 4, METADATA]
    # a bundle without fusion members has image_only only: metadata never selects another mode
    assert row_modes(meta, 6, (IMAGE_ONLY,)).tolist() == [IMAGE_ONLY] * 6
    assert row_modes(None, 3, MODES).tolist() == [IMAGE_ONLY] * 3


def test_mode_inputs_feeds_every_field_unknown_on_image_only_rows():
    meta = MetaArrays.of([(45.0, MALE, BACK), (40.0, UNKNOWN_SEX, FACE), (70.0, FEMALE, FACE),
                          (math.nan, FEMALE, BACK)])  # fmt: skip
    before = (meta.age.copy(), meta.sex.copy(), meta.localization.copy())
    modes = row_modes(meta, 4, MODES)
    fed = mode_inputs(meta, modes)
    assert modes.tolist() == [METADATA, IMAGE_ONLY, METADATA, IMAGE_ONLY]
    # the partly known rows lose what was known (no operating point exists for partial metadata)
    assert np.isnan(fed.age[[1, 3]]).all()
    assert fed.sex[[1, 3]].tolist() == [UNKNOWN_SEX] * 2
    assert fed.localization[[1, 3]].tolist() == [UNKNOWN_LOCALIZATION] * 2
    assert fed.age[[0, 2]].tolist() == [45.0, 70.0] and fed.sex[[0, 2]].tolist() == [MALE, FEMALE]
    assert fed.localization[[0, 2]].tolist() == [BACK, FACE]
    for a, b in zip(before, (meta.age, meta.sex, meta.localization), strict=True):
        np.testing.assert_array_equal(a, b)  # the caller's arrays are not changed
    assert mode_inputs(None, modes) is None
    complete = meta.take([0, 2])
    assert mode_inputs(complete, np.array([METADATA, METADATA], dtype=object)) is complete
    unknown = mode_inputs(complete, np.array([IMAGE_ONLY, IMAGE_ONLY], dtype=object))
    assert not unknown.complete().any() and np.isnan(unknown.age).all()


def test_model_inputs_give_a_fusion_member_unknown_metadata_when_none_is_known():
    x = _images(2)
    assert model_inputs(x, None, False) is x
    fed = model_inputs(x, None, True)
    assert set(fed) == {"image", "age", "sex", "localization"} and fed["image"] is x
    assert np.isnan(fed["age"]).all() and fed["sex"].tolist() == [UNKNOWN_SEX] * 2
    assert fed["localization"].tolist() == [UNKNOWN_LOCALIZATION] * 2


def test_mode_suffix():
    assert mode_suffix(METADATA, MODES) == "" and mode_suffix(IMAGE_ONLY, MODES) == "_image_only"
    assert mode_suffix(IMAGE_ONLY, (IMAGE_ONLY,)) == ""


# --------------------------------------------------------------------------- operating points


POINT = {"temperature": 1.5, "threshold": 0.3, "class_bias": [0.1, -0.2, 0.0, 0.3, 0.0, -0.1, 0.0],
         "class_prior": [0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02], "decision": "balanced"}  # fmt: skip


def test_operating_point_round_trips_through_json():
    p = OperatingPoint.from_json(POINT, 7, "here")
    assert p == OperatingPoint(1.5, 0.3, tuple(POINT["class_bias"]), tuple(POINT["class_prior"]))
    assert p.to_json() == POINT
    plain = OperatingPoint.from_json({"temperature": 2, "threshold": 0}, 7, "here")
    assert plain == OperatingPoint(2.0, 0.0, None, None)
    assert plain.to_json()["decision"] == "argmax"
    # a prior with the argmax decision is not used
    assert OperatingPoint.from_json({**POINT, "decision": "argmax"}, 7, "here").class_prior is None


def test_operating_point_calibrates_and_decides():
    rng = np.random.default_rng(0)
    mixed = rng.dirichlet(np.ones(7), size=5)
    p = OperatingPoint.from_json(POINT, 7, "here")
    z = np.log(mixed) / 1.5 + np.array(POINT["class_bias"])
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(p.calibrate(mixed), expected, rtol=1e-12)
    np.testing.assert_array_equal(p.decide(expected), (expected / np.array(POINT["class_prior"])).argmax(1))
    assert OperatingPoint(1.0, 0.5).decide(expected).tolist() == expected.argmax(1).tolist()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("temperature", float("nan"), "'temperature' must be a number in [0.001, 1000], got nan"),
        ("temperature", "1.0", "'temperature' must be a number in [0.001, 1000], got '1.0'"),
        ("temperature", -1.0, "'temperature' must be a number in [0.001, 1000], got -1.0"),
        ("temperature", 0, "'temperature' must be a number in [0.001, 1000], got 0"),
        ("temperature", True, "'temperature' must be a number in [0.001, 1000], got True"),
        ("temperature", None, "'temperature' must be a number in [0.001, 1000], got None"),
        ("temperature", 5e-324, "'temperature' must be a number in [0.001, 1000], got 5e-324"),
        ("temperature", 1e-4, "'temperature' must be a number in [0.001, 1000], got 0.0001"),
        ("temperature", float("inf"), "'temperature' must be a number in [0.001, 1000], got inf"),
        ("threshold", 2.0, "'threshold' must be a number in [0, 1], got 2.0"),
        ("threshold", "abc", "'threshold' must be a number in [0, 1], got 'abc'"),
        ("threshold", float("-inf"), "'threshold' must be a number in [0, 1], got -inf"),
        ("threshold", float("nan"), "'threshold' must be a number in [0, 1], got nan"),
        ("threshold", -0.1, "'threshold' must be a number in [0, 1], got -0.1"),
        ("class_bias", [0.0] * 6, "'class_bias' must be 7 finite numbers (one per class), got [0.0, 0.0"),
        ("class_bias", [0.0] * 8, "'class_bias' must be 7 finite numbers (one per class), got [0.0, 0.0"),
        ("class_bias", [0.0] * 6 + [float("inf")], "'class_bias' must be 7 finite numbers (one per class)"),
        ("class_bias", "0.0", "'class_bias' must be 7 finite numbers (one per class), got '0.0'"),
        ("class_prior", [0.0] + [0.1] * 6, "'class_prior' must be 7 finite numbers (one per class, all > 0)"),
        (
            "class_prior",
            [-0.1] + [0.2] * 6,
            "'class_prior' must be 7 finite numbers (one per class, all > 0)",
        ),
        ("class_prior", [0.5] * 3, "'class_prior' must be 7 finite numbers (one per class, all > 0)"),
    ],
)
def test_operating_point_refuses_an_unusable_value_by_its_key(key, value, message):
    with pytest.raises(StageError) as e:
        OperatingPoint.from_json({**POINT, key: value}, 7, "x/bundle.json: metadata")
    assert str(e.value).startswith(f"x/bundle.json: metadata: {message}"), str(e.value)


@pytest.mark.parametrize("temperature", [0.001, 0.05, 1, 20, 1000])
@pytest.mark.parametrize("threshold", [0, 1])
def test_every_accepted_operating_point_gives_finite_probabilities(temperature, threshold):
    # the bounds of the accepted range on the most extreme mixes (0 and 1 probabilities, a
    # uniform row, a tiny row) and the largest finite bias: never a NaN to serve as ok
    p = OperatingPoint.from_json(
        {"temperature": temperature, "threshold": threshold, "class_bias": [1e308, -1e308, 0, 0, 0, 0, 1]},
        7, "here",
    )  # fmt: skip
    mixed = np.array([np.eye(7)[0], np.full(7, 1 / 7), np.full(7, 1e-300), np.eye(7)[6] * 1e300])
    with np.errstate(over="ignore"):
        probs = p.calibrate(mixed)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1.0)
    score, thr = malignant_flags(probs, np.full(4, IMAGE_ONLY, dtype=object), {IMAGE_ONLY: p}, CLASSES)
    assert np.isfinite(score).all()
    if threshold == 0:  # the degenerate point calibrate may pick: every row referred
        assert (score >= thr).all()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"class_bias": [True] * 7}, "class_bias"),  # JSON true is not a number (as for temperature)
        ({"decision": "balanced", "class_prior": None}, "class_prior"),
        ({"decision": "balenced"}, "decision"),
    ],
)
def test_operating_point_refuses_a_decision_it_cannot_apply_as_written(change, key):
    # served as written or refused by name: never a silent argmax for a bundle that says
    # "balanced" without its prior, or names a decision rule this code does not know
    with pytest.raises(StageError, match=rf"^x/bundle.json: image_only: '{key}'"):
        OperatingPoint.from_json({**POINT, **change}, 7, "x/bundle.json: image_only")


def test_per_row_calibration_thresholds_and_decisions_follow_each_rows_mode():
    rng = np.random.default_rng(1)
    mixed = rng.dirichlet(np.ones(7), size=6)
    points = {METADATA: OperatingPoint(0.8, 0.2, None, None),
              IMAGE_ONLY: OperatingPoint.from_json(POINT, 7, "here")}  # fmt: skip
    modes = np.array([METADATA, IMAGE_ONLY, IMAGE_ONLY, METADATA, IMAGE_ONLY, METADATA], dtype=object)
    probs = calibrated(mixed, modes, points)
    meta_rows, image_rows = modes == METADATA, modes == IMAGE_ONLY
    np.testing.assert_array_equal(probs[meta_rows], points[METADATA].calibrate(mixed[meta_rows]))
    np.testing.assert_array_equal(probs[image_rows], points[IMAGE_ONLY].calibrate(mixed[image_rows]))
    score, thr = malignant_flags(probs, modes, points, CLASSES)
    assert thr.tolist() == [0.2, 0.3, 0.3, 0.2, 0.3, 0.2]
    mal = [CLASSES.index(c) for c in ("akiec", "bcc", "mel")]
    np.testing.assert_allclose(score, probs[:, mal].sum(1), rtol=1e-12)
    got = decisions(probs, modes, points)
    np.testing.assert_array_equal(got[meta_rows], probs[meta_rows].argmax(1))
    np.testing.assert_array_equal(got[image_rows], points[IMAGE_ONLY].decide(probs[image_rows]))


def test_mix_is_the_weighted_sum_of_the_members():
    rng = np.random.default_rng(2)
    a, b = rng.dirichlet(np.ones(7), size=4), rng.dirichlet(np.ones(7), size=4)
    np.testing.assert_allclose(mix([a, b], [0.7, 0.3]), 0.7 * a + 0.3 * b, rtol=1e-12)
    np.testing.assert_array_equal(mix(np.stack([a]), [1.0]), a)


# --------------------------------------------------------------------------- a member's probabilities


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(image-only graph, image-only keras, fusion graph, fusion keras)``, saved and loaded back."""
    from skinlesion.model.networks import as_graph, load_model

    root = tmp_path_factory.mktemp("scoring_models")
    plain = load_model(tiny_model(root / "plain" / "model.keras"))
    fused = load_model(tiny_model(root / "fused" / "model.keras", fusion=True, seed=1))
    return as_graph(plain), plain, as_graph(fused), fused


@pytest.mark.parametrize("fusion", [False, True])
def test_member_probabilities_do_not_depend_on_the_batch_size(models, fusion):
    call = models[2] if fusion else models[0]
    x = _images(64 + 9, seed=3)
    meta = _meta(len(x), seed=3) if fusion else None
    runs = {
        b: member_probabilities(call, x, meta, takes_meta=fusion, tta=False, batch_size=b) for b in (1, 7, 64)
    }
    for b in (7, 64):
        np.testing.assert_allclose(runs[b], runs[1], atol=1e-6, rtol=0)
    assert runs[1].shape == (len(x), 7) and runs[1].dtype == np.float64
    np.testing.assert_allclose(runs[1].sum(1), 1.0, atol=1e-5)
    # the rows are the model's own answers, in input order (each chunk got its own metadata)
    keras_model = models[3] if fusion else models[1]
    direct = keras_model(model_inputs(x, meta, fusion), training=False)
    np.testing.assert_allclose(runs[64], np.asarray(direct), atol=1e-6, rtol=0)


def test_a_fusion_member_sees_the_metadata_it_is_given(models):
    call = models[2]
    x = _images(6, seed=4)
    meta = _meta(6, seed=4)
    with_meta = member_probabilities(call, x, meta, takes_meta=True, tta=False, batch_size=4)
    unknown = member_probabilities(call, x, None, takes_meta=True, tta=False, batch_size=4)
    same = member_probabilities(call, x, MetaArrays.unknown(6), takes_meta=True, tta=False, batch_size=4)
    assert not np.allclose(with_meta, unknown, atol=1e-4)
    np.testing.assert_array_equal(unknown, same)  # None means every field unknown


@pytest.mark.parametrize("fusion", [False, True])
def test_tta_averages_the_four_flipped_views(models, fusion):
    call, keras_model = (models[2], models[3]) if fusion else (models[0], models[1])
    x = _images(10, seed=5)
    meta = _meta(10, seed=5) if fusion else None
    seen: list[tuple[int, int]] = []

    def on_view(k, inputs, out):
        seen.append((k, len(inputs["image"] if fusion else inputs)))
        return out

    got = member_probabilities(call, x, meta, takes_meta=fusion, tta=True, batch_size=4, on_view=on_view)
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    assert all(np.array_equal(a, b) for a, b in zip(tta_views(x, True), views, strict=True))
    expected = np.mean(
        [np.asarray(keras_model(model_inputs(np.ascontiguousarray(v), meta, fusion), training=False))
         for v in views], axis=0,
    )  # fmt: skip
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    plain = member_probabilities(call, x, meta, takes_meta=fusion, tta=False, batch_size=4)
    assert not np.allclose(got, plain, atol=1e-4)  # the flips did change something
    # every view, every chunk of 4 (4 + 4 + 2 rows), in order
    assert seen == [(k, n) for k in range(4) for n in (4, 4, 2)]
