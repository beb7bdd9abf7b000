"""The ``local:PATH`` source and the extra sources: a HAM10000-layout folder or ``.zip`` into ``data/raw``.

A source folder (or a zip, extracted safely first) holds a metadata table (``.csv`` or Dataverse's
``.tab``, LF or CRLF, ages ``80`` or ``80.0``) and ``<image_id>.jpg`` files anywhere below it (the
original release splits them over ``HAM10000_images_part_1/`` and ``_part_2/``). It becomes
``metadata.csv`` (exact HAM10000 columns, LF, ages numeric or empty) and ``images/<image_id>.jpg``
(source bytes unchanged). Extra sources (``download.extra_sources``) are read the same way and
merged after the first: an image_id in two sources is kept once when its rows and image bytes are
identical, and is an error otherwise. The download stage (:mod:`stages.download`) picks the source.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm import tqdm

from skinlesion.core.errors import StageError
from skinlesion.core.images import JPEG_SUFFIXES
from skinlesion.core.schema import HAM_COLUMNS
from skinlesion.core.tables import name_first, read_table

log = logging.getLogger(__name__)

METADATA_SUFFIXES = {".csv", ".tab", ".tsv"}


@dataclass(frozen=True)
class DownloadResult:
    source: str
    n_rows: int
    n_images: int
    # (source, metadata rows it added) in merge order, when download.extra_sources is not empty
    rows_per_source: tuple[tuple[str, int], ...] = ()


# --------------------------------------------------------------------------- zip handling


# HAM10000's two image archives hold 10,015 files, ~3 GB uncompressed: 10x both is generous for
# a real data set and still refuses a zip bomb (a few KB that expand to terabytes).
MAX_ZIP_ENTRIES = 200_000
MAX_ZIP_BYTES = 50 * 2**30


def safe_extract_zip(
    zip_path: Path, dest: Path, *, max_entries: int = MAX_ZIP_ENTRIES, max_bytes: int = MAX_ZIP_BYTES
) -> None:
    """Extract ``zip_path`` into ``dest``, refusing any entry that would land outside it.

    Why not ``ZipFile.extractall``: it silently rewrites ``../`` and absolute names; a crafted
    archive should be an error the user hears about, not a quietly different file tree. The
    entry count and the total uncompressed size (as the archive declares them, checked before
    anything is written; ``zipfile`` never inflates an entry past its declared size) are capped too.
    """
    dest = dest.resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise StageError(f"{zip_path}: not a readable zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise StageError(f"{zip_path}: {len(infos):,} entries, over the limit of {max_entries:,}")
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise StageError(
                f"{zip_path}: {total:,} bytes uncompressed, over the limit of {max_bytes:,} bytes "
                "(a zip bomb, or not a HAM10000 archive)"
            )
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            target = (dest / Path(*parts)).resolve() if parts else dest
            if name.startswith(("/", "\\")) or ".." in parts or not target.is_relative_to(dest):
                raise StageError(f"{zip_path}: refusing entry {name!r} that escapes the target folder")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise StageError(f"{zip_path}: refusing symbolic link entry {name!r}")
        for info in tqdm(zf.infolist(), desc=f"extract {zip_path.name}", unit="file", leave=False):
            zf.extract(info, dest)


# --------------------------------------------------------------------------- metadata


def read_metadata_table(path: Path) -> pd.DataFrame:
    """A HAM10000 metadata table (.csv or Dataverse .tab): exact columns, stripped text, ages
    normalised. Rows sharing an image_id are kept: the validate stage names them."""
    df = read_table(path, required=HAM_COLUMNS)
    extra = [c for c in df.columns if c not in HAM_COLUMNS]
    if extra:
        log.warning("%s: ignoring extra column(s) %s", path, extra)
    df = df[list(HAM_COLUMNS)].apply(lambda s: s.str.strip()).reset_index(drop=True)
    df["age"] = df["age"].map(_normalise_age)
    return df


def _normalise_age(value: str) -> str:
    """``80`` and ``80.0`` (and Dataverse's ``NA``) become ``80.0`` / empty, as in the CSV release.

    Anything else is kept verbatim so the validate stage can name the row.
    """
    if value in ("", "NA", "NaN", "nan", "null", "None"):
        return ""
    try:
        return f"{float(value):.1f}"
    except ValueError:
        return value


def write_metadata_csv(df: pd.DataFrame, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        df.to_csv(fh, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


# --------------------------------------------------------------------------- local import


def find_metadata_table(root: Path) -> Path:
    candidates = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in METADATA_SUFFIXES)
    with_columns = []
    for p in candidates:
        with open(p, "rb") as fh:
            head = fh.readline().decode("utf-8-sig", errors="replace")
        if all(c in head for c in ("lesion_id", "image_id", "dx")):
            with_columns.append(p)
    if not with_columns:
        raise StageError(
            f"{root}: no HAM10000 metadata table found (a .csv or .tab whose header has "
            f"lesion_id,image_id,dx,...)"
        )
    if len(with_columns) > 1:
        # Prefer the one named like the release; otherwise refuse to guess.
        named = [p for p in with_columns if "metadata" in p.name.lower()]
        if len(named) != 1:
            raise StageError(f"{root}: several metadata tables found, keep one: {with_columns}")
        return named[0]
    return with_columns[0]


def index_images(root: Path) -> dict[str, Path]:
    """Map image_id -> file. When one id exists in several folders (e.g. a thumbnail folder and
    a folder of a few full-size originals), take the folder that holds the most images, so the
    import is one consistent set rather than a mix of resolutions."""
    by_id: dict[str, list[Path]] = {}
    for p in root.rglob("*"):
        if p.suffix.lower() in JPEG_SUFFIXES and p.is_file() and not p.name.startswith("._"):
            by_id.setdefault(p.stem, []).append(p)
    folder_size: dict[Path, int] = {}
    for paths in by_id.values():
        for p in paths:
            folder_size[p.parent] = folder_size.get(p.parent, 0) + 1
    chosen: dict[str, Path] = {}
    n_multi = 0
    for image_id, paths in by_id.items():
        if len(paths) > 1:
            n_multi += 1
            paths = sorted(paths, key=lambda p: (-folder_size[p.parent], str(p)))
        chosen[image_id] = paths[0]
    if n_multi:
        log.info("%d image id(s) exist in several folders; using the copy in the largest folder", n_multi)
    return chosen


def import_folder(src: Path, out_dir: Path, *, move: bool = False) -> DownloadResult:
    """Import a HAM10000-layout folder into ``out_dir`` (metadata.csv + images/).

    ``move`` renames the images instead of copying them: for our own scratch folders (an
    extracted archive), so the 2.6 GB release is not held on disk three times over."""
    meta_path = find_metadata_table(src)
    df = read_metadata_table(meta_path)
    images = index_images(src)
    if not images:
        raise StageError(f"{src}: no .jpg images found below this folder")
    log.info("importing %s: %d metadata rows (%s), %d images", src, len(df), meta_path.name, len(images))
    n_no_file = int((~df["image_id"].isin(images)).sum())
    if n_no_file:
        log.warning("%d metadata row(s) have no image file (the validate stage reports them)", n_no_file)
    write_metadata_csv(df, out_dir / "metadata.csv")
    img_dir = out_dir / "images"
    img_dir.mkdir()
    transfer = shutil.move if move else shutil.copyfile
    for image_id, path in tqdm(sorted(images.items()), desc="copy images", unit="img"):
        transfer(path, img_dir / f"{image_id}.jpg")
    return DownloadResult(source=f"local:{src}", n_rows=len(df), n_images=len(images))


def import_local(path: Path, out_dir: Path, *, scratch: Path, key: str = "download.source") -> DownloadResult:
    """``local:PATH``: a folder, or a zip that is first extracted (safely) into ``scratch``.

    ``key`` is the params key that named ``path``, for the error messages."""
    if not path.exists():
        raise StageError(f"{key}: local path {str(path)!r} does not exist")
    if path.is_dir():
        return import_folder(path, out_dir)
    if zipfile.is_zipfile(path):
        staging = Path(tempfile.mkdtemp(prefix="extract-", dir=scratch))
        try:
            safe_extract_zip(path, staging)
            try:
                return import_folder(staging, out_dir, move=True)
            except StageError as e:  # name the archive, not our scratch folder
                raise StageError(str(e).replace(str(staging), str(path))) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise StageError(f"{key}: {str(path)!r} is neither a folder nor a zip archive")


# --------------------------------------------------------------------------- extra sources


def _rows_by_id(df: pd.DataFrame) -> dict[str, list[tuple[str, ...]]]:
    rows: dict[str, list[tuple[str, ...]]] = {}
    for row in df[list(HAM_COLUMNS)].itertuples(index=False, name=None):
        rows.setdefault(row[1], []).append(row)
    return rows


def _image_bytes(img_dir: Path, image_id: str) -> bytes | None:
    path = img_dir / f"{image_id}.jpg"
    return path.read_bytes() if path.is_file() else None


@dataclass
class _Merged:
    """What the output folder holds so far, source by source."""

    img_dir: Path
    rows: dict[str, list[tuple[str, ...]]]  # image_id -> its metadata rows
    owner: dict[str, str]  # image_id (row or file) -> the source that brought it
    lesion_dx: dict[str, set[str]]  # lesion_id -> its diagnoses

    def add_lesions(self, df: pd.DataFrame) -> None:
        for lesion_id, dx in zip(df["lesion_id"], df["dx"], strict=True):
            self.lesion_dx.setdefault(lesion_id, set()).add(dx)


def _split_clashes(
    merged: _Merged, rows: dict[str, list[tuple[str, ...]]], img_dir: Path
) -> tuple[list[str], dict[str, list[str]]]:
    """Ids a new source shares with the merged ones: (identical rows and bytes, {owner: other ids})."""
    same: list[str] = []
    conflicts: dict[str, list[str]] = {}
    ids = set(rows) | {p.stem for p in img_dir.iterdir()}
    for image_id in sorted(ids & merged.owner.keys()):
        if merged.rows.get(image_id) == rows.get(image_id) and _image_bytes(
            merged.img_dir, image_id
        ) == _image_bytes(img_dir, image_id):
            same.append(image_id)
        else:
            conflicts.setdefault(merged.owner[image_id], []).append(image_id)
    return same, conflicts


def _add_source(merged: _Merged, name: str, staging: Path) -> pd.DataFrame:
    """Move one imported source (``staging``: metadata.csv + images/) into the merged output;
    return its rows that were not there yet."""
    df = read_metadata_table(staging / "metadata.csv")
    img_dir = staging / "images"
    rows = _rows_by_id(df)
    same, conflicts = _split_clashes(merged, rows, img_dir)
    if conflicts:
        raise StageError(
            "; ".join(
                f"image_id {name_first(ids)} in both {other} and {name} with a different row or image"
                for other, ids in conflicts.items()
            )
            + ": give the new images their own ids, or remove one copy"
        )
    if same:
        # The same labelled batch listed twice, or a batch that repeats images already in the
        # source: one copy is the truth, a second would only be a duplicate for split to find.
        log.info(
            "%s: %d image(s) identical (rows and bytes) to ones merged already, kept once: %s",
            name, len(same), name_first(same),
        )  # fmt: skip
        df = df[~df["image_id"].isin(same)]
    shared = sorted(set(df["lesion_id"]) & merged.lesion_dx.keys())
    if shared:
        # Legitimate (a known lesion photographed again) but worth seeing: split puts each
        # lesion_id in one split, and validate refuses a lesion with two diagnoses.
        new_dx = df.groupby("lesion_id")["dx"].agg(set)
        mixed = [les for les in shared if not new_dx[les] <= merged.lesion_dx[les]]
        log.info("%s: %d lesion_id(s) also in earlier sources: %s", name, len(shared), name_first(shared))
        if mixed:
            log.warning(
                "%s: lesion_id %s has another dx in an earlier source; validate will refuse it",
                name, name_first(mixed),
            )  # fmt: skip
    for path in img_dir.iterdir():
        if path.stem not in merged.owner:
            os.replace(path, merged.img_dir / path.name)
            merged.owner[path.stem] = name
    for image_id in df["image_id"]:
        merged.owner.setdefault(image_id, name)
        merged.rows.setdefault(image_id, rows[image_id])
    merged.add_lesions(df)
    return df


def merge_extra_sources(
    out_dir: Path, base: str, extras: Sequence[tuple[str, Path]], *, scratch: Path
) -> DownloadResult:
    """Add each extra source to ``out_dir``, a HAM10000-layout folder already holding ``base``.

    ``extras`` are (params key, path) pairs. Each is imported exactly as ``local:PATH`` is, into a
    staging folder inside ``out_dir`` (its images then move in by rename), and its rows are
    appended after the earlier ones. An image_id already merged (as a row or a file) is left out
    of the newcomer when its rows and image bytes are identical; otherwise the merge fails naming
    the ids and both sources.
    """
    img_dir = out_dir / "images"
    base_df = read_metadata_table(out_dir / "metadata.csv")
    ids = [p.stem for p in img_dir.iterdir()] + base_df["image_id"].tolist()
    merged = _Merged(img_dir, _rows_by_id(base_df), dict.fromkeys(ids, base), {})
    merged.add_lesions(base_df)
    frames, counts = [base_df], [(base, len(base_df))]
    for key, path in extras:
        name = f"{key} ({path})"
        staging = Path(tempfile.mkdtemp(prefix=".extra-", dir=out_dir))
        try:
            try:
                import_local(path, staging, scratch=scratch, key=key)
            except StageError as e:  # name the params key, and the source rather than our staging
                msg = str(e).replace(str(staging), str(path))
                raise StageError(msg if msg.startswith(key) else f"{key}: {msg}") from None
            frames.append(_add_source(merged, name, staging))
            counts.append((name, len(frames[-1])))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    df = pd.concat(frames, ignore_index=True)
    write_metadata_csv(df, out_dir / "metadata.csv")
    n_images = sum(1 for _ in img_dir.iterdir())
    log.info("merged metadata rows: %s", ", ".join(f"{n} from {src}" for src, n in counts))
    return DownloadResult(f"{base} + {len(extras)} extra source(s)", len(df), n_images, tuple(counts))
