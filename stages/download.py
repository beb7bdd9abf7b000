"""Download stage: bring a HAM10000-layout data set into ``data/raw``.

Sources (``download.source``):

* ``synthetic`` - the embedded default, drawn procedurally from ``base.seed`` (offline);
* ``local:PATH`` - a folder or ``.zip`` in HAM10000 layout: a metadata table (``.csv`` or
  Dataverse's ``.tab``, LF or CRLF, ages ``80`` or ``80.0``) and ``<image_id>.jpg`` files anywhere
  below it (the original release splits them over ``HAM10000_images_part_1/`` and ``_part_2/``);
* ``dataverse`` - the real release from Harvard Dataverse (resumable, checksummed).

Extra sources (``download.extra_sources``): more folders or ``.zip`` files in HAM10000 layout,
read exactly as ``local:PATH`` is, merged after the source into the same output. This is how a
labelled batch of new images joins the next data version; the split stage then groups and splits
it with the rest. An image_id in two sources is kept once when its rows and image bytes are
identical, and is an error otherwise.

Output: ``metadata.csv`` (exact HAM10000 columns, LF, ages numeric or empty) and
``images/<image_id>.jpg`` (source bytes unchanged). The output folder is replaced in one rename
only when everything succeeded, so a failed download leaves the previous ``data/raw`` intact.

The sources live in :mod:`skinlesion.sources`: ``synthetic``, ``dataverse`` and ``local`` (which
also merges the extra sources); this module reads the params and picks one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir
from skinlesion.params.base import BaseParams
from skinlesion.params.download import DownloadParams
from skinlesion.params.schema import load_sections
from skinlesion.sources.local import DownloadResult, import_local, merge_extra_sources

log = logging.getLogger(__name__)


def run(params: DownloadParams, *, seed: int, out_dir: Path, cache_dir: Path) -> DownloadResult:
    """Fetch the configured source into ``out_dir``, replacing it only on success."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    local = params.local_path
    # Resolve the sources before touching the output, so a bad source fails fast.
    if local is not None and not local.exists():
        raise StageError(f"download.source: local path {str(local)!r} does not exist")
    extras = [(f"download.extra_sources[{i}]", path) for i, path in enumerate(params.extra_paths)]
    for key, path in extras:
        if not path.exists():
            raise StageError(f"{key}: local path {str(path)!r} does not exist")
    with atomic_dir(out_dir) as tmp:
        if params.source == "synthetic":
            from skinlesion.sources.synthetic import generate

            res = generate(params.synthetic, seed, tmp)
            result = DownloadResult("synthetic", res.n_images, res.n_images)
        elif params.source == "dataverse":
            from skinlesion.sources.dataverse import fetch_dataverse, import_dataverse_files

            files = fetch_dataverse(params.dataverse, cache_dir)
            result = import_dataverse_files(files, tmp, scratch=cache_dir)
        else:
            assert local is not None
            result = import_local(local, tmp, scratch=cache_dir)
        if extras:
            result = merge_extra_sources(tmp, f"download.source ({params.source})", extras, scratch=cache_dir)
    log.info("data/raw: %d metadata rows, %d images from %s", result.n_rows, result.n_images, result.source)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.download",
        description="Bring a HAM10000-layout data set into OUT (metadata.csv + images/). "
        "The source is params.yaml's download.source: synthetic | dataverse | local:PATH. "
        "Extra sources (download.extra_sources: folders or .zip files in HAM10000 layout, e.g. "
        "labelled batches of new images) are merged after it into the same OUT.",
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)"
    )
    ap.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/raw")
    ap.add_argument(
        "--cache", type=Path, required=True, help="folder kept between runs for partial downloads"
    )
    ap.add_argument("--source", help="override download.source (e.g. local:../shared/data/ham10000)")
    ap.add_argument(
        "--extra-source",
        action="append",
        metavar="PATH",
        help="override download.extra_sources: merge this HAM10000-layout folder or .zip too "
        "(repeat for several)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_sections(args.params, base=BaseParams, download=DownloadParams)
        section = params.download
        if args.source:
            section = dataclasses.replace(section, source=args.source)
        if args.extra_source:
            section = dataclasses.replace(section, extra_sources=tuple(args.extra_source))
        run(section, seed=params.base.seed, out_dir=args.out, cache_dir=args.cache)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
