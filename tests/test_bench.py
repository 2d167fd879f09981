"""The benchmark's own arithmetic and plumbing (no timing is asserted: numbers are reported,
not tested): per-method .pte bytes, isolated measurement processes, per-layer extrapolation,
target checks and the report files."""

import json
import os

import pytest

from bench import __main__ as bench_main
from bench import measure, report, schemes


def _allocate(mb: int) -> dict:
    block = bytearray(mb << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    return {"allocated_mb": mb}


def test_isolated_process_reports_its_own_memory():
    small = measure.isolated("tests.test_bench:_allocate", {"mb": 8})
    big = measure.isolated("tests.test_bench:_allocate", {"mb": 200})
    assert small["allocated_mb"] == 8 and big["allocated_mb"] == 200
    assert big["rss_above_base_mb"] - small["rss_above_base_mb"] > 150
    assert big["rss_peak_mb"] >= big["rss_base_mb"] + big["rss_above_base_mb"] - 1


def test_isolated_failure_is_raised_with_the_child_error():
    with pytest.raises(RuntimeError, match="allocated_mb|unexpected keyword"):
        measure.isolated("tests.test_bench:_allocate", {"nope": 1})


def _run(text_bytes, vision_bytes, walls):
    return {
        "method_bytes": {"text_decoder": text_bytes, "vision_encoder": vision_bytes, "token_embedding": 100},
        "pte_bytes": text_bytes + vision_bytes + 100,
        "stages": {f"s{i}": {"process_wall_s": w, "peak_rss_mb": 1.0} for i, w in enumerate(walls)},
    }


def test_extrapolation_from_two_depths():
    base = _run(1000 + 2 * 300, 50 + 2 * 10, [10.0, 20.0])
    deep = _run(1000 + 3 * 300, 50 + 3 * 10, [10.0, 24.0])
    x = bench_main.extrapolate(base, deep, (2, 3), (3, 4), seq_len=768, kv_width=4096, runtime_rss_mb=100.0)
    assert x["text_layer_bytes"] == 300 and x["vision_layer_bytes"] == 10
    assert x["full_pte_bytes"] == base["pte_bytes"] + 30 * 300 + 21 * 10
    assert x["text_layer_export_s"] == pytest.approx(4.0 * 300 / 310, abs=0.01)
    kv = 2 * 768 * 4096 * 4
    assert x["kv_bytes_per_layer"] == kv
    assert x["full_runtime_rss_mb"] == pytest.approx(100 + (30 * (300 + kv) + 21 * 10) / 2**20, abs=0.1)


def _rows():
    rt = {
        "kind": "runtime",
        "threads": 2,
        "bandwidth_gb_s": 40.0,
        "rows": [
            {
                "model": "llava-7b-shape",
                "engine": "executorch",
                "variant": "8da4w",
                "text_decode_tok_s": 110.0,
                "text_prefill600_s": 0.6,
                "rss_above_base_mb": 1100.0,
                "text_rss_above_base_mb": 900.0,
                "text_fraction_of_limit": 0.85,
            },
            {
                "model": "llava-7b-shape",
                "engine": "transformers",
                "variant": "bf16",
                "text_decode_tok_s": 12.0,
                "text_prefill600_s": 1.4,
                "rss_above_base_mb": 2000.0,
            },
        ],
    }
    peers = {
        "kind": "peers",
        "threads": 2,
        "prompt_tokens": 600,
        "decode_tokens": 64,
        "rows": [
            {
                "engine": "llama.cpp",
                "variant": "Q4_0",
                "decode_tok_s": 80.0,
                "prefill_s": 1.3,
                "rss_above_base_mb": 800.0,
                "file_mb": 300.0,
                "prefill_tok_s": 460.0,
            },
        ],
    }
    return rt, peers


def test_targets_compare_with_llama_cpp_q4_0():
    rt, peers = _rows()
    checks = {c["target"]: c for c in report.targets({"runtime": rt, "peers": peers})}
    assert checks["decode vs llama.cpp Q4_0"]["value"] == pytest.approx(110 / 80, abs=1e-3)
    assert checks["decode vs llama.cpp Q4_0"]["met"] is True
    assert checks["prefill vs llama.cpp Q4_0 (600 tokens)"]["value"] == pytest.approx(1.3 / 0.6, abs=1e-3)
    rss = checks["run-time RSS of the text model vs llama.cpp Q4_0"]
    assert rss["met"] is False and rss["value"] == pytest.approx(900 / 800, abs=1e-3)  # text methods alone
    assert checks["decode at 600 context vs bandwidth limit (weights + KV)"]["met"] is True
    rt["rows"][0]["text_decode_tok_s"] = 90.0
    checks = {c["target"]: c for c in report.targets({"runtime": rt, "peers": peers})}
    assert checks["decode vs llama.cpp Q4_0"]["met"] is False  # 1.125 < 1.25


def test_report_files(tmp_path):
    rt, peers = _rows()
    (tmp_path / "runtime.json").write_text(json.dumps(rt))
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    report.write(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| llava-7b-shape | executorch | 8da4w |" in md and "| llama.cpp | Q4_0 |" in md
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    first = png
    report.write(tmp_path)
    assert (tmp_path / "plot.png").read_bytes() == first  # same numbers, same bytes
    targets = json.loads((tmp_path / "targets.json").read_text())["targets"]
    assert {t["variant"] for t in targets} == {"8da4w"}


@pytest.mark.slow
def test_method_bytes_cover_the_program(export_8da4w):
    from llava_pipeline.formats.ptesize import method_bytes

    pte = export_8da4w / "llava.pte"
    sizes = method_bytes(pte)
    assert set(sizes) == {"vision_encoder", "token_embedding", "text_decoder"}
    total = os.path.getsize(pte)
    assert 0.95 * total < sum(sizes.values()) <= total
    # int8 embedding: 32064 x 64 bytes plus one fp32 scale per row
    assert sizes["token_embedding"] >= 32064 * 64


def _scheme_rows():
    rt, peers = _rows()
    ours = rt["rows"][0]
    rt["rows"] += [
        {**ours, "variant": "8da4w-pc", "text_decode_tok_s": 130.0, "text_prefill600_s": 1.5},  # decodes faster
        {**ours, "variant": "8da8w", "text_decode_tok_s": 70.0, "text_prefill600_s": 0.5},
        {**ours, "model": "tiny", "variant": "8da8w"},  # another model: not a 7B-shape scheme
    ]
    peers["rows"].append({**peers["rows"][0], "variant": "Q8_0", "decode_tok_s": 50.0, "prefill_s": 1.6})
    return {"runtime": rt, "peers": peers}


def test_each_scheme_is_set_beside_the_peer_of_its_size_class():
    rows = {r["variant"]: r for r in schemes.schemes(_scheme_rows())}
    assert sorted(rows) == ["8da4w", "8da4w-pc", "8da8w"]
    assert rows["8da4w"]["class"] == rows["8da4w-pc"]["class"] == "4-bit" and rows["8da8w"]["class"] == "8-bit"
    assert rows["8da4w-pc"]["peer"] == "Q4_0" and rows["8da8w"]["peer"] == "Q8_0"
    assert rows["8da8w"]["decode_vs_peer"] == pytest.approx(70 / 50, abs=1e-3)
    assert rows["8da8w"]["prefill_vs_peer"] == pytest.approx(1.6 / 0.5, abs=1e-3)
    assert rows["8da8w"]["meets"] is True  # 1.4x decode, 3.2x prefill
    assert rows["8da4w-pc"]["meets"] is False  # decodes 1.63x but prefills slower than Q4_0 (1.5 s vs 1.3 s)
    assert rows["8da4w"]["meets"] is True  # 1.375x decode, 2.2x prefill


def test_the_fastest_of_a_class_answers_soonest_not_decodes_fastest():
    rows = schemes.schemes(_scheme_rows())
    # 8da4w: 0.6 + 128 / 110 = 1.76 s; 8da4w-pc: 1.5 + 128 / 130 = 2.48 s.
    assert schemes.fastest(rows) == {"4-bit": "8da4w", "8-bit": "8da8w"}
    without_peers = schemes.schemes({"runtime": _scheme_rows()["runtime"]})
    assert "peer" not in without_peers[0] and schemes.fastest(without_peers) == {"4-bit": "8da4w", "8-bit": "8da8w"}


def test_results_md_shows_the_schemes_and_names_the_fastest(tmp_path):
    data = _scheme_rows()
    for name in ("runtime", "peers"):
        (tmp_path / f"{name}.json").write_text(json.dumps(data[name]))
    report.write(tmp_path)
    md = (tmp_path / "results.md").read_text()
    section = md[md.index("## Export schemes on this CPU") :]
    assert "| 8-bit | 8da8w | 0.50 | 70.00 |" in section and "| Q8_0 |" in section
    assert "Fastest here: 4-bit class: 8da4w; 8-bit class: 8da8w." in section
    saved = json.loads((tmp_path / "targets.json").read_text())
    assert saved["fastest"] == {"4-bit": "8da4w", "8-bit": "8da8w"} and len(saved["schemes"]) == 3
