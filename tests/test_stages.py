"""Stages run by hand: model sources, overrides, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_pipeline.pipeline import stage

from .conftest import ROOT, make_workdir, run_stage

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A downloaded built-in tiny checkpoint (outputs/download of a scratch project)."""
    work = make_workdir(tmp_path_factory.mktemp("dl"))
    run_stage(work, "download")
    return work / "outputs" / "download"


def _error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def test_builtin_download_manifest(tiny_ckpt):
    manifest = json.loads((tiny_ckpt / "manifest.json").read_text())
    assert manifest["stage"] == "download" and manifest["source_kind"] == "builtin"
    assert manifest["config"] == {
        "model": {
            "name": "tiny",
            "source": "builtin:tiny",
            "revision": None,
            "seed": 0,
            "text_layers": None,
            "vision_layers": None,
        }
    }
    assert manifest["outputs"]["model.safetensors"] == stage.sha256_file(tiny_ckpt / "model.safetensors")
    assert "tokenizer_model" in manifest["inputs"] and "torch" in manifest["packages"]
    # No absolute paths or timestamps in a manifest.
    assert "/tmp" not in json.dumps(manifest) and "/work" not in json.dumps(manifest)


def test_local_directory_source(tmp_path, tiny_ckpt):
    work = make_workdir(tmp_path / "p", model__source=str(tiny_ckpt))
    run_stage(work, "download")
    got = work / "outputs" / "download"
    assert stage.sha256_file(got / "model.safetensors") == stage.sha256_file(tiny_ckpt / "model.safetensors")
    assert json.loads((got / "manifest.json").read_text())["source_kind"] == "local"


