"""Run one measurement in a fresh Python process and read its memory use.

Each case (an engine, a precision) runs in its own interpreter so that peak RSS
belongs to it alone. Memory is reported above a baseline taken in the same
process after its imports and before any model is loaded: the interpreter and
the engine's libraries are not the model's footprint.

Child protocol: `python -m llava_pipeline.bench.measure MODULE:FUNC JSON_KWARGS
[PREIMPORT ...]` imports PREIMPORTs, records the baseline, calls FUNC(**kwargs)
(which returns a JSON-able dict) and prints one JSON line prefixed by RESULT_TAG.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

RESULT_TAG = "@@bench-result@@ "
# In a child: its baseline RSS (MiB), for cases that report the peak of a phase as well.
baseline_mb: float | None = None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """High-water resident set size of this process, MiB."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def isolated(target: str, kwargs: dict | None = None, preimport: tuple[str, ...] = (),
             threads: int | None = None, timeout: float | None = None) -> dict:
    """Run `target` ("pkg.module:func") in a fresh interpreter; its dict result plus
    rss_base_mb / rss_peak_mb / rss_above_base_mb."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, "-m", "llava_pipeline.bench.measure", target, json.dumps(kwargs or {}), *preimport]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise RuntimeError(f"{target} failed (exit {proc.returncode}):\n{tail}")


def _child(argv: list[str]) -> int:
    target, kwargs_json, *preimport = argv
    for name in preimport:
        importlib.import_module(name)
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    base = rss_mb()
    # run as `python -m`, this file is __main__: the cases import it under its package name
    importlib.import_module("llava_pipeline.bench.measure").baseline_mb = base
    reset_peak_rss()
    result = dict(func(**json.loads(kwargs_json)))
    peak = peak_rss_mb()
    result.update(
        rss_base_mb=round(base, 1),
        rss_peak_mb=round(peak, 1),
        rss_above_base_mb=round(peak - base, 1),
    )
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
