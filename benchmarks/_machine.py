"""Facts about the machine a benchmark ran on (shared by the benchmark scripts)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform


def version(dist: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    return None


def machine(*dists: str) -> dict[str, object]:
    """The machine facts of a benchmark report, with the versions of critloop and ``dists``."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_gib": mem_total_gib(),
        "python": platform.python_version(),
        **{dist: version(dist) for dist in ("critloop", *dists)},
    }
