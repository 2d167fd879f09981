"""The .pte verifier (`python -m llava_pipeline.verify`): good exports pass, bad ones fail
naming the row, and what cannot be verified exits 2 with one line."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llava_pipeline.verify import Report, verify
from llava_pipeline.verify.__main__ import main
from llava_pipeline.verify.numerics import TOLERANCES, NumericsInputs, check_numerics

ROOT = Path(__file__).resolve().parent.parent
NUMERIC_ROWS = ("vision_encoder", "token_embedding", "text_decoder")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llava_pipeline.verify", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def _one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


def _row(report: Report, method: str, metric_start: str):
    rows = [r for r in report.rows if r.method == method and r.metric.startswith(metric_start)]
    assert len(rows) == 1, [(r.method, r.metric) for r in report.rows]
    return rows[0]


def _copy_export(outputs: Path, dst: Path) -> Path:
    """The user-facing files of an export in another folder (its manifests stay behind)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("llava.pte", "tokenizer.bin", "image.pt"):
        shutil.copyfile(outputs / name, dst / name)
    return dst / "llava.pte"


# ---------------------------------------------------------------- no export needed


def test_report_ok_and_table():
    report = Report(Path("x.pte"))
    report.add("program", "sha256", "abc", "abc", True)
    report.warn("tokenizer", "vocab_size", "not checked")
    report.add("text_decoder", "agreement vs fp32", 0.5, "informational", None)
    assert report.ok and not report.failed
    report.add("text_decoder", "logits max|diff|", 3.0, "<= 1", False)
    assert not report.ok and [r.metric for r in report.failed] == ["logits max|diff|"]
    lines = report.table().splitlines()
    assert lines[0].split() == ["method", "metric", "value", "threshold", "status"]
    assert lines[-1].split()[-1] == "FAIL" and "INFO" in lines[-2] and "WARN" in lines[-3]


def test_cli_missing_pte_exits_2(tmp_path):
    proc = _cli(str(tmp_path / "nope.pte"))
    assert proc.returncode == 2
    assert "nope.pte: no such file" in _one_line_error(proc.stderr)


def test_the_seed_spelling_runs_the_same_cli(tmp_path):
    """`python -m llava_pipeline.test_pte` (the original brief's spelling) is the same CLI."""
    proc = subprocess.run(
        [sys.executable, "-m", "llava_pipeline.test_pte", str(tmp_path / "nope.pte")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stderr) == (2, _cli(str(tmp_path / "nope.pte")).stderr)
    assert "nope.pte: no such file" in _one_line_error(proc.stderr)


def test_cli_random_bytes_exit_2(tmp_path):
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"\x12\x34\x56\x78" + random.Random(0).randbytes(50_000))
    proc = _cli(str(junk))
    assert proc.returncode == 2
    assert "not an ExecuTorch program" in _one_line_error(proc.stderr)


def test_missing_manifests_exit_2(tmp_path, capsys):
    pte = tmp_path / "llava.pte"
    pte.write_bytes(b"\0\0\0\0ET12" + bytes(100))  # passes the header check
    assert main([str(pte)]) == 2
    assert "emit/manifest.json: missing" in _one_line_error(capsys.readouterr().err)


class _FakeProgram:
    """Answers vision_encoder with `image`; every other method fails (a FAIL row each)."""

    describe: dict = {}

    def __init__(self, image):
        self.image = image

    def run(self, method, *inputs):
        if method != "vision_encoder":
            raise RuntimeError(f"{method}: not in this fake")
        return [self.image]


@pytest.mark.parametrize("vision_scheme, info_rows", [("none", 0), ("8da8w", 1)])
def test_quantized_vs_fp32_vision_row_only_for_a_quantized_vision_tower(vision_scheme, info_rows):
    """The "eager quantized vs fp32 (INFO)" row compares the eager quantized vision tower with
    the fp32 one: with quant.vision=none they are the same model and the row must not appear
    (it once did, a parameter named `vision` having been rebound by a nested `def vision()`)."""
    import torch

    image = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    quant = SimpleNamespace(vision_encoder=lambda pixels: image)
    fp32 = SimpleNamespace(vision_encoder=lambda pixels: image * 1.01)
    report = Report(Path("x.pte"))
    check_numerics(
        report,
        NumericsInputs(
            program=_FakeProgram(image),
            quant_model=quant,
            fp32_model=fp32,
            args=SimpleNamespace(text=SimpleNamespace(vocab_size=8, max_seq_len=16)),
            tol=TOLERANCES["8da4w"],
            scheme="8da4w",
            vision_scheme=vision_scheme,
            pixels=torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
            image_name="zeros",
            before=[1],
            after=[2],
            steps=1,
        ),
    )
    vision = [r for r in report.rows if r.method == "vision_encoder"]
    assert vision[0].metric.startswith("max|diff| vs eager") and vision[0].status == "PASS", vision
    assert len([r for r in vision if r.metric == "eager quantized vs fp32 (INFO)"]) == info_rows, vision


