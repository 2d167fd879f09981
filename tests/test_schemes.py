"""The decoder's weight schemes (quant.scheme / quant.group_size): each lowers to one of XNNPACK's
dynamic-quant GEMMs and computes what torchao's eager linear computes."""

from __future__ import annotations

import pytest
import torch

from scripts.bench_schemes import loaded, lowered_linear

SCHEMES = {  # (scheme, group_size) -> bits per weight, roughly
    ("8da4w", 32): 4,
    ("8da4w", 0): 4,
    ("8da8w", 0): 8,
}


def _lowered(scheme: str, group_size: int, in_features: int = 128, out_features: int = 384):
    fp32_model, model, edge = lowered_linear(scheme, group_size, in_features, out_features, max_m=64)
    x = torch.randn(1, 5, in_features)
    ops = {str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"}
    return x, fp32_model(x), model(x), ops, edge.to_executorch().buffer


@pytest.mark.parametrize("scheme, group_size", list(SCHEMES))
def test_scheme_lowers_whole_to_xnnpack_and_matches_eager(scheme, group_size):
    x, fp32, eager, ops, pte = _lowered(scheme, group_size)
    assert all("executorch_call_delegate" in op or "getitem" in op for op in ops), ops
    method, _keep = loaded(pte)
    out = method.execute([x])[0]
    # XNNPACK vs torchao: the same int weights, activations rounded alike within one step.
    assert float((out - eager).abs().max()) < 0.05 * float(eager.std())
    # And the weights really are quantized: int8 loses less than int4, both lose something.
    rel = float((eager - fp32).norm() / fp32.norm())
    assert (0.002 < rel < 0.02) if SCHEMES[scheme, group_size] == 8 else (0.02 < rel < 0.15), rel


def test_int8_weights_take_about_twice_the_bytes_of_int4():
    sizes = {key: len(_lowered(*key)[4]) for key in [("8da4w", 0), ("8da8w", 0)]}
    weights = 128 * 384
    assert 0.4 * weights < sizes["8da8w", 0] - sizes["8da4w", 0] < 0.6 * weights, sizes


@pytest.mark.slow
def test_8da8w_pipeline_passes_the_verifier(export_int8, export_8da4w):
    """The pipeline with an int8 decoder: every decoder linear delegated, emit's verifier
    passes (it ran in emit; run again here through its CLI path), and the decoder holds about
    half a byte per weight more than the default's int4 in groups of 32."""
    from llava_pipeline.base.files import read_json
    from llava_pipeline.formats.ptesize import method_bytes
    from llava_pipeline.verify import verify

    out = export_int8
    assert read_json(out / "quantize" / "manifest.json")["config"]["quant"]["scheme"] == "8da8w"
    report = verify(out / "llava.pte")
    assert report.ok, report.table()
    delegation = read_json(out / "partition" / "manifest.json")["delegation"]["text_decoder"]
    left = [op for op in delegation["undelegated_ops"] if op.startswith(("torchao.", "aten.linear", "aten.mm"))]
    assert delegation["delegate_calls"] > 0 and not left
    int8 = method_bytes(out / "llava.pte")["text_decoder"]
    int4 = method_bytes(export_8da4w / "llava.pte")["text_decoder"]
    assert int8 > 1.3 * int4, (int8, int4)
