"""Resident memory of this process and of the children it waited for, as Linux keeps it.

- `peak_mb()`: this process's high-water RSS, /proc/self/status VmHWM: since the process
  started, or since the last `reset_peak()`. Not getrusage's ru_maxrss: Linux carries
  ru_maxrss across execve, so a process started by a large parent (a notebook, a benchmark
  driver) would report the parent's size. ru_maxrss only where /proc has no VmHWM.
- `reset_peak()`: VmHWM back to the current RSS (5 written to /proc/self/clear_refs,
  Linux >= 4.0); False where that is refused.
- `peak_with_children_mb()`: the larger of `peak_mb()` and the children's ru_maxrss
  (RUSAGE_CHILDREN, the largest of the children waited for). A child's ru_maxrss starts at
  this process's size, so that figure can only be inflated up to this process's own peak.
- `current_mb()`: VmRSS; `status_kb(field)`: any field of /proc/self/status, in KiB.

All in MiB (KiB for `status_kb`); Linux only, like the rest of the pipeline.
"""

from __future__ import annotations

import resource


def status_kb(field: str) -> int | None:
    """`field` of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in KiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_mb() -> float:
    """Current resident set size of this process, MiB."""
    kb = status_kb("VmRSS")
    if kb is None:
        raise RuntimeError("/proc/self/status has no VmRSS")
    return kb / 1024


def _peak_kb() -> int:
    kb = status_kb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if kb is None else kb


def peak_mb() -> float:
    """High-water resident set size of this process, MiB (see the module docstring)."""
    return _peak_kb() / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_with_children_mb() -> float:
    """Peak RSS of this process and of the children it waited for, MiB to 0.1."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(_peak_kb(), kids) / 1024, 1)
