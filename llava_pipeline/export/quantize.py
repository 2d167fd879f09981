"""Quantization of the text side: the decoder linears, 8-bit token embedding.

`quant.scheme` (every linear of the text decoder, lm_head included; torchao's
Int8DynamicActivationIntxWeightConfig, int8 dynamic per-token activations):
- `8da4w`: int4 weights in groups of `group_size` along in_features, or one scale per
  output channel with `group_size=0` (XNNPACK's QD8 x QB4W and QD8 x QC4W GEMMs);
- `8da8w`: int8 weights, one scale per output channel (QD8 x QC8W; XNNPACK has no
  blockwise int8 kernel, so `group_size` must be 0).
Vision (`quant.vision`): fp32 (default), or `8da8w`: int8 per-channel weights with int8
dynamic activations on every linear of the vision tower and projector (a quarter of the
bytes; ExecuTorch's LLaVA example quantizes its image encoder to int8 too, statically).
Embedding: int8 per-row weights (ExecuTorch's EmbeddingQuantHandler, which
lowers to `quantized_decomposed::embedding_byte`).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from llava_pipeline.base.config import QPARAMS, ConfigError, QuantConfig

XNNPACK_GROUP_MULTIPLE = 32


def decoder_linears(model) -> dict[str, nn.Linear]:
    """Linears of the text decoder (lm_head included), by qualified name."""
    return {f"text_decoder.{name}": m for name, m in model.text_decoder.named_modules() if isinstance(m, nn.Linear)}


def weight_config(quant: QuantConfig):
    """torchao's config for the decoder linears under `quant.scheme` (not "none")."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    # torch has int1..int7 since 2.3, its stubs declare none of them
    int4 = torch.int4  # type: ignore[attr-defined]
    bits = {"8da4w": int4, "8da8w": torch.int8}[quant.scheme]
    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=bits,
        weight_granularity=PerGroup(quant.group_size) if quant.group_size else PerAxis(0),
        intx_choose_qparams_algorithm=QPARAMS[quant.qparams],
    )


def check_group_size(in_features: dict[str, int], quant: QuantConfig) -> None:
    """Reject a group size that does not divide some layer's in_features, naming it.
    Per-channel weights (`group_size=0`) fit every layer."""
    if quant.scheme == "none" or quant.group_size == 0:
        return
    for name, n in in_features.items():
        if n % quant.group_size:
            raise ConfigError(
                f"quant.group_size={quant.group_size} does not divide in_features={n} "
                f"of layer {name}; pick a divisor of every decoder layer's in_features"
            )
    if quant.group_size % XNNPACK_GROUP_MULTIPLE:
        # XNNPACK's blockwise int4 GEMMs assert this at partition time, after all the work.
        raise ConfigError(
            f"quant.group_size={quant.group_size}: XNNPACK's 4-bit kernels need a multiple of {XNNPACK_GROUP_MULTIPLE}"
        )


@torch.no_grad()
def quantize_unit(unit: str, model, quant: QuantConfig) -> None:
    """Quantize one load unit of `model` (see model.load_units) in place, per `quant`:
    the decoder layers and lm_head get `quant.scheme`, the token embedding int8; the rest stays."""
    if quant.scheme != "none" and unit.startswith(("text_decoder.layers.", "text_decoder.output")):
        from torchao.quantization import quantize_

        module = model.get_submodule(unit)
        check_group_size(
            {
                f"{unit}.{k}" if k else unit: m.in_features
                for k, m in module.named_modules()
                if isinstance(m, nn.Linear)
            },
            quant,
        )
        config = weight_config(quant)
        if isinstance(module, nn.Linear):  # quantize_ walks children; give it a parent
            holder = nn.Sequential(module)
            quantize_(holder, config)
            model.text_decoder.output = holder[0]
        else:
            quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    elif unit == "vision_encoder" and quant.vision == "8da8w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis

        # Per output channel, min/max scales: at 8 bits HQQ's search buys nothing.
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        quantize_(model.vision_encoder, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    elif unit == "token_embedding" and quant.embedding_bits == 8:
        from executorch.examples.models.llama.source_transformation.quantize import (
            EmbeddingQuantHandler,
        )

        embedding = _EmbeddingHolder(model)
        handler = EmbeddingQuantHandler(
            embedding, bitwidth=8, group_size=None, packed=False, quantize_with_hqq=quant.qparams == "hqq"
        )
        with contextlib.redirect_stdout(sys.stderr):  # it prints a progress line
            handler.quantized_model()
        model.token_embedding = embedding.token_embedding


@torch.no_grad()
def prepare_quantized_structure(model, quant: QuantConfig):
    """Make a fresh float model able to take a saved quantized state dict.

    torchao's quantized weights are tensor subclasses stored in the state dict
    itself, so assigning them restores the linears; the int8 embedding needs
    its module structure first.
    """
    if quant.embedding_bits == 8:
        from executorch.examples.models.llama.source_transformation.quantize import (
            replace_embedding_weight_only_grouped_int8_per_channel,
        )

        holder = _EmbeddingHolder(model)
        replace_embedding_weight_only_grouped_int8_per_channel(holder, "cpu", 8, None, False)
        model.token_embedding = holder.token_embedding
    return model


class _EmbeddingHolder(nn.Module):
    """ExecuTorch's embedding handlers walk children; give them the embedding as a child."""

    def __init__(self, model):
        super().__init__()
        self.token_embedding = model.token_embedding
