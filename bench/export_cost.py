"""Export side of the benchmark: run the pipeline's stages in a scratch project and
collect wall time and peak RSS per stage and the .pte's bytes per method.

Each export runs in its own folder (`conf/` and `assets/` linked from the project,
`params.yaml` composed from `conf/` with the given overrides), stage by stage as a
user would run them (`python -m stages.<name>`), so the numbers are the stages' own
`outputs/metrics/<stage>.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llava_pipeline.base.params import compose, dump
from llava_pipeline.formats.ptesize import method_bytes
from llava_pipeline.pipeline.stage import EXPORT_STAGES

from . import ROOT

STAGES = EXPORT_STAGES


def make_project(work: Path, overrides: list[str]) -> dict:
    """A scratch project in `work`; returns its composed params."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("conf", "assets"):
        link = work / name
        if not link.exists():
            os.symlink(ROOT / name, link)
    params = compose(ROOT / "conf", overrides)
    (work / "params.yaml").write_text(dump(params))
    return params


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


def run_export(
    work: Path, overrides: list[str], reuse: Path | None = None, log=print, after_stage=None, until: str = "emit"
) -> dict:
    """Run all stages in `work`. `reuse`: a finished scratch project with the same model,
    whose download output is linked instead of recomputed (its cost is that project's).
    Returns per-stage metrics and sizes."""
    make_project(work, overrides)
    outputs = work / "outputs"
    if outputs.exists():
        shutil.rmtree(outputs)
    (outputs / "metrics").mkdir(parents=True)
    stages = STAGES[: STAGES.index(until) + 1]
    if reuse is not None:
        _link_tree(reuse / "outputs" / "download", outputs / "download")
        stages = stages[1:]
    run_stages(work, stages, log, after_stage)
    return collect(outputs, reused=reuse is not None)


# Weight files no later stage reads, deleted as soon as that is so (manifests stay: the
# verifier checks the chain of manifests). A scratch export then keeps the checkpoint, the
# quantized model (the verifier's eager reference) and the .pte (source_transform copies no
# weights: it names the checkpoint's).
_PRUNE_AFTER = {"to_executorch": ("partition", "*.blobs")}


def prune(stage: str, outputs: Path) -> None:
    if stage in _PRUNE_AFTER:
        folder, pattern = _PRUNE_AFTER[stage]
        for f in (outputs / folder).glob(pattern):
            f.unlink()


def run_stages(work: Path, stages, log=print, after_stage=None) -> None:
    """`python -m stages.<name>` in `work`, in order, as a user runs them by hand."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    (work / "outputs" / "metrics").mkdir(parents=True, exist_ok=True)
    for name in stages:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", f"stages.{name}"], cwd=work, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{work.name}: stage {name} failed:\n{proc.stderr[-3000:]}")
        log(f"  {work.name}: {name} {time.perf_counter() - t0:.1f} s")
        if after_stage is not None:
            after_stage(name, work / "outputs")


def collect(outputs: Path, reused: bool = False) -> dict:
    stages = {}
    for name in STAGES:
        path = outputs / "metrics" / f"{name}.json"
        if (reused and name == "download") or not path.is_file():
            continue
        stages[name] = json.loads(path.read_text())
    pte = outputs / "llava.pte"
    if not pte.is_file():  # an export run only up to to_executorch
        pte = outputs / "to_executorch" / "model.pte"
    return {
        "stages": stages,
        "pte_bytes": pte.stat().st_size,
        "method_bytes": method_bytes(pte),
    }
