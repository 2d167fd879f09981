"""Run one measurement in a fresh Python process and read its memory use.

Each case (an engine, a precision) runs in its own interpreter so that peak RSS
belongs to it alone. Memory is reported above a baseline taken in the same
process after its imports and before any model is loaded: the interpreter and
the engine's libraries are not the model's footprint.

Child protocol: `python -m bench.measure MODULE:FUNC JSON_KWARGS
[PREIMPORT ...]` imports PREIMPORTs, records the baseline, calls FUNC(**kwargs)
(which returns a JSON-able dict) and prints one JSON line prefixed by RESULT_TAG. Peak RSS
is llava_pipeline.base.rss's (VmHWM, reset after the baseline). The child imports this
checkout's bench/ and llava_pipeline/ (the project root goes first on its PYTHONPATH).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from llava_pipeline.base import rss

from . import ROOT

RESULT_TAG = "@@bench-result@@ "
# In a child: its baseline RSS (MiB), for cases that report the peak of a phase as well.
baseline_mb: float | None = None


def isolated(
    target: str,
    kwargs: dict | None = None,
    preimport: tuple[str, ...] = (),
    threads: int | None = None,
    timeout: float | None = None,
) -> dict:
    """Run `target` ("pkg.module:func") in a fresh interpreter; its dict result plus
    rss_base_mb / rss_peak_mb / rss_above_base_mb."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, "-m", "bench.measure", target, json.dumps(kwargs or {}), *preimport]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise RuntimeError(f"{target} failed (exit {proc.returncode}):\n{tail}")


def _child(argv: list[str]) -> int:
    target, kwargs_json, *preimport = argv
    for name in preimport:
        importlib.import_module(name)
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    base = rss.current_mb()
    # run as `python -m`, this file is __main__: the cases import it under its package name
    setattr(importlib.import_module("bench.measure"), "baseline_mb", base)
    rss.reset_peak()
    result = dict(func(**json.loads(kwargs_json)))
    peak = rss.peak_mb()
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
