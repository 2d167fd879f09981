"""The DAG as users drive it: dvc repro, caching, and what a parameter change re-runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _sh(cmd: list[str], cwd: Path) -> str:
    proc = _run(cmd, cwd)
    return proc.stdout + proc.stderr


def _stdout(cmd: list[str], cwd: Path) -> str:
    return _run(cmd, cwd).stdout


def _commit(repo: Path, message: str, *args: str) -> None:
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, *args], repo)


def _ran(log: str) -> set[str]:
    """Stages DVC executed (or restored from its run cache) in a repro/exp run log."""
    return set(re.findall(r"Running stage '(\w+)'", log)) | set(
        re.findall(r"Stage '(\w+)' is cached - skipping run", log)
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory, export_8da4w) -> Path:
    """This checkout's files (tracked and new, not ignored) in a fresh git repo, with the
    outputs of the default export that the stages wrote (conftest's export_8da4w: every stage
    run by `python -m stages.<name>`, as dvc.yaml's commands are) put in place."""
    dst = tmp_path_factory.mktemp("project")
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
    ):
        _sh(cmd, dst)
    _commit(dst, "snapshot")
    (dst / "outputs").mkdir()
    for path in export_8da4w.iterdir():
        if path.name not in ("logs", "metrics"):  # not DVC outputs
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, dst / "outputs" / path.name)
    shutil.copy2(export_8da4w.parent / "metrics" / "quality.json", dst / "metrics" / "quality.json")
    return dst


FLOAT_OUTS = ("outputs/reference", "outputs/evaluate")


def _without(lock_text: str, paths: tuple[str, ...]) -> dict:
    """dvc.lock with the hashes and sizes of the outputs at `paths` left out."""
    lock = yaml.safe_load(lock_text)
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in paths:
                for key in ("md5", "size", "hash"):
                    out.pop(key, None)
    return lock


def test_the_stages_reproduce_the_committed_lock(project):
    """The outputs the stages wrote hash to what the committed dvc.lock records (same inputs,
    same bytes), so DVC has nothing to re-run: `dvc commit` caches them and leaves the lock as
    it is (a differing output would rewrite it, which the git status check below sees)."""
    _sh(["dvc", "commit", "--force"], project)
    assert "up to date" in _sh(["dvc", "status"], project)
    assert _ran(_sh(["dvc", "repro"], project)) == set()
    changed = [line for line in _sh(["git", "status", "--porcelain"], project).splitlines() if line]
    committed = _sh(["git", "show", "HEAD:dvc.lock"], project)
    if changed == [" M dvc.lock"]:
        # The fp32 reference's logits and the .pte's answers' logits come from kernels picked by
        # the CPU's ISA (AVX2 or AVX-512), so those two outputs may differ in the last digits
        # between machine kinds; every other output, every dep and metrics/quality.json may not.
        now = (project / "dvc.lock").read_text()
        assert _without(now, FLOAT_OUTS) == _without(committed, FLOAT_OUTS), "dvc.lock: stale or non-reproducible"
        changed = []
    assert changed == [], f"{changed}: stale or non-reproducible (after a code change: dvc repro, commit dvc.lock)"
    for name in ("llava.pte", "tokenizer.bin", "image.pt"):
        assert (project / "outputs" / name).stat().st_size > 0


def test_push_then_pull_into_another_clone_reruns_nothing(project, tmp_path):
    """The team's workflow: cache the outputs, commit the lock that names them, push, and a
    fresh clone pulls them instead of re-running (on another ISA the lock's two float outputs
    may differ from the committed one, see above, so the lock the workspace has is committed)."""
    _sh(["dvc", "commit", "--force"], project)
    _commit(project, "lock", "--allow-empty", "dvc.lock")
    remote = tmp_path / "remote"
    _sh(["dvc", "remote", "add", "-d", "team", str(remote)], project)
    _sh(["dvc", "push"], project)
    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    _sh(["dvc", "remote", "add", "-d", "team", str(remote)], clone)
    _sh(["dvc", "pull"], clone)
    for name in ("llava.pte", "tokenizer.bin", "image.pt", "emit/manifest.json", "partition/manifest.json"):
        assert (clone / "outputs" / name).read_bytes() == (project / "outputs" / name).read_bytes()
    assert "up to date" in _sh(["dvc", "status"], clone)
    assert _ran(_sh(["dvc", "repro"], clone)) == set()
    _sh(["git", "checkout", "--", ".dvc/config"], project)


