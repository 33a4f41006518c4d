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


THERMAL_ROOT = Path("/sys/class/thermal")


def temperatures_c(root: Path = THERMAL_ROOT) -> dict[str, float]:
    """Every thermal zone's reading in degrees Celsius, by zone type (``cpu-thermal`` on a Pi,
    ``CPU-therm``/``GPU-therm`` on a Jetson, ``x86_pkg_temp`` on a PC). Empty where the kernel exposes
    none (most VMs and containers). A zone that fails to read is left out."""
    out: dict[str, float] = {}
    try:
        zones = sorted(root.glob("thermal_zone*"))
    except OSError:
        return out
    for z in zones:
        try:
            milli = int((z / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            name = (z / "type").read_text().strip() or z.name
        except OSError:
            name = z.name
        if name in out:
            name = f"{name}-{z.name.removeprefix('thermal_zone')}"
        out[name] = round(milli / 1000.0, 1)
    return out


def temperature_c(root: Path = THERMAL_ROOT) -> float | None:
    """The hottest thermal zone in degrees Celsius, or None where there is none."""
    t = temperatures_c(root)
    return max(t.values()) if t else None
