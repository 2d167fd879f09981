"""export.kv_cache=int8: ExecuTorch's quantized KV cache and quantized SDPA in place of the
fp32 cache, eager and through the whole pipeline into the runner."""

import copy

import pytest
import torch

from llava_pipeline.model.source_transforms import QuantizedKVCache, apply_source_transforms, check_custom_ops
from llava_pipeline.model.tiny import make_tiny_llava

from .models import plain_model

FP32 = ["custom_kv_cache", "custom_sdpa"]
INT8 = [*FP32, "quantized_kv_cache"]


@pytest.fixture(scope="module")
def models():
    plain = plain_model(make_tiny_llava(0), 768)
    return (apply_source_transforms(copy.deepcopy(plain), FP32), apply_source_transforms(copy.deepcopy(plain), INT8))


@torch.no_grad()
def test_int8_cache_tracks_fp32_cache(models):
    fp32, int8 = models
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 600, 64, generator=g)
    a, b = fp32.text_decoder(x, torch.tensor([0])), int8.text_decoder(x, torch.tensor([0]))
    assert (a - b).abs().max() < 0.01 * a.abs().max() and a.argmax() == b.argmax()
    for pos in range(600, 610):
        y = torch.randn(1, 1, 64, generator=g)
        a, b = fp32.text_decoder(y, torch.tensor([pos])), int8.text_decoder(y, torch.tensor([pos]))
        assert (a - b).abs().max() < 0.01 * a.abs().max()
    cache = int8.text_decoder.layers[0].attention.kv_cache
    assert isinstance(cache, QuantizedKVCache) and cache.k_cache.dtype == torch.int8
    assert cache.k_cache[0, :610].abs().sum() > 0 and cache.k_cache[0, 610:].abs().sum() == 0


def test_checks_see_the_quantized_pieces(models):
    fp32, int8 = models
    check_custom_ops(int8, INT8)
    with pytest.raises(RuntimeError, match="quantized_kv_cache"):
        check_custom_ops(fp32, INT8)
    ep = torch.export.export(
        copy.deepcopy(int8).text_decoder,
        (torch.randn(1, 3, 64), torch.tensor([0])),
        dynamic_shapes=({1: torch.export.Dim("seq", min=1, max=768)}, None),
        strict=False,
    )
    check_custom_ops(ep, INT8)
    fp32_ep = torch.export.export(
        copy.deepcopy(fp32).text_decoder, (torch.randn(1, 3, 64), torch.tensor([0])), strict=False
    )
    with pytest.raises(RuntimeError, match="custom_quantized_sdpa"):
        check_custom_ops(fp32_ep, INT8)


@pytest.mark.slow
def test_int8_cache_pipeline_passes_the_verifier(export_int8, export_8da4w):
    """The whole pipeline with export.kv_cache=int8 (and the int8 decoder and vision tower): emit's verifier
    (runner vs eager) passes, and the program's mutable cache state is a quarter of the fp32 one."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    out = export_int8
    assert (out / "llava.pte").is_file() and (out / "emit" / "manifest.json").is_file()

    def cache_bytes(pte):
        program = deserialize_pte_binary(pte.read_bytes()).program
        plan = next(p for p in program.execution_plan if p.name == "text_decoder")
        sizes = {1: 1, 6: 4, 4: 8}  # ScalarType: int8, float, long
        total = 0
        for v in plan.values:
            t = v.val
            if (
                getattr(t, "allocation_info", None) is not None
                and len(getattr(t, "sizes", [])) == 4
                and t.sizes[1] == 768
            ):
                n = 1
                for s in t.sizes:
                    n *= s
                total += n * sizes.get(int(t.scalar_type), 0)
        return total

    fp32_cache, int8_cache = cache_bytes(export_8da4w / "llava.pte"), cache_bytes(out / "llava.pte")
    assert fp32_cache > 0 and int8_cache < 0.5 * fp32_cache
