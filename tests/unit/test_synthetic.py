"""The embedded synthetic data set: HAM-shaped, deterministic, learnable but not trivially."""

from __future__ import annotations

import re
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.common import CLASSES, DX_TYPES, HAM_COLUMNS, LOCALIZATIONS, SEXES
from stages.params import parse_params
from stages.synthetic import generate, plan_lesions


def _params(n=300, **kw):
    return parse_params({"download": {"synthetic": {"n_images": n, **kw}}}).download.synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(_params(300, width=96, height=72), 7, out, workers=2)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_values(synth):
    text = (synth / "metadata.csv").read_bytes()
    assert b"\r" not in text
    df = pd.read_csv(synth / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(df.columns) == list(HAM_COLUMNS)
    assert len(df) == 300 and df["image_id"].is_unique
    assert all(re.fullmatch(r"ISIC_\d{7}", i) for i in df["image_id"])
    assert all(re.fullmatch(r"HAM_\d{7}", i) for i in df["lesion_id"])
    assert set(df["dx"]) == set(CLASSES)
    assert set(df["dx_type"]) <= set(DX_TYPES)
    assert set(df["sex"]) <= set(SEXES) and set(df["localization"]) <= set(LOCALIZATIONS)
    ages = pd.to_numeric(df["age"].replace("", np.nan))
    assert ages.dropna().between(0, 120).all()
    assert sorted(p.stem for p in (synth / "images").iterdir()) == sorted(df["image_id"])
    with Image.open(synth / "images" / f"{df['image_id'][0]}.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (96, 72))


def test_imbalance_and_lesion_groups(synth):
    df = pd.read_csv(synth / "metadata.csv", dtype=str, keep_default_na=False)
    counts = df["dx"].value_counts()
    assert counts.index[0] == "nv" and counts["nv"] > 0.45 * len(df)
    per_lesion = df.groupby("lesion_id").size()
    assert per_lesion.min() >= 1 and per_lesion.max() <= 6 and (per_lesion > 1).sum() >= 10
    # every image of a lesion carries the lesion's metadata
    assert (
        (df.groupby("lesion_id")[["dx", "dx_type", "age", "sex", "localization"]].nunique() == 1).all().all()
    )


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, synth):
    generate(_params(300, width=96, height=72), 7, tmp_path / "one", workers=1)
    assert _files(tmp_path / "one") == _files(synth)
    generate(_params(300, width=96, height=72), 8, tmp_path / "other", workers=2)
    assert _files(tmp_path / "other")["metadata.csv"] != _files(synth)["metadata.csv"]


def _ahash(path: Path) -> imagehash.ImageHash:
    with Image.open(path) as im:
        return imagehash.average_hash(im)


def test_reshots_are_near_duplicates_and_twins_exist(synth):
    df = pd.read_csv(synth / "metadata.csv", dtype=str, keep_default_na=False)
    h = {i: _ahash(synth / "images" / f"{i}.jpg") for i in df["image_id"]}
    same = [
        h[a] - h[b]
        for _, g in df.groupby("lesion_id")
        for a, b in zip(g["image_id"], g["image_id"][1:], strict=False)
    ]
    rng = np.random.default_rng(0)
    ids = df["image_id"].to_numpy()
    lesion = dict(zip(df["image_id"], df["lesion_id"], strict=True))
    pairs = [tuple(rng.choice(ids, 2, replace=False)) for _ in range(300)]
    other = [h[a] - h[b] for a, b in pairs if lesion[a] != lesion[b]]
    assert np.mean(same) < 0.6 * np.mean(other)

    twins = [les for les in plan_lesions(_params(300, width=96, height=72), 7) if les.twin_of is not None]
    assert twins, "cross_id_duplicate_rate > 0 must catalogue some lesions twice"
    plan = plan_lesions(_params(300, width=96, height=72), 7)
    for t in twins:
        src = plan[t.twin_of]
        assert t.lesion_id != src.lesion_id and t.dx == src.dx


def test_learnable_but_not_perfect(synth):
    """Colour statistics alone separate the classes well above chance, never perfectly."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupShuffleSplit

    df = pd.read_csv(synth / "metadata.csv", dtype=str, keep_default_na=False)
    feats = []
    for i in df["image_id"]:
        a = np.asarray(Image.open(synth / "images" / f"{i}.jpg"), dtype=np.float32) / 255
        centre = a[18:54, 24:72].reshape(-1, 3)
        feats.append(
            np.concatenate([centre.mean(0), centre.std(0), np.percentile(centre, [10, 50, 90], 0).ravel()])
        )
    x, y = np.array(feats), df["dx"].to_numpy()
    train, test = next(GroupShuffleSplit(1, test_size=0.3, random_state=0).split(x, y, df["lesion_id"]))
    clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(x[train], y[train])
    score = balanced_accuracy_score(y[test], clf.predict(x[test]))
    assert 1 / 7 + 0.15 < score < 0.999
