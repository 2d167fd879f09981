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

from .conftest import ROOT, STAGES

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    """Stages DVC executed (or restored from its run cache) in a repro/exp run log."""
    return set(re.findall(r"Running stage '(\w+)'", log)) | set(
        re.findall(r"Stage '(\w+)' is cached - skipping run", log)
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """This checkout's files (tracked and new, not ignored) in a fresh git repo."""
    dst = tmp_path_factory.mktemp("project")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot"]):
        _sh(cmd, dst)
    return dst


def test_repro_runs_every_stage_then_nothing(project):
    log = _sh(["dvc", "repro"], project)
    assert _ran(log) == set(STAGES)
    for name in ("llava.pte", "tokenizer.bin", "image.pt"):
        assert (project / "outputs" / name).stat().st_size > 0
    assert "up to date" in _sh(["dvc", "status"], project)
    again = _sh(["dvc", "repro"], project)
    assert _ran(again) == set()
    # The committed dvc.lock is what the pipeline produces: same inputs, same bytes.
    changed = _sh(["git", "status", "--porcelain"], project).strip()
    assert changed == "", f"{changed}: stale or non-reproducible (after a code change: dvc repro, commit dvc.lock)"


def test_push_then_pull_into_another_clone_reruns_nothing(project, tmp_path):
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


def test_group_size_change_reruns_from_quantize(project):
    log = _sh(["dvc", "exp", "run", "-S", "quant.group_size=64"], project)
    # The reference depends on download only: a quantization change never recomputes it.
    assert _ran(log) == {"quantize", "partition", "to_executorch", "emit", "evaluate"}
    assert "group_size: 64" in (project / "params.yaml").read_text()
    # The experiment carries its own evaluate metrics (metrics/quality.json is a stage output).
    shown = json.loads(_exp_show_json(project))
    exps = [r for row in shown for e in (row.get("experiments") or []) for r in e["revs"]]
    mine = [r["data"] for r in exps
            if r["data"]["params"]["params.yaml"]["data"]["quant"]["group_size"] == 64]
    assert mine, shown
    quality = mine[-1]["metrics"]["metrics/quality.json"]["data"]
    assert set(quality["accuracy"]) == {"count", "color", "left", "describe"}
    assert 0 < quality["top1"] <= 1 and quality["kl"] >= 0
    workspace = json.loads((project / "metrics" / "quality.json").read_text())
    assert quality == workspace


def _exp_show_json(project: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(["dvc", "exp", "show", "--json", "--no-pager"], cwd=project, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_max_seq_len_change_reruns_from_source_transform(project):
    log = _sh(["dvc", "exp", "run", "-S", "export.max_seq_len=700"], project)
    ran = _ran(log)
    assert "download" not in ran
    assert {"source_transform", "partition", "to_executorch", "emit"} <= ran


def test_queued_sweep_over_group_sizes(project):
    """`dvc exp run --queue` + `dvc queue start`: each experiment restores download and
    source_transform from DVC's run cache and runs quantize onwards."""
    import time

    _sh(["dvc", "exp", "run", "--queue", "-S", "quant.group_size=32,64"], project)
    _sh(["dvc", "queue", "start", "-j", "1"], project)
    deadline = time.monotonic() + 900
    while True:
        status = _sh(["dvc", "queue", "status"], project)
        rows = [line.split() for line in status.splitlines() if re.match(r"^[0-9a-f]{7} ", line)]
        if rows and all(r[-1] in ("Success", "Failed") for r in rows):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert [r[-1] for r in rows] == ["Success", "Success"], status
    for row in rows:
        log = _sh(["dvc", "queue", "logs", row[1]], project)
        assert _ran(log) >= {"quantize", "partition", "to_executorch", "emit"}
        assert "Running stage 'download'" not in log
