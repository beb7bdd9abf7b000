"""What the benchmarks share: the description of the machine a result was measured on."""

from __future__ import annotations

import platform
from pathlib import Path

from skinlesion.core.parallel import n_workers

CPUINFO = Path("/proc/cpuinfo")


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows, else "?"."""
    if CPUINFO.exists():
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def pillow_version() -> str:
    """Pillow's version and whether it decodes with libjpeg-turbo (what JPEG speed depends on)."""
    from PIL import __version__ as pil_version
    from PIL import features

    return f"{pil_version} (libjpeg-turbo {features.version('libjpeg_turbo') or 'no'})"


def machine(**versions: str) -> dict[str, str]:
    """The machine a benchmark ran on: cpu (with the cores this process may use), python, the
    ``versions`` of the libraries it measured (e.g. ``numpy=np.__version__``), os."""
    return {
        "cpu": f"{cpu_name()}, {n_workers()} usable core(s)",
        "python": platform.python_version(),
        **versions,
        "os": platform.platform(),
    }


def machine_text(**versions: str) -> str:
    """:func:`machine` as one line for a report: ``cpu ...; python ...; numpy ...; os ...``."""
    return "; ".join(f"{k} {v}" for k, v in machine(**versions).items())
