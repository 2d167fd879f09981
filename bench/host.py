"""The machine around a measurement: its last-level cache, and how busy other jobs keep it.

``last_level_cache_bytes``: the size of the CPU's highest cache level (sysfs); weights and
KV cache smaller than it need not come from DRAM. ``machine_busy``: the share of all cores
busy over an interval while this process sleeps (from /proc/stat), and ``load_average``
the 1-minute load average: a run records both before each case, so that a reader can tell
timings taken on a quiet machine (``machine_busy_before`` near 0) from the others.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache size ("32768K", "2M", "512")."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def last_level_cache_bytes(cpu_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the CPU's highest cache level (None where sysfs does not say). Weights and KV
    cache smaller than it need not come from DRAM: the bandwidth limit does not bind then."""
    best = None
    for index in sorted(cpu_dir.glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def busy_fraction(before: str, after: str) -> float | None:
    """Share of all cores' time spent busy between two readings of /proc/stat's "cpu" line."""
    a, b = ([int(v) for v in line.split()[1:9]] for line in (before, after))
    total = sum(b) - sum(a)
    idle = (b[3] + b[4]) - (a[3] + a[4])  # idle + iowait
    return round((total - idle) / total, 3) if total > 0 else None


def machine_busy(interval: float = 0.5) -> float | None:
    """How busy the machine's cores are over ``interval`` s while this process only sleeps:
    the CPU other jobs take away from the next case (0 = idle, 1 = every core busy)."""

    def read() -> str:
        with open("/proc/stat") as f:
            return f.readline()

    try:
        first = read()
        time.sleep(interval)
        return busy_fraction(first, read())
    except (OSError, ValueError, IndexError):
        return None
