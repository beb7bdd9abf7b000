"""The validate stage on the real HAM10000 copy: it passes, and each kind of real-world damage,
made from real rows and files, fails with a message naming the row or file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from skinlesion.core.splits import SPLITS
from skinlesion.params.load import parse_params
from stages.validate import ValidationFailed, run
from tests.builders.images import claim_size

LONG_NAMES = {
    "akiec": "actinic keratoses",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "nevus",
    "vasc": "vascular lesions",
}


# --------------------------------------------------------------------------- helpers


def lesion_split(meta: pd.DataFrame, fractions=(0.7, 0.15, 0.15)) -> pd.DataFrame:
    """A lesion-grouped split, per class: each lesion goes to the split furthest below its target."""
    meta = meta[(meta["image_id"] != "") & (meta["lesion_id"] != "")]
    where: dict[str, str] = {}
    for _, rows in meta.groupby("dx", sort=True):
        sizes = rows.groupby("lesion_id", sort=False).size()
        total, have = sizes.sum(), dict.fromkeys(SPLITS, 0)
        for lesion, k in sizes.items():
            if lesion in where:  # a lesion whose rows carry two diagnoses: keep it in one split
                continue
            s = max(SPLITS, key=lambda s: fractions[SPLITS.index(s)] * total - have[s])
            where[lesion], have[s] = s, have[s] + k
    out = meta[["image_id", "lesion_id"]].assign(group_id=meta["lesion_id"], dx=meta["dx"])
    return out.assign(split=meta["lesion_id"].map(where))


def build(root: Path, shared: Path, meta: pd.DataFrame, *, images_of: pd.DataFrame | None = None, eol="\n"):
    """root/raw (metadata.csv written from ``meta``, images symlinked) and root/split/split.csv.

    ``images_of``: the rows whose images to link (default ``meta``'s), so a metadata edit can
    leave the files as they were."""
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "metadata.csv").write_bytes(meta.to_csv(index=False, lineterminator=eol).encode())
    for image_id in (meta if images_of is None else images_of)["image_id"]:
        src = shared / "images_200x150" / f"{image_id}.jpg"
        if src.is_file() and not (raw / "images" / src.name).exists():
            (raw / "images" / src.name).symlink_to(src)
    (root / "split").mkdir()
    lesion_split(meta).to_csv(root / "split" / "split.csv", index=False, lineterminator="\n")
    return root


def byte_identical_copies(folder: Path) -> dict[str, str]:
    """{file: the first file, by name, with the same bytes} for every later copy in ``folder``."""
    first: dict[str, str] = {}
    copies = {}
    for p in sorted(folder.glob("*.jpg")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest in first:
            copies[p.name] = first[digest]
        else:
            first[digest] = p.name
    return copies


def replace(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` without writing through a symlink into the shared folder."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def validate(root: Path, **validate_params):
    p = parse_params({"validate": {"workers": 1, **validate_params}})
    return run(
        p.validate,
        fractions=p.split.fractions,
        raw=root / "raw",
        split=root / "split",
        out=root / "validated",
        report=root / "report",
        metrics=root / "metrics.json",
        progress=False,
    )


def failure(root: Path, **validate_params) -> str:
    with pytest.raises(ValidationFailed) as e:
        validate(root, **validate_params)
    assert not (root / "validated").exists()
    return str(e.value)


@pytest.fixture(scope="session")
def real_meta(shared_ham) -> pd.DataFrame:
    return pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="session")
def subset(real_meta) -> pd.DataFrame:
    """All rows of the first 12 lesions of each class (~120 real rows), in the file's order."""
    lesions = real_meta.drop_duplicates("lesion_id").groupby("dx").head(12)["lesion_id"]
    return real_meta[real_meta["lesion_id"].isin(set(lesions))].reset_index(drop=True)


@pytest.fixture()
def victim(subset) -> tuple[str, int]:
    """(image_id, metadata.csv line) of the subset's 5th row: the row the variants damage."""
    return subset.loc[3, "image_id"], 5


# --------------------------------------------------------------------------- the full real set


@pytest.mark.slow
def test_the_real_shared_data_passes(tmp_path, shared_ham, real_meta):
    root = tmp_path
    (root / "raw").mkdir()
    (root / "raw" / "metadata.csv").write_bytes((shared_ham / "HAM10000_metadata.csv").read_bytes())
    (root / "raw" / "images").symlink_to(shared_ham / "images_200x150")
    (root / "split").mkdir()
    lesion_split(real_meta).to_csv(root / "split" / "split.csv", index=False, lineterminator="\n")
    p = parse_params({})  # the shipped defaults, all cores
    res = run(
        p.validate,
        fractions=p.split.fractions,
        raw=root / "raw",
        split=root / "split",
        out=root / "validated",
        report=root / "report",
        metrics=root / "metrics.json",
        progress=False,
    )
    n = len(real_meta)
    assert n == len(list((shared_ham / "images_200x150").glob("*.jpg")))  # an image for every row
    assert res.passed and res.n_rows == n and res.n_images_checked == n and res.n_validated == n
    # Byte-identical copies (the shared copy holds a few) are reported, not fatal: every file
    # but the first of its bytes (by name) is named.
    copies = byte_identical_copies(shared_ham / "images_200x150")
    if copies:
        (dup,) = res.warnings
        assert dup.key == "not_duplicate" and dup.count == len(copies) and set(dup.index) == set(copies)
    else:
        assert res.warnings == ()
    m = json.loads((root / "metrics.json").read_text())
    assert m["passed"] == 1 and m["images_fail_decodes"] == 0
    assert m["images_fail_not_duplicate"] == len(copies)
    out = pd.read_csv(root / "validated" / "split.csv", dtype=str, keep_default_na=False)
    assert len(out) == n and set(out["image_id"]) == set(real_meta["image_id"])
    print(f"real data: {res.seconds:.1f} s, of which decoding {m['decode_seconds']:.1f} s")


# --------------------------------------------------------------------------- damage, one kind at a time


def test_real_subset_passes_also_with_crlf_and_integer_ages(tmp_path, shared_ham, subset):
    meta = subset.copy()
    meta["age"] = meta["age"].str.replace(".0", "", regex=False)  # the Dataverse release's "80"
    meta.loc[5, "age"] = ""  # unknown age
    assert (meta["age"] == "80").any()
    root = build(tmp_path, shared_ham, meta, eol="\r\n")
    assert b"\r\n" in (root / "raw" / "metadata.csv").read_bytes()
    res = validate(root)
    assert res.passed and res.n_validated == len(subset) and res.failures == ()


def test_blanked_row(tmp_path, shared_ham, subset, victim):
    meta = subset.copy()
    meta.loc[3, :] = ""
    msg = failure(build(tmp_path, shared_ham, meta, images_of=subset))
    assert f"metadata: blank row: 1 row, first: row {victim[1]}\n" in msg
    assert f"images: image file without a metadata row: 1 file, first: {victim[0]}.jpg" in msg


def test_an_eighth_class(tmp_path, shared_ham, subset):
    extra = subset.head(6).copy()
    extra["lesion_id"] = [f"HAM_90000{i:02d}" for i in range(6)]
    extra["image_id"] = [f"ISIC_90000{i:02d}" for i in range(6)]
    extra["dx"] = "healthy"
    root = build(tmp_path, shared_ham, pd.concat([subset, extra], ignore_index=True))
    for src, new in zip(subset.head(6)["image_id"], extra["image_id"], strict=True):
        Image.open(shared_ham / "images_200x150" / f"{src}.jpg").save(root / "raw" / "images" / f"{new}.jpg")
    msg = failure(root)
    first = len(subset) + 2
    assert f"metadata: dx not in the class set: 6 rows, first: row {first} ISIC_9000000 dx='healthy'" in msg


def test_dx_written_as_long_names(tmp_path, shared_ham, subset):
    meta = subset.assign(dx=subset["dx"].map(LONG_NAMES))
    msg = failure(build(tmp_path, shared_ham, meta))
    first = subset.loc[0]
    assert (
        f"metadata: dx not in the class set: {len(subset)} rows, first: row 2 {first.image_id} "
        f"dx={LONG_NAMES[first.dx]!r}" in msg
    )
    assert "metadata: class below min_class_count=5: 7 classes, first: akiec 0 rows" in msg


def test_duplicate_image_id(tmp_path, shared_ham, subset, victim):
    meta = pd.concat([subset, subset.iloc[[3]]], ignore_index=True)
    msg = failure(build(tmp_path, shared_ham, meta))
    image_id, line = victim
    last = len(meta) + 1
    assert (
        f"metadata: image_id not unique: 2 rows, first: row {line} {image_id}; row {last} {image_id}" in msg
    )


def test_missing_image(tmp_path, shared_ham, subset, victim):
    root = build(tmp_path, shared_ham, subset)
    (root / "raw" / "images" / f"{victim[0]}.jpg").unlink()
    msg = failure(root)
    assert (
        f"images: metadata row without an image file: 1 file, first: {victim[0]}.jpg (row {victim[1]}) "
        "no such file in images/" in msg
    )


def test_extra_image_without_a_row(tmp_path, shared_ham, subset, victim):
    root = build(tmp_path, shared_ham, subset)
    Image.open(shared_ham / "images_200x150" / f"{victim[0]}.jpg").save(
        root / "raw" / "images" / "ISIC_9999999.jpg"
    )
    msg = failure(root)
    assert "images: image file without a metadata row: 1 file, first: ISIC_9999999.jpg\n" in msg


def test_truncated_jpeg(tmp_path, shared_ham, subset, victim):
    root = build(tmp_path, shared_ham, subset)
    path = root / "raw" / "images" / f"{victim[0]}.jpg"
    data = path.read_bytes()
    replace(path, data[: len(data) * 3 // 4])
    msg = failure(root)
    assert (
        f"images: does not decode fully: 1 file, first: {victim[0]}.jpg (row {victim[1]}) "
        "image file is truncated" in msg
    )


def test_truncated_jpeg_is_quarantined(tmp_path, shared_ham, subset, victim):
    root = build(tmp_path, shared_ham, subset)
    path = root / "raw" / "images" / f"{victim[0]}.jpg"
    data = path.read_bytes()
    replace(path, data[: len(data) * 3 // 4])
    res = validate(root, on_image_error="quarantine")
    assert res.passed and res.metrics["n_quarantined"] == 1
    q = pd.read_csv(root / "validated" / "quarantine.csv")
    assert q.to_dict("records")[0]["image_id"] == victim[0]
    assert q["reason"][0].startswith("does not decode fully: image file is truncated")
    out = pd.read_csv(root / "validated" / "split.csv")
    assert victim[0] not in set(out["image_id"]) and len(out) == len(subset) - 1


def test_zero_byte_file(tmp_path, shared_ham, subset, victim):
    root = build(tmp_path, shared_ham, subset)
    replace(root / "raw" / "images" / f"{victim[0]}.jpg", b"")
    msg = failure(root)
    assert f"images: empty file (0 bytes): 1 file, first: {victim[0]}.jpg (row {victim[1]})\n" in msg


def test_png_named_jpg_per_param(tmp_path, shared_ham, subset, victim):
    root = build(tmp_path, shared_ham, subset)
    path = root / "raw" / "images" / f"{victim[0]}.jpg"
    img = Image.open(path)
    img.load()
    path.unlink()
    img.save(path, "PNG")
    msg = failure(root, on_non_jpeg="reject")
    first = f"first: {victim[0]}.jpg (row {victim[1]})"
    assert f"images: not a JPEG (on_non_jpeg=reject): 1 file, {first} format PNG" in msg
    assert validate(root, on_non_jpeg="convert").passed


def test_grayscale_per_param(tmp_path, shared_ham, subset, victim):
    root = build(tmp_path, shared_ham, subset)
    path = root / "raw" / "images" / f"{victim[0]}.jpg"
    gray = Image.open(path).convert("L")
    path.unlink()
    gray.save(path, "JPEG", quality=90)
    msg = failure(root, on_non_rgb="reject")
    first = f"first: {victim[0]}.jpg (row {victim[1]})"
    assert f"images: mode is not RGB (on_non_rgb=reject): 1 file, {first} mode L" in msg
    assert validate(root, on_non_rgb="convert").passed


def test_a_20000_by_20000_image_is_refused_from_its_header(tmp_path, shared_ham, subset, victim):
    """The real JPEG's SOF0 header is rewritten to claim 20,000 x 20,000 pixels. The unit tests
    measure that checking such a file allocates nothing; here the user sees why it is refused."""
    root = build(tmp_path, shared_ham, subset)
    path = root / "raw" / "images" / f"{victim[0]}.jpg"
    replace(path, claim_size(path.read_bytes(), 20_000, 20_000))
    msg = failure(root)
    assert (
        "images: more than max_pixels=100000000 pixels (refused before decoding): 1 file, "
        f"first: {victim[0]}.jpg (row {victim[1]}) 20000x20000 = 400000000 pixels" in msg
    )


def test_a_lesion_with_two_diagnoses(tmp_path, shared_ham, subset):
    sizes = subset.groupby("lesion_id").size()
    lesion = sizes[sizes >= 2].index[0]
    rows = subset.index[subset["lesion_id"] == lesion]
    meta = subset.copy()
    old = meta.loc[rows[0], "dx"]
    new = "mel" if old != "mel" else "nv"
    meta.loc[rows[1], "dx"] = new
    msg = failure(build(tmp_path, shared_ham, meta))
    both = ", ".join(sorted({old, new}))
    first = meta.loc[rows[0]]
    assert (
        f"metadata: lesion with more than one diagnosis: {len(rows)} rows, first: row {rows[0] + 2} "
        f"{first.image_id} dx={old!r}, lesion {lesion} has {both}" in msg
    )
