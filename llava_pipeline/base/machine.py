"""The machine a measurement ran on, as benchmark and training records name it.

`machine()`: CPU model, core count, RAM and `isa_flags()`; `isa_flags()`: the CPU features
XNNPACK's x86 kernels dispatch on that /proc/cpuinfo lists, in ISA_FLAGS' order.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def _cpuinfo(key: str) -> str | None:
    """The first value of `key` in /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def isa_flags() -> list[str]:
    """The CPU features XNNPACK's x86 kernels dispatch on, as /proc/cpuinfo lists them."""
    have = set((_cpuinfo("flags") or "").split())
    return [f for f in ISA_FLAGS if f in have]


def machine() -> dict:
    import psutil

    cpu = _cpuinfo("model name") or platform.processor() or "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "isa": isa_flags(),
    }
