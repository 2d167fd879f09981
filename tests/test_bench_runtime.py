"""bench.runtime and the modules it runs on (rates, host, pte_bytes, runtime_cases): the
arithmetic, the .pte byte accounting, the orchestration (with a fake process runner) and one
short real run on the tiny export."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench import host, pte_bytes, rates
from bench import runtime as rt
from bench import runtime_cases as cases

# ------------------------------------------------------------------ pure logic


def test_mean_context_counts_the_position_a_step_feeds():
    # steps at positions 10, 11, 12 read 11, 12, 13 cached positions
    assert rates.mean_context(10, 3) == 12.0
    assert rates.mean_context(600, 1) == 601.0
    assert rates.mean_context(600, 0) == 601.0


def test_bandwidth_limit_and_rates():
    assert rates.bandwidth_limit(40.0, 3.9e9, 0.1e9) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        rates.bandwidth_limit(40.0, 0, 0)
    assert rates.tok_per_s(31, 2.0) == 15.5
    assert rates.tok_per_s(0, 2.0) is None and rates.tok_per_s(3, 0.0) is None
    assert rates.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        rates.median([])


def test_add_bandwidth_fields():
    row = {
        "weight_bytes_per_token": 1_000_000,
        "kv_bytes_per_position": 1000,
        "decode_mean_context": 500.0,
        "decode_tok_s": 5000.0,
        "text_decode_mean_context": 1000.0,
        "text_decode_tok_s": None,
    }
    rates.add_bandwidth_fields(row, 30.0)
    assert row["kv_bytes_per_token"] == 500_000
    assert row["bandwidth_limit_tok_s"] == pytest.approx(30e9 / 1.5e6)
    assert row["fraction_of_limit"] == pytest.approx(5000 / 20000)
    assert row["text_kv_bytes_per_token"] == 1_000_000
    assert row["text_bandwidth_limit_tok_s"] == pytest.approx(15000)
    assert row["text_fraction_of_limit"] is None
    assert "weights_fit_in_cache" not in row
    assert rates.add_bandwidth_fields(dict(row), 30.0, 1_500_000)["weights_fit_in_cache"] is True
    assert rates.add_bandwidth_fields(dict(row), 30.0, 1_499_999)["weights_fit_in_cache"] is False
    bare = {"decode_tok_s": 1.0}
    assert rates.add_bandwidth_fields(bare, 30.0) == {"decode_tok_s": 1.0}


def test_seeded_ids_are_reproducible_ordinary_pieces():
    ids = rates.seeded_ids(600, 32064)
    assert ids == rates.seeded_ids(600, 32064) and ids != rates.seeded_ids(600, 32064, seed=1)
    assert len(ids) == 600 and min(ids) >= 3 and max(ids) < 32000
    assert max(rates.seeded_ids(600, 100)) < 100


def test_cache_sizes(tmp_path):
    assert host.parse_cache_size("32768K\n") == 32 << 20
    assert host.parse_cache_size("2M") == 2 << 20 and host.parse_cache_size("512") == 512
    for i, (level, size) in enumerate([(1, "32K"), (3, "32768K"), (2, "1024K")]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{i}" / "size").write_text(size)
    assert host.last_level_cache_bytes(tmp_path) == 32 << 20
    assert host.last_level_cache_bytes(tmp_path / "absent") is None


def test_busy_fraction_from_proc_stat():
    before = "cpu  100 0 100 800 0 0 0 0 0 0"
    after = "cpu  150 0 150 850 50 0 0 0 0 0"  # 100 busy, 100 idle/iowait
    assert host.busy_fraction(before, after) == 0.5
    assert host.busy_fraction(before, before) is None
    assert 0.0 <= host.machine_busy(0.05) <= 1.0


def test_collapse_image_runs():
    assert cases._collapse([1, 5, 9, 9, 9, 6, 9], 9) == [1, 5, -1, 6, -1]


def test_xnnpack_header_parsing():
    head = b"\0\0\0\0" + b"XH00" + struct.pack("<HIII", 30, 32, 100, 132) + struct.pack("<Q", 7 << 33)
    assert pte_bytes._xnn_payload_parts(head) == (32, 100, 132, 7 << 33)
    assert pte_bytes._xnn_payload_parts(b"\0\0\0\0XN01" + bytes(22)) is None  # a bare flatbuffer
    assert pte_bytes._xnn_payload_parts(head[:20]) is None


def test_hf_text_bytes_counts_decoder_and_head_not_embedding():
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    def build(tied: bool, dtype):
        text = LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            tie_word_embeddings=tied,
        )
        vision = CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=99, tie_word_embeddings=tied)
        return LlavaForConditionalGeneration(cfg).to(dtype)

    layer = 32 * 32 * 2 + 32 * 16 * 2 + 32 * 48 * 3 + 32 * 2  # q, o; k, v; mlp; 2 norms
    weights, kv = pte_bytes.hf_text_bytes(build(False, torch.float32))
    assert weights == 4 * (3 * layer + 32 + 100 * 32)  # layers, final norm, lm_head; no embedding
    assert kv == 2 * 3 * 2 * 8 * 4
    weights, kv = pte_bytes.hf_text_bytes(build(True, torch.bfloat16))
    assert weights == 2 * (3 * layer + 32 + 100 * 32)  # the tied matrix once, as the head
    assert kv == 2 * 3 * 2 * 8 * 2


def test_labels_and_paths(tmp_path):
    out = tmp_path / "outputs"
    (out / "quantize").mkdir(parents=True)
    (out / "llava.pte").write_bytes(b"x")
    (out / "tokenizer.bin").write_bytes(b"x")
    (out / "quantize" / "manifest.json").write_text(json.dumps({"config": {"quant": {"scheme": "none"}}}))
    assert rt.infer_label(out / "llava.pte") == "fp32"
    (out / "quantize" / "manifest.json").write_text(json.dumps({"config": {"quant": {"scheme": "8da4w"}}}))
    (case,) = rt.resolve_ptes([out])
    assert (case.label, case.pte, case.tokenizer) == ("8da4w", out / "llava.pte", out / "tokenizer.bin")
    (case,) = rt.resolve_ptes([("mine", out / "llava.pte")])
    assert case.label == "mine"
    with pytest.raises(ValueError, match="differ"):
        rt.resolve_ptes([out, out / "llava.pte"])
    with pytest.raises(ValueError, match="not found"):
        rt.resolve_ptes([out], tokenizer=tmp_path / "missing.bin")


# ------------------------------------------------------------------ orchestration, faked processes


def _fake_isolated(calls):
    def isolated(target, kwargs, preimport=(), threads=None, timeout=None):
        func = target.split(":")[1]
        calls.append((func, kwargs, threads))
        rss = {"rss_base_mb": 100.0, "rss_peak_mb": 150.0, "rss_above_base_mb": 50.0}
        if func == "bandwidth_case":
            return {
                "bandwidth_gb_s": 20.0,
                "bandwidth_by_kernel_gb_s": {"sum": 20.0},
                "bandwidth_bytes": 1,
                "bandwidth_threads": threads,
                **rss,
            }
        ids = [1, 2, -1, 3]
        if func == "executorch_runner_case":
            return {"decode_tok_s": 10.0, "decode_mean_context": 100.0, "prompt_ids": ids, **rss}
        if func == "executorch_methods_case":
            return {"text_decode_tok_s": 20.0, "text_decode_mean_context": 200.0, **rss}
        assert func == "transformers_case"
        return {
            "decode_tok_s": 5.0,
            "decode_mean_context": 100.0,
            "text_decode_tok_s": 4.0,
            "text_decode_mean_context": 200.0,
            "weight_bytes_per_token": 2_000_000_000,
            "kv_bytes_per_position": 0,
            "prompt_ids": ids if kwargs["dtype"] == "fp32" else [9],
            **rss,
        }

    return isolated


def _fake_ptes(tmp_path, monkeypatch, kv_bytes_per_position: int) -> None:
    """a.pte, b.pte and tokenizer.bin in tmp_path (the cwd), each counted as 1 GB of weights."""
    for name in ("a.pte", "b.pte", "tokenizer.bin"):
        (tmp_path / name).write_bytes(b"12345")
    counted = pte_bytes.PteBytes(
        weight_bytes=1_000_000_000,
        named_data_bytes=1,
        inline_constant_bytes=0,
        other_constant_bytes=0,
        position_table_bytes=0,
        kv_bytes_per_position=kv_bytes_per_position,
        kv_buffers=4,
        delegates=1,
    )
    monkeypatch.setattr(rt, "pte_method_bytes", lambda pte: counted)
    monkeypatch.chdir(tmp_path)


def test_measure_all_rows_with_fake_cases(tmp_path, monkeypatch):
    _fake_ptes(tmp_path, monkeypatch, kv_bytes_per_position=1_000_000)
    calls = []
    result = rt.measure_all(
        [("q", tmp_path / "a.pte"), ("f", tmp_path / "b.pte")],
        tmp_path,
        tmp_path / "img.jpg",
        "Q?",
        tokenizer=tmp_path / "tokenizer.bin",
        threads=2,
        hf_dtypes=("fp32", "bf16"),
        isolated=_fake_isolated(calls),
    )
    assert [c[0] for c in calls] == [
        "bandwidth_case",
        "executorch_runner_case",
        "executorch_methods_case",
        "bandwidth_case",
        "executorch_runner_case",
        "executorch_methods_case",
        "bandwidth_case",
        "transformers_case",
        "bandwidth_case",
        "transformers_case",
        "bandwidth_case",
    ]
    assert all(c[2] == 2 for c in calls)
    assert [(r["engine"], r["variant"]) for r in result["rows"]] == [
        ("executorch", "q"),
        ("executorch", "f"),
        ("transformers", "fp32"),
        ("transformers", "bf16"),
    ]
    q = result["rows"][0]
    # the text decode streams 1 GB weights + 1 MB x 200 positions 20 times a second: 24 GB/s,
    # above the 20 GB/s probe, so 24 GB/s is the machine's; runner decode (context 100): 21.8 tok/s
    assert result["bandwidth_gb_s"] == 24.0 and result["bandwidth_probe_gb_s"] == 20.0
    assert result["bandwidth_reached_by"] == "executorch q text decode"
    assert q["bandwidth_limit_tok_s"] == pytest.approx(24e9 / 1.1e9, rel=1e-4)
    assert q["fraction_of_limit"] == pytest.approx(10 / (24e9 / 1.1e9), rel=1e-3)
    assert q["text_bandwidth_limit_tok_s"] == pytest.approx(20.0, rel=1e-4) and q["text_fraction_of_limit"] == 1.0
    assert q["methods_rss_above_base_mb"] == 50.0 and q["rss_above_base_mb"] == 50.0
    assert q["pte"] == "a.pte" and q["pte_bytes"] == 5
    assert [r["prompt_ids_match_executorch"] for r in result["rows"]] == [True, True, True, False]
    assert result["rows"][2]["bandwidth_limit_tok_s"] == pytest.approx(12.0)  # 2 GB per token at 24 GB/s
    assert result["kind"] == "runtime" and result["prompt"] == "Q?"
    assert "rss_above_base_mb" not in result  # the bandwidth process's memory is no row's
    assert all(isinstance(r["load_avg_1m"], float) for r in result["rows"])
    assert all(0 <= r["machine_busy_before"] <= 1 for r in result["rows"])
    assert 0 <= q["methods_machine_busy_before"] <= 1 and "machine_busy_before" not in result
    assert str(tmp_path) not in json.dumps(result)
    assert all("prompt_ids" not in r for r in result["rows"])


def test_executorch_cases_in_several_processes_give_medians(tmp_path, monkeypatch):
    _fake_ptes(tmp_path, monkeypatch, kv_bytes_per_position=0)
    calls, rates, bandwidths = [], iter([1.0, 3.0, 1.2, 5.0]), iter([20.0, 25.0, 22.0])
    fake = _fake_isolated(calls)

    def isolated(target, kwargs, **kw):
        out = fake(target, kwargs, **kw)
        if target.endswith("executorch_runner_case"):
            out["decode_tok_s"] = next(rates)
            out["steps"] = 3
        if target.endswith("bandwidth_case"):
            out["bandwidth_gb_s"] = next(bandwidths)
        return out

    result = rt.measure_all(
        [("q", tmp_path / "a.pte"), ("f", tmp_path / "b.pte")],
        tmp_path,
        tmp_path / "i.jpg",
        tokenizer=tmp_path / "tokenizer.bin",
        engines=("executorch",),
        processes={"q": 3},
        isolated=isolated,
    )
    names = [c[0] for c in calls]
    assert names.count("executorch_runner_case") == 4 and names.count("executorch_methods_case") == 4
    q, f = result["rows"]
    assert (q["processes"], f["processes"]) == (3, 1)
    assert q["decode_tok_s"] == 1.2 and f["decode_tok_s"] == 5.0  # median of 1, 3, 1.2
    assert q["steps"] == 3 and isinstance(q["steps"], int)
    # the highest bandwidth, measured before each case and after the last, sets the limit
    assert result["bandwidth_gb_s"] == 25.0 and result["bandwidth_runs_gb_s"] == [20.0, 25.0, 22.0]
    assert result["bandwidth_reached_by"] == "probe" and q["bandwidth_limit_tok_s"] == pytest.approx(25.0)


def test_a_decode_faster_than_the_probe_sets_the_limit():
    rows = [
        {
            "engine": "executorch",
            "variant": "fp32",
            "weight_bytes_per_token": 2_000_000_000,
            "kv_bytes_per_position": 0,
            "decode_mean_context": 10.0,
            "decode_tok_s": 20.0,
            "weights_fit_in_cache": False,
        },
        {
            "engine": "executorch",
            "variant": "tiny",
            "weight_bytes_per_token": 1_000_000,
            "kv_bytes_per_position": 0,
            "decode_mean_context": 10.0,
            "decode_tok_s": 90000.0,
            "weights_fit_in_cache": True,
        },
    ]
    rows = [rates.add_bandwidth_fields(r, 30.0) for r in rows]
    assert rows[0]["achieved_gb_s"] == 40.0 and rows[0]["fraction_of_limit"] > 1
    # 40 GB/s streamed from DRAM beats the 30 GB/s probe; the cache-resident 90 GB/s does not count
    assert rates.machine_bandwidth([25.0, 30.0], rows) == (40.0, "executorch fp32 runner decode")
    assert rates.machine_bandwidth([45.0], rows) == (45.0, "probe")


def test_merge_processes():
    runs = [
        {"a": 1.0, "b": None, "c": "x", "n": 2},
        {"a": 3.0, "b": 1.0, "c": "y", "n": 4},
        {"a": 2.0, "b": 2.0, "c": "z", "n": 3},
    ]
    assert rates.merge_processes(runs) == {"a": 2.0, "b": None, "c": "x", "n": 3, "processes": 3}
    assert rates.merge_processes(runs[:1]) == {**runs[0], "processes": 1}


def test_measure_all_rejects_bad_arguments(tmp_path):
    fake = _fake_isolated([])
    with pytest.raises(ValueError, match="engines"):
        rt.measure_all([], tmp_path, tmp_path, engines=("llama.cpp",), isolated=fake)
    with pytest.raises(ValueError, match="hf_dtypes"):
        rt.measure_all([], tmp_path, tmp_path, engines=("transformers",), hf_dtypes=("int3",), isolated=fake)
    with pytest.raises(ValueError, match="decode_tokens"):
        rt.measure_all([], tmp_path, tmp_path, engines=("transformers",), decode_tokens=1, isolated=fake)
    result = rt.measure_all([], tmp_path, tmp_path, engines=("transformers",), hf_dtypes=("bf16",), isolated=fake)
    assert [r["variant"] for r in result["rows"]] == ["bf16"]
    assert result["rows"][0]["prompt_ids_match_executorch"] is None


def test_cli_pairs_labels_and_writes_sorted_json(tmp_path, monkeypatch):
    seen = {}

    def fake(ptes, checkpoint, image, prompt, **kw):
        seen.update(ptes=ptes, prompt=prompt, **kw)
        return {"rows": [], "kind": "runtime"}

    monkeypatch.setattr(rt, "measure_all", fake)
    out = tmp_path / "bench" / "runtime-x.json"
    # fmt: off
    argv = ["--pte", "a.pte", "--label", "8da4w", "--pte", "b.pte", "--pte", "c.pte", "--label", "fp32",
            "--checkpoint", "ck", "--image", "i.jpg", "--out", str(out), "--decode-tokens", "5", "--hf-dtypes", "bf16"]
    # fmt: on
    assert rt.main(argv) == 0
    assert seen["ptes"] == [("8da4w", Path("a.pte")), Path("b.pte"), ("fp32", Path("c.pte"))]
    assert seen["decode_tokens"] == 5 and seen["hf_dtypes"] == ("bf16",) and seen["prompt"] == rt.DEFAULT_QUESTION
    assert out.read_text() == json.dumps({"kind": "runtime", "rows": []}, indent=2, sort_keys=True) + "\n"
    assert rt.main(["--checkpoint", "ck", "--image", "i", "--out", str(out)]) == 2  # executorch needs --pte
    for bad in (["--label", "x"], ["--pte", "a.pte", "--label", "x", "--label", "y"]):
        with pytest.raises(SystemExit):
            rt.main([*bad, "--checkpoint", "ck", "--image", "i", "--out", str(out)])


# ------------------------------------------------------------------ on real exports


def _text_decoder_linear_params(checkpoint: Path) -> tuple[int, int, dict]:
    """(linear weight elements of the language model + lm_head, norm elements, text config)."""
    from safetensors import safe_open

    cfg = json.loads((checkpoint / "config.json").read_text())["text_config"]
    linear = norms = 0
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if "embed_tokens" in name or not ("language_model" in name or name.startswith("lm_head")):
                continue
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            if name.endswith("norm.weight"):
                norms += n
            else:
                linear += n
    return linear, norms, cfg


@pytest.mark.slow
def test_pte_bytes_match_the_checkpoint(export_fp32, export_8da4w):
    linear, norms, cfg = _text_decoder_linear_params(export_fp32 / "download")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    fp32 = pte_bytes.pte_method_bytes(export_fp32 / "llava.pte")
    assert fp32.named_data_bytes == 4 * linear  # every linear delegated, fp32
    assert 4 * norms <= fp32.other_constant_bytes <= 4 * norms + 64
    assert fp32.weight_bytes == fp32.named_data_bytes + fp32.inline_constant_bytes + fp32.other_constant_bytes
    assert fp32.kv_bytes_per_position == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    assert fp32.kv_buffers == 2 * cfg["num_hidden_layers"]
    assert fp32.backends == ("XnnpackBackend",)
    assert fp32.position_table_bytes == 2 * 768 * head_dim * 4  # RoPE cos/sin [768, head_dim], max_seq_len 768
    q = pte_bytes.pte_method_bytes(export_8da4w / "llava.pte")
    # int4 weights (1/8 of fp32) plus one scale per group of 32
    assert linear // 2 < q.named_data_bytes <= linear // 2 + linear // 32 * 4
    assert q.kv_bytes_per_position == fp32.kv_bytes_per_position
    vision = pte_bytes.pte_method_bytes(export_fp32 / "llava.pte", "vision_encoder")
    assert vision.named_data_bytes > 0 and vision.delegates > 0


@pytest.mark.slow
def test_measure_all_on_the_tiny_export(export_8da4w, monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    result = rt.measure_all(
        [export_8da4w / "llava.pte"],
        export_8da4w / "download",
        root / "assets" / "images" / "coffee.jpg",
        decode_tokens=4,
        repeats=1,
        hf_dtypes=("fp32",),
        bandwidth_gib=0.125,
    )
    text = json.dumps(result, sort_keys=True)
    assert str(export_8da4w) not in text and "/tmp" not in text
    assert result["bandwidth_gb_s"] > 0.5
    et, hf = result["rows"]
    assert (et["engine"], et["variant"], hf["engine"], hf["variant"]) == ("executorch", "8da4w", "transformers", "fp32")
    for row in (et, hf):
        assert row["prompt_ids_match_executorch"] is True
        assert row["prompt_tokens"] == 19 and row["image_tokens"] == 576
        for key in (
            "image_encode_s",
            "prefill_s",
            "decode_tok_s",
            "text_prefill600_s",
            "text_decode_tok_s",
            "bandwidth_limit_tok_s",
            "fraction_of_limit",
            "text_fraction_of_limit",
            "rss_above_base_mb",
        ):
            assert row[key] > 0, key
    # the text methods alone hold less than the whole program (vision encoder loaded after them)
    assert 0 < et["text_rss_above_base_mb"] < et["methods_rss_above_base_mb"]
    assert et["prefill_s"] >= et["image_encode_s"]  # the image prefill is part of each run's total
    assert et["et_threadpool_threads"] == et["et_threadpool_threads_methods"] == 2
    assert et["xnnpack_registered"] and et["xnnpack_registered_methods"]
    # The answer's first token comes from the prefill; the decode steps that follow (until EOS or
    # the token budget) feed positions 595, 596, ...: their mean context is 595 + (steps + 1) / 2.
    steps = et["decode_tokens_generated"] - 1
    assert steps >= 1 and et["decode_mean_context"] == 595 + (steps + 1) / 2
    assert et["text_decode_mean_context"] == 600 + 2.5
    assert hf["torch_threads"] == 2
    assert 0.1 < et["weight_bytes_per_token"] / hf["weight_bytes_per_token"] < 0.2  # 4-bit vs fp32
