"""Shared fixtures: running the real stages in a scratch copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_pipeline.stage import STAGES  # the DAG's stage order

ROOT = Path(__file__).resolve().parent.parent


def make_workdir(dst: Path, **overrides) -> Path:
    """A scratch project: conf/, assets/ and a params.yaml with dotted overrides applied."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("conf", "assets"):
        if not (dst / name).exists():
            os.symlink(ROOT / name, dst / name)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        section, field = key.split("__")
        data[section][field] = value
    (dst / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def run_stage(workdir: Path, name: str, *overrides: str, check: bool = True):
    """`python -m stages.<name>` in `workdir`, importing this checkout's code."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *overrides],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stage {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_pipeline(workdir: Path, start: str = "download", skip: tuple[str, ...] = ()) -> Path:
    for name in STAGES[STAGES.index(start):]:
        if name not in skip:
            run_stage(workdir, name)
    return workdir / "outputs"


@pytest.fixture(scope="session")
def export_fp32(tmp_path_factory) -> Path:
    """The tiny default exported with quant.scheme=none (no quantization at all)."""
    work = make_workdir(
        tmp_path_factory.mktemp("fp32"), quant__scheme="none", quant__embedding_bits="none"
    )
    return run_pipeline(work)


@pytest.fixture(scope="session")
def export_8da4w(tmp_path_factory, export_fp32) -> Path:
    """The tiny default (8da4w, 8-bit embedding), reusing the fp32 run's download,
    source_transform and reference (the same model, so the same reference answers)."""
    work = make_workdir(tmp_path_factory.mktemp("q8da4w"))
    (work / "outputs").mkdir()
    for name in ("download", "source_transform", "reference"):
        shutil.copytree(export_fp32 / name, work / "outputs" / name)
    return run_pipeline(work, start="quantize", skip=("reference",))


@pytest.fixture(scope="session")
def export_random(tmp_path_factory) -> Path:
    """The random-weight tiny model (model=tiny-random) exported fp32: its greedy answers run on
    without EOS, for the tests of long generations (context filling, byte pieces, many turns)."""
    from llava_pipeline.params import compose

    work = tmp_path_factory.mktemp("random")
    make_workdir(work)
    data = compose(ROOT / "conf", ["model=tiny-random", "quant.scheme=none", "quant.embedding_bits=none"])
    (work / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return run_pipeline(work, skip=("reference", "evaluate"))
