"""Demo batch stage: the demo's "new images", another clinic drawn by the synthetic source.

``make demo`` trains on the synthetic set of ``download.synthetic``; this stage draws
``drift.demo_batch.n_images`` more images with ``drift.demo_batch.profile`` (another clinic's
dermatoscope: colour cast, lighting, vignette, JPEG export; lesions and ids of its own) and
``drift.demo_batch.seed``, so the drift stage has a shifted, labelled batch to find. It is
never training data unless listed in ``download.extra_sources``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.outputs import atomic_dir
from skinlesion.params.download import DownloadParams, SyntheticParams
from skinlesion.params.drift import DemoBatchParams, DriftParams
from skinlesion.params.schema import load_sections
from skinlesion.sources.synthetic import SyntheticResult, generate

log = logging.getLogger(__name__)


def run(batch: DemoBatchParams, synthetic: SyntheticParams, *, out_dir: Path) -> SyntheticResult:
    """Draw the batch into ``out_dir`` (replaced atomically)."""
    params = dataclasses.replace(synthetic, n_images=batch.n_images, profile=batch.profile)
    with atomic_dir(out_dir) as tmp:
        res = generate(params, batch.seed, tmp)
    log.info(
        "demo batch %s: %d images (%s profile, seed %d)", out_dir, res.n_images, batch.profile, batch.seed
    )
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.demo_batch", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params (drift.demo_batch, download.synthetic)",
    )
    ap.add_argument("--out", type=Path, required=True, help="folder to write (metadata.csv + images/)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> None:
        params = load_sections(args.params, download=DownloadParams, drift=DriftParams)
        run(params.drift.demo_batch, params.download.synthetic, out_dir=args.out)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