# ---------------------------------------------------------------- real exports


@pytest.mark.slow
def test_good_8da4w_export_passes(export_8da4w, record_property):
    report = verify(export_8da4w / "llava.pte")
    assert report.ok, report.table()
    assert _row(report, "program", "sha256").status == "PASS"
    assert _row(report, "program", "manifest chain").status == "PASS"
    assert _row(report, "tokenizer", "vocab_size").value == "32064"
    for method in NUMERIC_ROWS:
        assert any(r.method == method and "max|diff|" in r.metric and r.status == "PASS" for r in report.rows)
    agree = float(_row(report, "text_decoder", "top-1 agreement vs eager 8da4w").value)
    assert agree >= 0.9
    # quant.vision=none: the eager vision tower is the fp32 one, no "quantized vs fp32" row.
    assert not [r for r in report.rows if r.method == "vision_encoder" and "vs fp32" in r.metric]
    for r in report.rows:
        if r.method == "text_decoder":
            record_property(r.metric, r.value)


@pytest.mark.slow
def test_good_fp32_export_passes_tightly(export_fp32):
    report = verify(export_fp32 / "llava.pte")
    assert report.ok, report.table()
    for metric in ("prefill logits", "decode logits"):
        assert float(_row(report, "text_decoder", metric).value) < 1e-3  # ~2e-5 measured
    assert _row(report, "text_decoder", "top-1 agreement vs eager none").value == "1.000"
    # The eager vision tower is the fp32 one (quant.vision=none): no "quantized vs fp32" row.
    assert not [r for r in report.rows if r.method == "vision_encoder" and "vs fp32" in r.metric]


@pytest.mark.slow
def test_cli_on_fp32_export_prints_table_exit_0(export_fp32):
    proc = _cli(str(export_fp32 / "llava.pte"), "--steps", "8", "--no-fp32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header == ["method", "metric", "value", "threshold", "status"]
    assert ": OK (" in proc.stdout and "FAIL" not in proc.stdout
    assert proc.stderr.strip() == ""  # the runtime's native logs are kept off the terminal


@pytest.mark.slow
def test_tampered_decoder_weights_fail(export_fp32, tmp_path, capsys):
    """lm_head scaled by 1.5 inside the .pte: the hash and the decoder's logits fail, the
    other methods still pass (greedy top-1 is scale-invariant: only the logit rows see it)."""
    from safetensors.torch import load_file

    pte = _copy_export(export_fp32, tmp_path)
    from llava_pipeline.export.model_io import weight_files

    path, key = weight_files(export_fp32 / "source_transform")["text_decoder.output.weight"]
    weight = load_file(str(path))[key]
    data = bytearray(pte.read_bytes())
    raw = weight.numpy().tobytes()
    at = data.find(raw)
    assert at > 0 and data.count(raw) == 1, "lm_head is not stored verbatim in the fp32 .pte"
    data[at : at + len(raw)] = (weight * 1.5).numpy().tobytes()
    pte.write_bytes(bytes(data))

    assert main([str(pte), "--outputs", str(export_fp32), "--steps", "8", "--no-fp32"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert any(line.startswith("program") and "sha256" in line for line in failed), out
    assert any(line.startswith("text_decoder") and "logits max|diff|" in line for line in failed), out
    assert not any(line.startswith(("vision_encoder", "token_embedding")) for line in failed), out
    assert "FAILED: program sha256" in out


@pytest.mark.slow
def test_tokenizer_with_another_vocab_fails(export_fp32, tmp_path):
    from llava_pipeline.formats.tokenizer import write_tokenizer_bin

    tok = tmp_path / "tokenizer.bin"
    write_tokenizer_bin(export_fp32 / "download" / "tokenizer.model", tok, 32000, {})
    report = verify(export_fp32 / "llava.pte", tok, steps=2, compare_fp32=False)
    assert [(r.method, r.value) for r in report.failed] == [("tokenizer", "32000")]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage_after_header"])
def test_unloadable_pte_exits_2(export_fp32, tmp_path, capsys, damage):
    pte = _copy_export(export_fp32, tmp_path)
    data = pte.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # a valid file identifier, then noise: the runtime crashes or refuses it
        data = data[:8] + random.Random(0).randbytes(100_000)
    pte.write_bytes(data)
    assert main([str(pte), "--outputs", str(export_fp32)]) == 2
    assert "not a loadable ExecuTorch program" in _one_line_error(capsys.readouterr().err)
