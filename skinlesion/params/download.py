"""The ``download`` section: where the images come from (synthetic, Dataverse, a local folder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from skinlesion.params.schema import ParamsError, bounded


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded default data set: HAM10000-shaped, drawn procedurally from the seed."""

    n_images: int = bounded(700, lo=7, hi=200_000)
    width: int = bounded(200, lo=32, hi=4096)
    height: int = bounded(150, lo=32, hi=4096)
    max_images_per_lesion: int = bounded(6, lo=1, hi=6)
    jpeg_quality: int = bounded(90, lo=50, hi=100)
    # Fraction of lesions drawn a second time under a different lesion_id (same physical lesion
    # catalogued twice, as happens in real archives): the split stage must still group them.
    cross_id_duplicate_rate: float = bounded(0.02, lo=0.0, hi=0.5)
    # Fraction of lesions drawn part-way towards a look-alike class (a naevus that looks like a
    # melanoma): keeps the task learnable but not perfectly separable, as in real dermoscopy.
    atypical_rate: float = bounded(0.2, lo=0.0, hi=1.0)
    # Whose set it is (skinlesion/sources/synthetic_catalogue.py's PROFILES): default, or another
    # clinic with its own patients and dermatoscope (colour cast, lighting, vignette, export): a
    # drifted batch. Each clinic's image_ids and lesion_ids come from its own range: it can join
    # the default set.
    profile: Literal["default", "clinic_b", "clinic_c"] = "default"


@dataclass(frozen=True)
class DataverseParams:
    """Harvard Dataverse release of HAM10000 (doi:10.7910/DVN/DBW86T)."""

    base_url: str = "https://dataverse.harvard.edu"
    doi: str = "doi:10.7910/DVN/DBW86T"
    files: tuple[str, ...] = (
        "HAM10000_images_part_1.zip",
        "HAM10000_images_part_2.zip",
        "HAM10000_metadata.tab",
    )
    timeout_s: float = bounded(30.0, lo=0.1, hi=3600)
    retries: int = bounded(5, lo=0, hi=50)
    backoff_s: float = bounded(2.0, lo=0.0, hi=600)
    chunk_bytes: int = bounded(1 << 20, lo=1024, hi=1 << 30)
    # A listed file with neither checksum nor size cannot be verified: refuse it, or warn loudly.
    unverified: Literal["refuse", "warn"] = "refuse"


@dataclass(frozen=True)
class DownloadParams:
    # "synthetic" | "dataverse" | "local:PATH" (folder or .zip in HAM10000 layout; a relative
    # PATH is taken from the repository root, where dvc runs the stage).
    source: str = "synthetic"
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    dataverse: DataverseParams = field(default_factory=DataverseParams)
    # More labelled data merged with the source into data/raw: each a PATH as local:PATH takes
    # (folder or .zip in HAM10000 layout, relative to the repository root), e.g. a new batch.
    extra_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, extra in enumerate(self.extra_sources):
            key = f"download.extra_sources[{i}]"
            if not extra.strip():
                raise ParamsError(f"{key}: empty path; give a folder or .zip in HAM10000 layout")
            if extra.startswith("local:"):
                raise ParamsError(f"{key}: write the path without 'local:' ({extra[len('local:') :]!r})")
        if self.source in ("synthetic", "dataverse"):
            return
        if self.source.startswith("local:") and len(self.source) > len("local:"):
            return
        raise ParamsError(
            f"download.source: unknown source {self.source!r}; use 'synthetic', 'dataverse' or 'local:PATH'"
        )

    @property
    def local_path(self) -> Path | None:
        return Path(self.source[len("local:") :]) if self.source.startswith("local:") else None

    @property
    def extra_paths(self) -> tuple[Path, ...]:
        return tuple(Path(extra) for extra in self.extra_sources)