def _hf_cache(root: Path, repo: str, ckpt: Path) -> Path:
    """A Hugging Face hub cache holding `ckpt` as the snapshot at REV."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / REV
    snap.mkdir(parents=True)
    for p in ckpt.iterdir():
        if p.name != "manifest.json":
            shutil.copy(p, snap / p.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REV)
    return root


def test_hub_source_offline_from_cache(tmp_path, tiny_ckpt, monkeypatch):
    cache = _hf_cache(tmp_path / "hub", "acme/tiny-llava", tiny_ckpt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    work = make_workdir(tmp_path / "p", model__source="acme/tiny-llava", model__revision=REV)
    run_stage(work, "download")
    got = work / "outputs" / "download"
    assert stage.sha256_file(got / "model.safetensors") == stage.sha256_file(tiny_ckpt / "model.safetensors")


def test_hub_source_offline_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    work = make_workdir(tmp_path / "p", model__source="acme/tiny-llava", model__revision=REV)
    line = _error_line(run_stage(work, "download", check=False))
    assert "acme/tiny-llava" in line and "HF_HUB_OFFLINE" in line and "not in the local HF cache" in line
    assert not (work / "outputs" / "download").exists()


def test_hub_source_needs_pinned_revision(tmp_path):
    work = make_workdir(tmp_path / "p", model__source="acme/tiny-llava", model__revision="main")
    line = _error_line(run_stage(work, "download", check=False))
    assert line.startswith("error: model.revision:") and "40-hex-digit commit" in line


def test_local_source_that_is_not_llava(tmp_path, tiny_ckpt):
    bad = tmp_path / "bert"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    work = make_workdir(tmp_path / "p", model__source=str(bad))
    line = _error_line(run_stage(work, "download", check=False))
    assert "config.json" in line and "model_type is 'bert'" in line


def test_missing_upstream_output(tmp_path):
    work = make_workdir(tmp_path / "p")
    line = _error_line(run_stage(work, "quantize", check=False))
    assert "outputs/source_transform" in line and "dvc repro source_transform" in line


@pytest.fixture(scope="module")
def transformed(tmp_path_factory, tiny_ckpt) -> Path:
    work = make_workdir(tmp_path_factory.mktemp("st"))
    (work / "outputs").mkdir()
    shutil.copytree(tiny_ckpt, work / "outputs" / "download")
    run_stage(work, "source_transform")
    return work


def test_quantize_override_on_top_of_params(transformed):
    run_stage(transformed, "quantize", "quant.group_size=64")
    manifest = json.loads((transformed / "outputs" / "quantize" / "manifest.json").read_text())
    assert manifest["config"]["quant"] == {
        "scheme": "8da4w",
        "group_size": 64,
        "embedding_bits": 8,
        "qparams": "hqq",
        "vision": "none",
    }


def test_bad_group_size_rejected_before_work_nothing_lost(transformed):
    before = (transformed / "outputs" / "quantize" / "manifest.json").read_bytes()
    line = _error_line(run_stage(transformed, "quantize", "quant.group_size=48", check=False))
    assert "quant.group_size=48" in line and "text_decoder." in line
    # The previous finished output is untouched and no partial folder is left behind as done.
    assert (transformed / "outputs" / "quantize" / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    "override, needle",
    [
        ("quant.scheme=int3", "quant.scheme: unknown scheme 'int3'"),
        ("quant.nosuch=1", "quant.nosuch"),
        ("quant.group_size=[", "malformed override"),
    ],
)
def test_bad_overrides_are_one_line_errors(transformed, override, needle):
    assert needle in _error_line(run_stage(transformed, "quantize", override, check=False))


def test_truncated_safetensors_names_the_file(tmp_path, tiny_ckpt):
    work = make_workdir(tmp_path / "p")
    (work / "outputs").mkdir()
    shutil.copytree(tiny_ckpt, work / "outputs" / "download")
    weights = work / "outputs" / "download" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _error_line(run_stage(work, "source_transform", check=False))
    assert "model.safetensors" in line
    assert not (work / "outputs" / "source_transform").exists()


def test_max_seq_len_too_small_and_too_large(tmp_path, tiny_ckpt):
    work = make_workdir(tmp_path / "p")
    (work / "outputs").mkdir()
    shutil.copytree(tiny_ckpt, work / "outputs" / "download")
    small = _error_line(run_stage(work, "source_transform", "export.max_seq_len=580", check=False))
    assert "export.max_seq_len=580" in small and "576 image tokens" in small
    big = _error_line(run_stage(work, "source_transform", "export.max_seq_len=100000", check=False))
    assert "export.max_seq_len=100000" in big and "max_position_embeddings" in big
    assert not (work / "outputs" / "source_transform").exists()


@pytest.mark.slow
def test_stage_killed_midway_leaves_nothing_accepted(transformed):
    """SIGKILL a real stage while it works: no outputs/<stage>/ appears, the next stage
    refuses to start, and a rerun replaces the leftover partial folder."""
    outputs = transformed / "outputs"
    if (outputs / "quantize").exists():
        shutil.rmtree(outputs / "quantize")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.quantize"],
        cwd=transformed,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (outputs / ".quantize.partial").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "stage ended before it could be killed"
        time.sleep(0.1)
    time.sleep(1.5)  # into loading and quantizing (about 10 s of work)
    assert proc.poll() is None, "stage ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (outputs / "quantize").exists()
    line = _error_line(run_stage(transformed, "partition", check=False))
    assert "no finished output of stage 'quantize'" in line
    run_stage(transformed, "quantize")
    assert (outputs / "quantize" / "manifest.json").is_file()
    assert not (outputs / ".quantize.partial").exists()


@pytest.mark.slow
def test_emit_refuses_a_program_that_fails_verification(tmp_path, export_8da4w):
    work = make_workdir(tmp_path / "p")
    shutil.copytree(export_8da4w, work / "outputs")
    for name in ("llava.pte", "emit"):
        target = work / "outputs" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    pte = work / "outputs" / "to_executorch" / "model.pte"
    data = bytearray(pte.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 20000, 7):
        data[i] ^= 0x40
    pte.write_bytes(bytes(data))
    line = _error_line(run_stage(work, "emit", check=False))
    assert "llava.pte failed verification" in line
    assert not (work / "outputs" / "llava.pte").exists()
    assert not (work / "outputs" / "emit").exists()
