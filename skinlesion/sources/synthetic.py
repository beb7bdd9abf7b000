"""The embedded default data set: procedurally drawn, HAM10000-shaped dermoscopy images.

Why synthetic: a fresh machine has no real data (HAM10000 is large and licence-bound), yet the
whole pipeline - leakage-safe splitting, validation, training, calibration, drift - must run
offline in minutes. So this module draws a set with the properties the pipeline has to handle:

* the exact HAM10000 metadata columns and value sets, with class-dependent dx_type, age, sex and
  site measured on the real metadata, and shuffled ids that reveal neither class nor lesion;
* the 7 classes with HAM's imbalance (nv ~ 2/3, df ~ 1 %), but a floor of lesions per class so
  a train/val/test group split stays possible on a few hundred images;
* lesions with 1-6 images whose re-shots are near-duplicates (moved, turned, zoomed, re-lit,
  re-compressed), and a few physical lesions catalogued under two ``lesion_id`` values: the
  leakage the split stage's duplicate detection must catch;
* dermoscopy-like pictures: skin of varied tone and texture, hairs, a dermatoscope vignette or
  black ring, and a lesion whose size, shape, border, colours and structures (pigment network,
  globules, vessels, lacunae, scale, white scar) follow its class; a share of lesions borrows
  the look of a look-alike class, so a model can learn the task but never perfectly.

Device profiles (``download.synthetic.profile``, ``--profile``): ``default`` is the set above;
each other profile is another clinic, photographing its own patients with its own dermatoscope:
a colour cast, other mid-tones, another lens fall-off, sensor and JPEG export. A drift check must
flag such a batch; a classifier must still see its lesions (same classes, same looks). A clinic's
lesions come from its own random stream and its image_ids and lesion_ids from its own block of
numbers (``ID_BLOCK``), so a labelled batch from another clinic can join the default set as
training data without reusing an id or a lesion of it, whatever the two seeds and sizes.

Determinism: the catalogue comes from one RNG, and each physical lesion (and each of its shots)
from its own ``SeedSequence(seed, spawn_key=...)``, so the bytes are identical for a seed
whatever the number of worker processes; and whatever the CPU (with or without AVX-512, AVX2,
FMA): the drawing uses no function whose last bits depend on it (:mod:`skinlesion.sources.exactmath`).
tests/unit/sources/test_synthetic_platform.py pins the bytes and re-draws them with numpy's SIMD
kernels and libjpeg-turbo's switched off.

The jobs: the catalogue without pixels (:mod:`skinlesion.sources.synthetic_catalogue`: classes,
metadata, lesions, ids, the device profiles), the drawing (:mod:`skinlesion.sources.synthetic_draw`)
and, here, writing a set in parallel and the command line.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir
from skinlesion.core.parallel import n_workers
from skinlesion.core.schema import CLASSES, HAM_COLUMNS
from skinlesion.params.base import BaseParams
from skinlesion.params.download import DownloadParams, SyntheticParams
from skinlesion.params.schema import Sections, build_section, load_sections
from skinlesion.sources.synthetic_catalogue import PROFILES, LesionPlan, clinic_seed, plan_dataset
from skinlesion.sources.synthetic_draw import render_lesion

log = logging.getLogger(__name__)

__all__ = ["SyntheticResult", "generate", "main"]


@dataclass(frozen=True)
class SyntheticResult:
    n_images: int
    n_lesions: int  # distinct lesion_id values
    class_counts: dict[str, int]  # images per class
    n_cross_id_duplicates: int = 0  # lesion_ids that re-photograph another lesion_id's lesion


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _render_chunk(job: tuple[list[LesionPlan], int, int, int, int, str, str]) -> int:
    """Worker: draw and write every photograph of a chunk of lesions; returns the image count."""
    plans, seed, width, height, quality, profile, img_dir = job
    n = 0
    for plan in plans:
        for shot, pixels in zip(plan.shots, render_lesion(plan, seed, width, height, profile), strict=True):
            (Path(img_dir) / f"{shot.image_id}.jpg").write_bytes(_jpeg(pixels, quality))
            n += 1
    return n


# --------------------------------------------------------------------------- the generator


def _chunks(plans: list[LesionPlan], images_per_chunk: int) -> list[list[LesionPlan]]:
    chunks: list[list[LesionPlan]] = [[]]
    n = 0
    for plan in plans:
        if n >= images_per_chunk:
            chunks.append([])
            n = 0
        chunks[-1].append(plan)
        n += len(plan.shots)
    return [c for c in chunks if c]


def generate(params: SyntheticParams, seed: int, out_dir: Path, *, workers: int = 0) -> SyntheticResult:
    """Write ``out_dir/metadata.csv`` and ``out_dir/images/<image_id>.jpg`` (``out_dir``: empty).

    Byte-identical for the same params and seed, whatever ``workers`` (0 = all cores).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise StageError(f"{out_dir}: output folder does not exist")
    if any(out_dir.iterdir()):
        raise StageError(f"{out_dir}: output folder is not empty")
    plans = plan_dataset(params, seed)
    rows = [
        {"lesion_id": shot.lesion_id, "image_id": shot.image_id, "dx": p.dx, **p.meta}
        for p in plans
        for shot in p.shots
    ]
    # Sorted by the (random) ids, lesion by lesion like HAM's file; row order reveals no class.
    rows.sort(key=lambda r: (r["lesion_id"], r["image_id"]))
    with open(out_dir / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=HAM_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)

    img_dir = out_dir / "images"
    img_dir.mkdir()
    n_proc = n_workers(workers)
    quality = min(params.jpeg_quality, PROFILES[params.profile].max_jpeg_quality)
    # Chunks of ~32 images: large enough to amortise process hand-off, small enough to balance.
    jobs = [
        (
            c,
            clinic_seed(params.profile, seed),
            params.width,
            params.height,
            quality,
            params.profile,
            str(img_dir),
        )
        for c in _chunks(plans, 32)
    ]
    with tqdm(total=len(rows), desc="draw synthetic images", unit="img") as bar:
        if n_proc == 1 or len(jobs) == 1:
            for job in jobs:
                bar.update(_render_chunk(job))
        else:
            with ProcessPoolExecutor(min(n_proc, len(jobs))) as pool:
                for n in pool.map(_render_chunk, jobs):
                    bar.update(n)

    counts = {c: sum(1 for r in rows if r["dx"] == c) for c in CLASSES}
    n_lesions = len({r["lesion_id"] for r in rows})
    n_dup = sum(len({shot.lesion_id for shot in p.shots}) - 1 for p in plans)
    log.info(
        "synthetic (profile %s): %d images of %d lesion_ids (%d catalogued twice), per class %s",
        params.profile, len(rows), n_lesions, n_dup, counts,
    )  # fmt: skip
    return SyntheticResult(len(rows), n_lesions, counts, n_dup)


