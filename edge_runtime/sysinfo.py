"""Process and machine facts for reports and benchmarks (Linux /proc first, portable fallbacks)."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident set size now, in MiB."""
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: the peak is the best we have
        return peak_rss_mb()
    return round(kb / 1024.0, 1)


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        scale = 1024.0 if sys.platform == "darwin" else 1.0  # bytes on macOS, KiB elsewhere
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    return round(kb / 1024.0, 1)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    from edge_runtime.profiles import read_board_model

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(float(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(), "ram_gb": mem,
            "board": read_board_model() or None, "os": platform.platform(),
            "python": platform.python_version()}
