"""The download stage's local:PATH import and its failure modes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.core.errors import ParamsError, StageError
from skinlesion.core.schema import HAM_COLUMNS
from skinlesion.params.load import parse_params
from skinlesion.sources.local import safe_extract_zip
from stages.download import main, run
from tests.conftest import make_jpeg, write_raw

ROWS = [
    # lesion_id, image_id, dx, dx_type, age, sex, localization
    ("HAM_0000001", "ISIC_0000001", "nv", "follow_up", "45", "male", "back"),
    ("HAM_0000001", "ISIC_0000002", "nv", "follow_up", "45", "male", "back"),
    ("HAM_0000002", "ISIC_0000003", "mel", "histo", "80.0", "female", "face"),
    ("HAM_0000003", "ISIC_0000004", "bcc", "histo", "NA", "unknown", "unknown"),
]


def _release_folder(root: Path, *, tab: bool = True, crlf: bool = True) -> Path:
    """A folder shaped like the Dataverse release: two image parts + a .tab metadata table."""
    for i, row in enumerate(ROWS):
        part = "HAM10000_images_part_1" if i < 2 else "HAM10000_images_part_2"
        make_jpeg(root / part / f"{row[1]}.jpg", seed=i)
    sep = "\t" if tab else ","
    eol = "\r\n" if crlf else "\n"
    lines = [sep.join(HAM_COLUMNS)] + [sep.join(f'"{v}"' if tab else v for v in r) for r in ROWS]
    name = "HAM10000_metadata.tab" if tab else "HAM10000_metadata.csv"
    (root / name).write_bytes((eol.join(lines) + eol).encode())
    return root


def _download(source: str, out: Path, cache: Path):
    params = parse_params({"download": {"source": source}}).download
    return run(params, seed=0, out_dir=out, cache_dir=cache)


@pytest.mark.parametrize("tab, crlf", [(True, True), (False, False), (False, True)])
def test_local_folder_is_normalised_and_bytes_kept(tmp_path, tab, crlf):
    src = _release_folder(tmp_path / "release", tab=tab, crlf=crlf)
    res = _download(f"local:{src}", tmp_path / "raw", tmp_path / "cache")
    assert (res.n_rows, res.n_images) == (4, 4)

    text = (tmp_path / "raw" / "metadata.csv").read_bytes()
    assert b"\r" not in text and b'"' not in text
    df = pd.read_csv(tmp_path / "raw" / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(df.columns) == list(HAM_COLUMNS)
    assert df["image_id"].tolist() == [r[1] for r in ROWS]
    # ages written 45, 80.0 and NA all come out numeric-or-empty, like the CSV release
    assert df["age"].tolist() == ["45.0", "45.0", "80.0", ""]

    for i, row in enumerate(ROWS):
        part = "HAM10000_images_part_1" if i < 2 else "HAM10000_images_part_2"
        assert (tmp_path / "raw" / "images" / f"{row[1]}.jpg").read_bytes() == (
            src / part / f"{row[1]}.jpg"
        ).read_bytes()


def test_local_zip_is_imported(tmp_path):
    src = _release_folder(tmp_path / "release")
    archive = tmp_path / "ham.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src))
    res = _download(f"local:{archive}", tmp_path / "raw", tmp_path / "cache")
    assert (res.n_rows, res.n_images) == (4, 4)
    assert sorted(p.name for p in (tmp_path / "raw" / "images").iterdir()) == [f"{r[1]}.jpg" for r in ROWS]
    assert not any((tmp_path / "cache").iterdir()), "extraction scratch must be cleaned up"


@pytest.mark.parametrize("entry", ["../evil.jpg", "/abs/evil.jpg", "a/../../evil.jpg"])
def test_zip_slip_is_refused(tmp_path, entry):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(entry, "payload")
    dest = tmp_path / "x" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(StageError, match="refusing entry .*escapes the target folder"):
        safe_extract_zip(archive, dest)
    assert not (tmp_path / "x" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert not any(dest.iterdir()), "nothing may be extracted from an archive with a bad entry"


def test_missing_columns_name_the_file(tmp_path):
    src = tmp_path / "release"
    make_jpeg(src / "ISIC_0000001.jpg")
    (src / "metadata.csv").write_text("lesion_id,image_id,dx,age\nHAM_1,ISIC_0000001,nv,3\n")
    with pytest.raises(StageError, match=r"metadata\.csv: missing column\(s\) \['dx_type', 'sex'"):
        _download(f"local:{src}", tmp_path / "raw", tmp_path / "cache")


def _good_raw(tmp_path: Path) -> Path:
    src = _release_folder(tmp_path / "release")
    _download(f"local:{src}", tmp_path / "raw", tmp_path / "cache")
    return tmp_path / "raw"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "params_text, message",
    [
        ("download:\n  source: local:/no/such/folder\n", "local path '/no/such/folder' does not exist"),
        ("download:\n  source: s3://bucket\n", "download.source: unknown source 's3://bucket'"),
        ("download:\n  sorce: synthetic\n", "download.sorce: unknown key (did you mean 'download.source'?)"),
        (
            "download:\n  extra_sources: [/no/such/batch]\n",
            "download.extra_sources[0]: local path '/no/such/batch' does not exist",
        ),
    ],
)
def test_cli_errors_are_one_line_and_leave_raw_intact(tmp_path, capsys, params_text, message):
    raw = _good_raw(tmp_path)
    before = _snapshot(raw)
    params = tmp_path / "params.yaml"
    params.write_text(params_text)
    rc = main(["--params", str(params), "--out", str(raw), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in err
    assert _snapshot(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")) == []


def test_failure_midway_leaves_previous_raw_intact(tmp_path):
    """A source that breaks after output started (metadata fine, table unreadable) changes nothing."""
    raw = _good_raw(tmp_path)
    before = _snapshot(raw)
    src = tmp_path / "broken"
    make_jpeg(src / "ISIC_0000009.jpg")
    (src / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")  # header only, columns missing
    with pytest.raises(StageError):
        _download(f"local:{src}", raw, tmp_path / "cache")
    assert _snapshot(raw) == before


@pytest.mark.realdata
def test_real_shared_data_imports_byte_for_byte(tmp_path, shared_ham):
    res = _download(f"local:{shared_ham}", tmp_path / "raw", tmp_path / "cache")
    src = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    thumbs = {p.name for p in (shared_ham / "images_200x150").glob("*.jpg")}
    originals = {p.name for p in (shared_ham / "originals_600x450").glob("*.jpg")}
    assert (res.n_rows, res.n_images) == (len(src), len(thumbs | originals))
    df = pd.read_csv(tmp_path / "raw" / "metadata.csv", dtype=str, keep_default_na=False)
    assert df.equals(src)  # the CSV release is already normalised: identical content
    images = sorted((tmp_path / "raw" / "images").iterdir())
    assert [p.name for p in images] == sorted(thumbs | originals)
    # the thumbnail folder (every row's image) wins over the few originals that share its ids
    both = sorted(thumbs & originals)
    assert both, "the shared copy has originals of some thumbnails"
    for p in images[::97] + [tmp_path / "raw" / "images" / name for name in both[::10]]:
        assert p.read_bytes() == (shared_ham / "images_200x150" / p.name).read_bytes()


# --------------------------------------------------------------------------- download.extra_sources


def _batch(root: Path, rows: list[dict], *, zipped: bool = False) -> Path:
    """A labelled batch of new images in HAM10000 layout: a folder, or the same as a .zip."""
    write_raw(root, rows)
    if not zipped:
        return root
    archive = root.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, p.relative_to(root))
    return archive


def _rows(*ids: int, lesion: int = 100, dx: str = "mel") -> list[dict]:
    return [{"lesion_id": f"HAM_{lesion + i:07d}", "image_id": f"ISIC_{i:07d}", "dx": dx} for i in ids]


def _merge(tmp_path: Path, *extras: Path, source: str | None = None, **synthetic):
    src = source or f"local:{_release_folder(tmp_path / 'release')}"
    raw = {"source": src, "extra_sources": [str(e) for e in extras]}
    if synthetic:
        raw["synthetic"] = synthetic
    return run(
        parse_params({"download": raw}).download,
        seed=0,
        out_dir=tmp_path / "raw",
        cache_dir=tmp_path / "cache",
    )


def _raw_meta(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "raw" / "metadata.csv", dtype=str, keep_default_na=False)


def test_extra_sources_are_merged_after_the_source(tmp_path):
    folder = _batch(tmp_path / "batch1", _rows(11, 12, 13))
    archive = _batch(tmp_path / "batch2", _rows(21, 22), zipped=True)  # a .zip, as local: takes it
    res = _merge(tmp_path, folder, archive)
    assert (res.n_rows, res.n_images) == (len(ROWS) + 3 + 2, len(ROWS) + 3 + 2)
    assert [n for _, n in res.rows_per_source] == [len(ROWS), 3, 2]
    assert res.rows_per_source[1][0] == f"download.extra_sources[0] ({folder})"

    df = _raw_meta(tmp_path)
    assert list(df.columns) == list(HAM_COLUMNS)
    assert df["image_id"].tolist() == [r[1] for r in ROWS] + [f"ISIC_{i:07d}" for i in (11, 12, 13, 21, 22)]
    assert df["age"].tolist()[-5:] == ["50.0"] * 5  # normalised like any local: source
    images = tmp_path / "raw" / "images"
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{i}.jpg" for i in df["image_id"])
    assert (images / "ISIC_0000012.jpg").read_bytes() == (folder / "images" / "ISIC_0000012.jpg").read_bytes()
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["images", "metadata.csv"]
    assert not any((tmp_path / "cache").iterdir()), "extraction scratch must be cleaned up"


def test_no_extra_sources_leaves_the_source_as_it_was(tmp_path):
    _merge(tmp_path)
    alone = _snapshot(tmp_path / "raw")
    src = tmp_path / "release"
    assert _download(f"local:{src}", tmp_path / "raw2", tmp_path / "cache").n_rows == len(ROWS)
    assert alone == _snapshot(tmp_path / "raw2")


def test_identical_image_in_two_sources_is_kept_once(tmp_path, caplog):
    src = _release_folder(tmp_path / "release")
    # The source's first row again (age written 45, normalised to 45.0 like the source's) with
    # the very same image file; a new image of a known lesion; a known lesion with another dx.
    batch = _batch(
        tmp_path / "batch",
        [
            {"lesion_id": "HAM_0000001", "image_id": "ISIC_0000031", "dx": "nv"},
            {"lesion_id": "HAM_0000002", "image_id": "ISIC_0000032", "dx": "bcc"},
        ],
    )
    with open(batch / "metadata.csv", "a") as fh:
        fh.write("HAM_0000001,ISIC_0000001,nv,follow_up,45,male,back\n")
    (batch / "images" / "ISIC_0000001.jpg").write_bytes(
        (src / "HAM10000_images_part_1" / "ISIC_0000001.jpg").read_bytes()
    )
    caplog.set_level("INFO", logger="skinlesion.sources.local")
    res = _merge(tmp_path, batch, source=f"local:{src}")
    assert (res.n_rows, res.n_images) == (len(ROWS) + 2, len(ROWS) + 2)
    ids = _raw_meta(tmp_path)["image_id"].tolist()
    assert ids == [r[1] for r in ROWS] + ["ISIC_0000031", "ISIC_0000032"]
    assert (
        "1 image(s) identical (rows and bytes) to ones merged already, kept once: ISIC_0000001" in caplog.text
    )
    # known lesions are merged (split keeps each lesion_id in one split), and said so
    assert "2 lesion_id(s) also in earlier sources: HAM_0000001, HAM_0000002" in caplog.text
    assert "lesion_id HAM_0000002 has another dx in an earlier source; validate will refuse it" in caplog.text


def test_the_same_batch_listed_twice_adds_it_once(tmp_path):
    batch = _batch(tmp_path / "batch", _rows(41, 42))
    res = _merge(tmp_path, batch, batch)
    assert res.n_rows == len(ROWS) + 2
    assert [n for _, n in res.rows_per_source] == [len(ROWS), 2, 0]


@pytest.mark.parametrize("what", ["row", "image", "two batches"])
def test_conflicting_image_id_names_the_id_and_both_sources_and_keeps_raw(tmp_path, what):
    raw = _good_raw(tmp_path)  # a previous data/raw that a failed merge must leave intact
    before = _snapshot(raw)
    src = tmp_path / "release"
    batch = tmp_path / "batch"
    extras, first, second = [batch], f"download.source (local:{src})", f"download.extra_sources[0] ({batch})"
    if what == "row":  # ISIC_0000003 is a mel in the source; the same file, labelled nv here
        _batch(batch, [*_rows(51), {"lesion_id": "HAM_0000002", "image_id": "ISIC_0000003", "dx": "nv"}])
        (batch / "images" / "ISIC_0000003.jpg").write_bytes(
            (src / "HAM10000_images_part_2" / "ISIC_0000003.jpg").read_bytes()
        )
    elif what == "image":  # the source's row word for word, another picture
        _batch(batch, [dict(zip(HAM_COLUMNS, ROWS[2], strict=True))])
    else:  # two new batches that give different images the ids ISIC_0000061 and _62
        a = _batch(tmp_path / "a", _rows(61, 62, 63))
        b = _batch(tmp_path / "b", _rows(62, 61, lesion=200))
        extras, first, second = [a, b], f"download.extra_sources[0] ({a})", f"download.extra_sources[1] ({b})"
    with pytest.raises(StageError) as e:
        _merge(tmp_path, *extras, source=f"local:{src}")
    msg = str(e.value)
    assert "\n" not in msg
    ids = "ISIC_0000061, ISIC_0000062" if what == "two batches" else "ISIC_0000003"
    assert f"image_id {ids} in both {first} and {second} with a different row or image" in msg
    assert _snapshot(raw) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]


def test_missing_or_unlabelled_extra_source_names_its_key(tmp_path, capsys):
    raw = _good_raw(tmp_path)
    before = _snapshot(raw)
    batch = _batch(tmp_path / "batch", _rows(71))
    unlabelled = tmp_path / "unlabelled"  # images only: a batch to monitor, not to train on
    make_jpeg(unlabelled / "ISIC_0000072.jpg")
    cases = [
        (
            [batch, tmp_path / "gone"],
            f"download.extra_sources[1]: local path '{tmp_path / 'gone'}' does not exist",
        ),
        ([batch, unlabelled], f"download.extra_sources[1]: {unlabelled}: no HAM10000 metadata table found"),
    ]
    for extras, message in cases:
        params = tmp_path / "params.yaml"
        listed = [str(e) for e in extras]
        params.write_text(f"download:\n  source: local:{tmp_path / 'release'}\n  extra_sources: {listed}\n")
        rc = main(["--params", str(params), "--out", str(raw), "--cache", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert rc == 1
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and message in error_lines[0], err
        assert _snapshot(raw) == before


def test_cli_extra_source_flag_overrides_params(tmp_path):
    _release_folder(tmp_path / "release")
    batch = _batch(tmp_path / "batch", _rows(81, 82))
    params = tmp_path / "params.yaml"
    params.write_text(f"download:\n  source: local:{tmp_path / 'release'}\n  extra_sources: [/not/used]\n")
    argv = ["--params", str(params), "--out", str(tmp_path / "raw"), "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--extra-source", str(batch)]) == 0
    assert len(_raw_meta(tmp_path)) == len(ROWS) + 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["local:../batch"], "download.extra_sources[0]: write the path without 'local:' ('../batch')"),
        (["ok", " "], "download.extra_sources[1]: empty path"),
        ("../batch", "download.extra_sources: expected a list"),
    ],
)
def test_bad_extra_sources_params_name_the_key(extra, message):
    with pytest.raises(ParamsError) as e:
        parse_params({"download": {"extra_sources": extra}})
    assert message in str(e.value)


@pytest.mark.realdata
def test_real_labelled_batch_merges_into_a_synthetic_base(tmp_path, shared_ham):
    import shutil

    from skinlesion.sources.synthetic_catalogue import plan_dataset

    synthetic = {"n_images": 60, "width": 64, "height": 48}
    base_ids = {
        s.image_id
        for p in plan_dataset(parse_params({"download": {"synthetic": synthetic}}).download.synthetic, 0)
        for s in p.shots
    }
    real = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    # The default synthetic ids imitate HAM's numbering (ISIC_0024306...), so a few of them are
    # real ids too; leave those out, or the merge rightly refuses them as conflicting.
    subset = real[~real["image_id"].isin(base_ids)].sample(300, random_state=0)
    batch = tmp_path / "batch"
    (batch / "images").mkdir(parents=True)
    subset.to_csv(batch / "metadata.csv", index=False)
    for image_id in subset["image_id"]:
        shutil.copyfile(
            shared_ham / "images_200x150" / f"{image_id}.jpg", batch / "images" / f"{image_id}.jpg"
        )

    res = _merge(tmp_path, batch, source="synthetic", **synthetic)
    assert (res.n_rows, res.n_images) == (60 + 300, 60 + 300)
    df = _raw_meta(tmp_path)
    assert list(df.columns) == list(HAM_COLUMNS)
    assert set(subset["lesion_id"]) <= set(df["lesion_id"])
    pd.testing.assert_frame_equal(df.iloc[60:].reset_index(drop=True), subset.reset_index(drop=True))
    for image_id in subset["image_id"].iloc[::37]:
        assert (tmp_path / "raw" / "images" / f"{image_id}.jpg").read_bytes() == (
            shared_ham / "images_200x150" / f"{image_id}.jpg"
        ).read_bytes()


def test_zip_caps_on_entries_and_uncompressed_size_name_the_archive(tmp_path):
    import zipfile

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(5):
            zf.writestr(f"images/ISIC_000000{k}.jpg", b"\0" * 10_000)  # compresses to a few bytes
    assert archive.stat().st_size < 2_000
    with pytest.raises(StageError, match=r"bomb.zip: 5 entries, over the limit of 4"):
        safe_extract_zip(archive, tmp_path / "a", max_entries=4)
    too_big = r"bomb.zip: 50,000 bytes uncompressed, over the limit of 49,999 bytes \(a zip bomb"
    with pytest.raises(StageError, match=too_big):
        safe_extract_zip(archive, tmp_path / "b", max_bytes=49_999)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    safe_extract_zip(archive, tmp_path / "c", max_entries=5, max_bytes=50_000)
    assert len(list((tmp_path / "c" / "images").iterdir())) == 5


# --------------------------------------------------------------------------- hostile archives


def _hostile_zip(path: Path, members: list[tuple[str, str, bool]]) -> Path:
    """A zip of (name, content, is_symlink) members; a symlink's content is its target, with the
    Unix mode bits Info-ZIP writes for ``zip --symlinks``."""
    ok = _release_folder(path.parent / f"{path.stem}-release")
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(ok.rglob("*")):  # a real release around the bad member
            zf.write(p, p.relative_to(ok))
        for name, content, link in members:
            info = zipfile.ZipInfo(name)
            if link:
                info.create_system = 3  # Unix
                info.external_attr = (0o120777 << 16) & 0xFFFF0000
            zf.writestr(info, content)
    return path


@pytest.mark.parametrize(
    "members, bad",
    [
        # a symlink posing as an image: its import would copy /etc/passwd into data/raw
        (
            [("HAM10000_images_part_1/ISIC_0000099.jpg", "/etc/passwd", True)],
            "HAM10000_images_part_1/ISIC_0000099.jpg",
        ),
        # a symlinked folder, then a member written through it (symlink escape)
        ([("escape", "/tmp", True), ("escape/evil.jpg", "payload", False)], "escape"),
        ([("rel", "../../..", True)], "rel"),
    ],
)
def test_symlink_member_is_refused_naming_archive_and_member(tmp_path, members, bad):
    archive = _hostile_zip(tmp_path / "links.zip", members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(StageError) as e:
        safe_extract_zip(archive, dest)
    assert str(e.value) == f"{archive}: refusing symbolic link entry {bad!r}"
    assert not any(dest.iterdir()), "nothing may be extracted from an archive with a bad entry"


@pytest.mark.parametrize(
    "entry",
    ["../evil.jpg", "/etc/evil.jpg", "images/../../evil.jpg", "..\\evil.jpg", "images\\..\\..\\evil.jpg"],
)
def test_zip_slip_error_names_archive_and_member(tmp_path, entry):
    archive = _hostile_zip(tmp_path / "slip.zip", [(entry, "payload", False)])
    dest = tmp_path / "x" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(StageError) as e:
        safe_extract_zip(archive, dest)
    assert str(e.value) == f"{archive}: refusing entry {entry!r} that escapes the target folder"
    assert not (tmp_path / "x" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert not any(dest.iterdir())


@pytest.mark.parametrize("key", ["source", "extra_sources"])
def test_hostile_zip_source_fails_the_stage_in_one_line_and_keeps_raw(tmp_path, capsys, key):
    """Through the stage's CLI, as `dvc repro download` runs it: the archive and the member are
    named, data/raw stays as it was and the extraction scratch is cleaned up."""
    raw = _good_raw(tmp_path)
    before = _snapshot(raw)
    archive = _hostile_zip(
        tmp_path / "batch.zip", [("HAM10000_images_part_2/ISIC_0000098.jpg", "/etc/shadow", True)]
    )
    params = tmp_path / "params.yaml"
    if key == "source":
        params.write_text(f"download:\n  source: local:{archive}\n")
    else:  # the good release as the source (not 700 synthetic images), the archive as a batch
        release = tmp_path / "release"
        params.write_text(f"download:\n  source: local:{release}\n  extra_sources: [{archive}]\n")
    cache = tmp_path / "cache"
    rc = main(["--params", str(params), "--out", str(raw), "--cache", str(cache)])
    err = capsys.readouterr().err
    assert rc == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert (
        f"{archive}: refusing symbolic link entry 'HAM10000_images_part_2/ISIC_0000098.jpg'" in error_lines[0]
    )
    assert "Traceback" not in err
    assert _snapshot(raw) == before
    assert not any(p.name.startswith("extract-") for p in cache.rglob("*"))