def _would_rerun(project: Path, key: str, value) -> set[str]:
    """The stages `dvc repro` re-runs after `key: value` in params.yaml: the ones `dvc status`
    finds changed and every stage downstream of them in `dvc dag` (the workspace is restored)."""
    params = project / "params.yaml"
    original = params.read_text()
    data = yaml.safe_load(original)
    section, field = key.split(".")
    data[section][field] = value
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        changed = set(json.loads(_stdout(["dvc", "status", "--json"], project)))
        edges = re.findall(r'"(\w+)" -> "(\w+)"', _stdout(["dvc", "dag", "--dot"], project))
    finally:
        params.write_text(original)
    todo, seen = list(changed), set(changed)
    while todo:
        stage = todo.pop()
        for a, b in edges:
            if a == stage and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


QUANT_ON = {"quantize", "partition", "to_executorch", "emit", "evaluate"}


@pytest.mark.parametrize(
    "key, value, stages",
    [
        # The reference depends on download only: a quantization change never recomputes it.
        ("quant.group_size", 64, QUANT_ON),
        ("quant.vision", "8da8w", QUANT_ON),
        ("export.max_seq_len", 700, {"source_transform"} | QUANT_ON),
        ("export.kv_cache", "int8", {"source_transform"} | QUANT_ON),
        ("evaluate.scenes", 20, {"reference", "evaluate"}),
        ("evaluate.min_top1", 0.5, {"evaluate"}),
    ],
)
def test_a_parameter_change_reruns_what_depends_on_it(project, key, value, stages):
    assert _would_rerun(project, key, value) == stages


def test_queued_experiment_runs_from_quantize_and_carries_its_metrics(project):
    """`dvc exp run --queue -S quant.scheme=none -S quant.embedding_bits=none` + `dvc queue
    start`, as a sweep runs: the experiment restores download, source_transform and reference
    from DVC's cache, runs quantize onwards, and `dvc exp show` carries its own evaluate metrics
    (metrics/quality.json is a stage output). The fp32 export: its lowering is the quick one."""
    import time

    workspace_params = (project / "params.yaml").read_bytes()
    _sh(["dvc", "exp", "run", "--queue", "-S", "quant.scheme=none", "-S", "quant.embedding_bits=none"], project)
    _sh(["dvc", "queue", "start", "-j", "1"], project)
    deadline = time.monotonic() + 900
    while True:
        status = _sh(["dvc", "queue", "status"], project)
        rows = [line.split() for line in status.splitlines() if re.match(r"^[0-9a-f]{7} ", line)]
        if rows and all(r[-1] in ("Success", "Failed") for r in rows):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert [r[-1] for r in rows] == ["Success"], status
    log = _sh(["dvc", "queue", "logs", rows[0][1]], project)
    assert set(re.findall(r"Running stage '(\w+)'", log)) == QUANT_ON, log[-3000:]  # the rest restored
    assert (project / "params.yaml").read_bytes() == workspace_params  # the workspace is untouched

    shown = json.loads(_stdout(["dvc", "exp", "show", "--json", "--no-pager"], project))
    exps = [r for row in shown for e in (row.get("experiments") or []) for r in e["revs"]]
    mine = [r["data"] for r in exps if r["data"]["params"]["params.yaml"]["data"]["quant"]["scheme"] == "none"]
    assert mine, shown
    quality = mine[-1]["metrics"]["metrics/quality.json"]["data"]
    assert set(quality["accuracy"]) == {"count", "color", "left", "describe"}
    assert 0.9 <= quality["agreement"] <= 1.0 and 0.95 <= quality["top1"] <= 1.0
    workspace = json.loads((project / "metrics" / "quality.json").read_text())
    assert sum(quality["size_mb"].values()) > 2 * sum(workspace["size_mb"].values())  # fp32, not int4/int8
    assert quality != workspace  # another export, other figures
    assert quality["ref_accuracy"] == workspace["ref_accuracy"]  # the same reference
