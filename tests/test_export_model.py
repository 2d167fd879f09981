"""The three entry points export with torch.export (strict=False, dynamic sequence length) and the
exported programs compute what eager does, including chunked prefill at nonzero start positions
and a decode step into the last KV-cache slot."""

import copy

import pytest
import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim, export

from llava_pipeline.model.source_transforms import apply_source_transforms, check_custom_ops
from llava_pipeline.model.tiny import make_tiny_llava

from .models import plain_model

MAX_SEQ_LEN = 768
CUSTOM = ["custom_kv_cache", "custom_sdpa"]


@pytest.fixture(scope="module")
def plain():
    return plain_model(make_tiny_llava(0), MAX_SEQ_LEN)


def export_module(module, args, dynamic_shapes=None):
    # backed_size_oblivious: without it export reasons as if the dynamic seq dim were >= 2, turns
    # update_cache's `start_pos + seq <= max_seq_len` into a runtime assert `start_pos <= max_seq_len - 2`
    # and the exported program refuses a decode step into the last cache slot.
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def seq_dim():
    return Dim("seq", min=1, max=MAX_SEQ_LEN)


@torch.no_grad()
def test_export_token_embedding(plain):
    ep = export_module(plain.token_embedding, (torch.tensor([[1, 2, 3]]),), ({1: seq_dim()},))
    for n in (1, 7, MAX_SEQ_LEN):
        ids = torch.randint(0, 32064, (1, n))
        assert torch.equal(ep.module()(ids), plain.token_embedding(ids))


@torch.no_grad()
def test_export_vision_encoder(plain):
    image = torch.randint(0, 256, (1, 3, 336, 336), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ep = export_module(plain.vision_encoder, (image,))
    assert ep.graph_signature.user_inputs and ep.module()(image).shape == (1, 576, 64)
    torch.testing.assert_close(ep.module()(image), plain.vision_encoder(image), atol=1e-6, rtol=0)


@pytest.mark.parametrize("transforms", [[], CUSTOM], ids=["plain", "custom"])
@torch.no_grad()
def test_export_text_decoder_chunked(plain, transforms):
    model = apply_source_transforms(copy.deepcopy(plain), transforms)
    if transforms:
        check_custom_ops(model)
    eager = copy.deepcopy(model)  # separate caches: the exported module mutates its own
    example = (torch.randn(1, 5, 64), torch.tensor([0]))
    ep = export_module(copy.deepcopy(model).text_decoder, example, ({1: seq_dim()}, None))
    if transforms:
        check_custom_ops(ep)
    assert any(r.lower == 1 and r.upper == MAX_SEQ_LEN for r in ep.range_constraints.values())
    exported = ep.module()

    x = torch.randn(1, MAX_SEQ_LEN, 64, generator=torch.Generator().manual_seed(0))

    def run(starts):
        bounds = list(starts)
        for a, b in zip(bounds, bounds[1:]):
            args = (x[:, a:b], torch.tensor([a]))
            torch.testing.assert_close(exported(*args), eager.text_decoder(*args), atol=1e-5, rtol=0)

    run([0, 6, 582, 590, 591, 592, 593])  # text, image, text chunks, then decode steps
    run([0, MAX_SEQ_LEN - 1, MAX_SEQ_LEN])  # restart at 0, then decode into the last slot
    run([0, MAX_SEQ_LEN])  # one chunk of the full length


def test_export_text_decoder_custom_graph_has_no_index_copy(plain):
    model = apply_source_transforms(copy.deepcopy(plain), CUSTOM)
    ep = export_module(model.text_decoder, (torch.randn(1, 5, 64), torch.tensor([0])), ({1: seq_dim()}, None))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("index_copy" in t or "scaled_dot_product" in t for t in targets), targets
