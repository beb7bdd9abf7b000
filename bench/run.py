"""Run every benchmark (bench/bench_*.py), each in its own process, and index the results.

Each benchmark measures the project's way and a baseline side by side in one run and writes
``bench/results/<name>.md``. Needs the real images in ../shared/data/ham10000.

    python -m bench.run            # all
    python -m bench.run split      # only bench_split
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="benchmark names (split, prepare, validate, train, ...)")
    args = ap.parse_args(argv)
    names = sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py"))
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"error: unknown benchmark(s) {unknown}; available: {names}", file=sys.stderr)
            return 2
        names = args.only
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== bench_{name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"bench.bench_{name}"], cwd=BENCH.parent)
        print(f"== bench_{name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    results = sorted((BENCH / "results").glob("*.md"))
    lines = ["# Benchmark results", "", "Reproduce with `make bench` (or `python -m bench.run NAME`).", ""]
    lines += [f"- [{p.stem}](results/{p.name})" for p in results]
    (BENCH / "RESULTS.md").write_text("\n".join(lines) + "\n")
    if failed:
        print(f"error: benchmark(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