def _looks_like_ours(folder: Path) -> bool:
    return {p.name for p in folder.iterdir()} <= {"metadata.csv", "images"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m skinlesion.sources.synthetic",
        description="Draw a synthetic HAM10000-layout folder (metadata.csv + images/<image_id>.jpg), "
        "e.g. to try download.source=local:PATH. The pipeline's download stage calls the same code "
        "with params.yaml's download.synthetic section and base.seed.",
    )
    ap.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write; replaced atomically if it holds an earlier synthetic set",
    )
    ap.add_argument("--params", type=Path, help="take download.synthetic and base.seed from this params.yaml")
    ap.add_argument("--n-images", type=int, help="number of images (default: params, else 700)")
    ap.add_argument("--seed", type=int, help="random seed (default: params' base.seed, else 42)")
    ap.add_argument("--width", type=int, help="image width in pixels (default 200)")
    ap.add_argument("--height", type=int, help="image height in pixels (default 150)")
    ap.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="the device that photographs the set: "
        + "; ".join(f"{p.name} ({p.description})" for p in PROFILES.values())
        + ". Another clinic draws other lesions (same classes and looks), with image_ids and "
        "lesion_ids of its own. Default: params' download.synthetic.profile, else default",
    )
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)  # fmt: skip
    setup_logging(args.verbose)

    def body() -> int:
        params = (
            load_sections(args.params, base=BaseParams, download=DownloadParams)
            if args.params
            else Sections(base=BaseParams(), download=DownloadParams())
        )
        overrides = {
            "n_images": args.n_images,
            "width": args.width,
            "height": args.height,
            "profile": args.profile,
        }
        raw = {k: getattr(params.download.synthetic, k) for k in SyntheticParams.__dataclass_fields__}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        synthetic = build_section(SyntheticParams, raw, "download.synthetic.")
        seed = params.base.seed if args.seed is None else args.seed
        if args.out.exists() and not (args.out.is_dir() and _looks_like_ours(args.out)):
            raise StageError(f"{args.out}: exists and is not a synthetic data set; choose a new folder")
        with atomic_dir(args.out) as tmp:
            res = generate(synthetic, seed, tmp, workers=args.workers)
        log.info("wrote %s: %d images, %d lesion_ids", args.out, res.n_images, res.n_lesions)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
