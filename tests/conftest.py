"""Shared fixtures: running the real stages in a scratch copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from llava_pipeline.pipeline.stage import STAGES  # the DAG's stage order

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


def run_pipeline(
    workdir: Path, start: str = "download", skip: tuple[str, ...] = (), reference: Path | None = None
) -> Path:
    """The stages from `start` on, as dvc.yaml runs them; `reference`: a reference stage output
    to copy in place of running that stage (see `shared_reference`)."""
    for name in STAGES[STAGES.index(start) :]:
        if name in skip:
            continue
        if name == "reference" and reference is not None:
            shutil.copytree(reference, workdir / "outputs" / "reference")
        else:
            run_stage(workdir, name)
    return workdir / "outputs"


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """A folder built once per test run, also when pytest-xdist spreads the tests over several
    processes (`make test` does): the first process to ask builds it under a lock, the others
    wait and reuse it. `build(folder)` fills the empty folder."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by every worker of this run
    folder = base / f"shared-{name}"
    with FileLock(str(base / f"shared-{name}.lock")):
        done = folder / ".built"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def shared_reference(tmp_path_factory) -> Path:
    """The reference stage's output for the built-in model. It reads only download's output and
    evaluate's settings, the same for the default and the fp32 export, so it is computed once
    (about 30 s) and copied into both; the manifest chain checks that it fits."""

    def build(work: Path) -> None:
        make_workdir(work)
        for name in ("download", "reference"):
            run_stage(work, name)

    return shared_dir(tmp_path_factory, "reference", build) / "outputs" / "reference"


@pytest.fixture(scope="session")
def export_fp32(tmp_path_factory) -> Path:
    """The tiny default exported with quant.scheme=none (no quantization at all). It asks for
    the shared reference first, so that the default export, built beside it, finds it done."""

    def build(work: Path) -> None:
        reference = shared_reference(tmp_path_factory)
        make_workdir(work, quant__scheme="none", quant__embedding_bits="none")
        run_pipeline(work, reference=reference)

    return shared_dir(tmp_path_factory, "fp32", build) / "outputs"


@pytest.fixture(scope="session")
def export_8da4w(tmp_path_factory) -> Path:
    """The tiny default (8da4w, 8-bit embedding): every stage, as `dvc repro` runs them (the
    reference copied from `shared_reference`). Built apart from the fp32 export, so that two
    test workers build the two at the same time."""

    def build(work: Path) -> None:
        make_workdir(work)
        run_pipeline(work, reference=shared_reference(tmp_path_factory))

    return shared_dir(tmp_path_factory, "q8da4w", build) / "outputs"


@pytest.fixture(scope="session")
def export_int8(tmp_path_factory) -> Path:
    """The default with every int8 option on at once, in one export (each costs a pipeline
    run): an int8 decoder (quant.scheme=8da8w, quant.group_size=0: one scale per output
    channel), an int8 vision tower (quant.vision=8da8w) and export.kv_cache=int8; stops at
    emit, whose verifier checks every method against the eager model. Its own download (about
    a second), so that it need not wait for the default export."""

    def build(work: Path) -> None:
        make_workdir(work, quant__scheme="8da8w", quant__group_size=0, quant__vision="8da8w", export__kv_cache="int8")
        run_pipeline(work, skip=("reference", "evaluate"))

    return shared_dir(tmp_path_factory, "int8", build) / "outputs"


@pytest.fixture(scope="session")
def export_random(tmp_path_factory) -> Path:
    """The random-weight tiny model (model=tiny-random) exported fp32: its greedy answers run on
    without EOS, for the tests of long generations (context filling, byte pieces, many turns)."""
    from llava_pipeline.base.params import compose

    def build(work: Path) -> None:
        make_workdir(work)
        data = compose(ROOT / "conf", ["model=tiny-random", "quant.scheme=none", "quant.embedding_bits=none"])
        (work / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        run_pipeline(work, skip=("reference", "evaluate"))

    return shared_dir(tmp_path_factory, "random", build) / "outputs"


# Under pytest-xdist (make test: --dist loadfile --no-loadscope-reorder) the first two files go
# to the two workers: the longest one (it needs the 8da4w export), then one that starts with the
# fp32 export, so that the two exports are built side by side.
FIRST = ("test_dvc.py", "test_evaluate_stage.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: order kept otherwise
