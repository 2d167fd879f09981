"""quant.vision=8da8w: int8 per-channel weights with dynamic int8 activations on the vision
tower and projector, eager and through the whole pipeline (emit's verifier, XNNPACK lowering)."""

import copy

import pytest
import torch
from torch import nn

from llava_pipeline.base.config import ConfigError, QuantConfig, from_dict, validate
from llava_pipeline.export import export, model_io, quantize
from llava_pipeline.model.tiny import make_tiny_llava

from .models import plain_model


@pytest.fixture(scope="module")
def fp32_model():
    return plain_model(make_tiny_llava(0), 768).eval()


def _vision_linears(model):
    return {n: m for n, m in model.vision_encoder.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def test_vision_8da8w_quantizes_every_vision_linear_and_stays_close(fp32_model):
    model = copy.deepcopy(fp32_model)
    quantize.quantize_unit("vision_encoder", model, QuantConfig(scheme="none", vision="8da8w"))
    linears = _vision_linears(model)
    assert linears and any(n.startswith("projector.") for n in linears)
    for name, m in linears.items():
        w = m.weight  # torchao's int8 tensor: one scale per output channel
        assert w.qdata.dtype == torch.int8 and tuple(w.scale.shape) == (m.out_features, 1), name
        assert w.activation_quantization is not None, name  # dynamic int8 activations
    # the text side is left alone by the vision unit
    assert all(
        type(m.weight) in (torch.Tensor, nn.Parameter) for m in model.text_decoder.modules() if isinstance(m, nn.Linear)
    )
    g = torch.Generator().manual_seed(3)
    v = model.args.vision
    pixels = torch.randint(0, 256, (1, v.num_channels, v.image_size, v.image_size), generator=g, dtype=torch.uint8)
    ref, got = fp32_model.vision_encoder(pixels), model.vision_encoder(pixels)
    err = float((got - ref).abs().max()) / float(ref.std())
    assert 0 < err < 0.25  # quantized (not a no-op), and close to fp32


@torch.no_grad()
def test_vision_none_leaves_the_tower_fp32(fp32_model):
    model = copy.deepcopy(fp32_model)
    quantize.quantize_unit("vision_encoder", model, QuantConfig(scheme="8da4w", vision="none"))
    fp32 = _vision_linears(fp32_model)
    for name, m in _vision_linears(model).items():
        assert torch.equal(m.weight, fp32[name].weight), name


def test_dynamic_quant_methods_follow_the_config():
    assert export.dynamic_quant_methods(QuantConfig(scheme="8da4w")) == {"text_decoder"}
    assert export.dynamic_quant_methods(QuantConfig(scheme="8da4w", vision="8da8w")) == {
        "text_decoder",
        "vision_encoder",
    }
    assert export.dynamic_quant_methods(QuantConfig(scheme="none", vision="8da8w")) == {"vision_encoder"}
    assert export.dynamic_quant_methods(QuantConfig(scheme="none")) == set()


def test_unknown_vision_scheme_names_the_key():
    # The schema's enum rejects it as the config is read, before any validation across keys.
    with pytest.raises(ConfigError, match=r"quant\.vision: got 'int4' \(allowed: none, 8da8w\)"):
        validate(from_dict({"model": {"name": "t", "source": "builtin:tiny"}, "quant": {"vision": "int4"}}))


@pytest.mark.slow
def test_vision_8da8w_pipeline_passes_the_verifier(export_int8, export_8da4w, fp32_model):
    """The whole pipeline with quant.vision=8da8w (and the int8 decoder and cache): every vision linear
    lowered to XNNPACK with its activation quantization, emit's verifier passes, and the vision
    method sheds 3 of the 4 bytes of every linear weight (less one fp32 scale per output channel)."""
    from llava_pipeline.base.files import read_json
    from llava_pipeline.formats.ptesize import method_bytes
    from llava_pipeline.verify import verify

    out = export_int8
    assert (out / "llava.pte").is_file() and (out / "emit" / "manifest.json").is_file()
    report = verify(out / "llava.pte")  # the verifier's CLI path: also against the fp32 model
    assert report.ok, report.table()
    info = [r for r in report.rows if r.method == "vision_encoder" and r.metric == "eager quantized vs fp32 (INFO)"]
    assert len(info) == 1 and float(info[0].value.split()[1].rstrip("*σ")) > 0, report.table()
    delegation = read_json(out / "partition" / "manifest.json")["delegation"]["vision_encoder"]
    left = [op for op in delegation["undelegated_ops"] if op.startswith(("torchao.", "aten.linear", "aten.mm"))]
    assert delegation["delegate_calls"] > 0 and not left
    fp32_vision = method_bytes(export_8da4w / "llava.pte")["vision_encoder"]
    int8_vision = method_bytes(out / "llava.pte")["vision_encoder"]
    # the weights this pipeline exported, as source_transform wrote them
    linears = _vision_linears(model_io.load_transformed(export_8da4w / "source_transform")).values()
    saved = sum(3 * m.weight.numel() - 4 * m.out_features for m in linears)
    assert 0.9 * saved <= fp32_vision - int8_vision <= 1.1 * saved
