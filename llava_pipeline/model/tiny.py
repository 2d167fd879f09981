"""A tiny, seeded, random-weight LLaVA-1.5 for tests and the pipeline's smoke runs.

It keeps LLaVA-1.5-7b-hf's geometry wherever that is cheap (336x336 input, patch 14, 576 image
tokens, feature layer -2, vocab 32064, image token 32000, pad 32001, bos 1, eos 2) and shrinks
only widths and depths. Every in_features of the text decoder's linears and lm_head is a
multiple of 32, the tiny preset's 4-bit group size.

Weights are not HF's init (std 0.02 gives near-flat logits, where greedy tokens are decided by
rounding noise). They are scaled so that greedy decoding is a clear, varied walk over the
vocabulary that still depends on the image and the earlier tokens:
- unit-gain linears and non-uniform attention; token embeddings of std 2, so the residual
  stream is led by the current token and the next token is, roughly, a random function of it;
- lm_head rows of equal norm with logits of std ~8 (top-1/top-2 margins median ~1, rarely
  under 0.1): random row norms make a few "hub" tokens win from everywhere;
- minus 4x each token's own unit embedding direction in its lm_head row, so the current token
  scores low (a repetition penalty built into the weights; without it greedy runs often fall
  into x, x, x or x, y, x, y loops).

Some lm_head rows are shrunk to ~0 so those tokens never win argmax (their logit sits near 0
while the winner is tens of units up):
- ids 131..258, Llama-2's byte-fallback pieces <0x80>..<0xFF>: one such byte is not valid
  UTF-8 alone and ExecuTorch's runner binding raises UnicodeDecodeError on it;
- ids 0..2 (unk, bos, eos): so generation never stops early or prints control tokens;
- ids >= 32000 (image, pad and padding rows): the SentencePiece tokenizer has no piece for them.
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

SUPPRESSED_TOKEN_IDS = (*range(0, 3), *range(131, 259))
TOKENIZER_VOCAB_SIZE = 32000  # SentencePiece pieces; rows >= this are suppressed too
LOGIT_SCALE = 8.0  # norm of each lm_head row, so logits have std ~8 over the vocabulary
EMBED_STD = 2.0
SELF_PENALTY = 4.0


def tiny_llava_config(
    vision_hidden: int = 64, vision_mlp: int = 128, text_hidden: int = 64, text_mlp: int = 128
) -> LlavaConfig:
    """LLaVA-1.5's geometry (336 px, patch 14, 576 tokens, feature layer -2, vocab 32064) and
    formats at small widths: 3 CLIP layers (2 of them run), 2 Llama layers. The defaults are the
    random-weight test model's; the built-in model (scripts/train_builtin.py) is twice as wide."""
    cfg = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=vision_hidden,
            intermediate_size=vision_mlp,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            projection_dim=vision_hidden,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=32064,
            hidden_size=text_hidden,
            intermediate_size=text_mlp,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=32001,
            tie_word_embeddings=False,
        ),
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        tie_word_embeddings=False,
    )
    # Not a LlavaConfig field (it keeps unknown keys as attributes): set like one, config.json unchanged.
    cfg.pad_token_id = 32001
    return cfg


def init_(name: str, p: torch.Tensor, g: torch.Generator) -> None:
    """Fill one parameter, by its HF state-dict name, in place from `g` (see the module
    docstring for why these scales); llava_pipeline.model.synthetic uses the same rules."""

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    if "norm" in name and name.endswith("weight"):  # LayerNorm / RMSNorm gains
        p.copy_(1.0 + 0.1 * randn(p.shape))
    elif name.endswith("bias"):
        p.copy_(0.1 * randn(p.shape))
    elif name.endswith("embed_tokens.weight"):
        p.copy_(EMBED_STD * randn(p.shape))
    elif name.endswith("class_embedding"):
        p.copy_(randn(p.shape))
    elif name.endswith("position_embedding.weight"):
        p.copy_(0.5 * randn(p.shape))
    elif name.endswith("lm_head.weight"):
        p.copy_(randn(p.shape))  # shaped by shape_lm_head once the embeddings exist
    elif p.dim() >= 2:  # linear / conv weights: unit gain over fan-in
        p.copy_(randn(p.shape) / p[0].numel() ** 0.5)
    else:
        raise ValueError(f"no init rule for {name}")


def shape_lm_head(lm_head: torch.Tensor, embed: torch.Tensor) -> None:
    """Turn `init_`'s random lm_head into the final one in place, given the token embedding:
    rows of equal norm, the self-penalty, the suppressed rows shrunk (module docstring)."""
    w = lm_head / lm_head.norm(dim=1, keepdim=True) * LOGIT_SCALE
    w -= SELF_PENALTY * embed / embed.norm(dim=1, keepdim=True)
    w[list(SUPPRESSED_TOKEN_IDS)] *= 1e-3
    w[TOKENIZER_VOCAB_SIZE:] *= 1e-3
    lm_head.copy_(w)


def make_tiny_llava(seed: int = 0, config: LlavaConfig | None = None) -> LlavaForConditionalGeneration:
    """Deterministic tiny LLaVA in eval mode: same seed -> same weights, bit for bit. Leaves
    torch's global RNG untouched (HF's own init draws from it, so it runs inside fork_rng).
    `config` (default `tiny_llava_config()`) lets tests vary the geometry, e.g. the KV heads."""
    with torch.random.fork_rng(devices=[]):
        model = LlavaForConditionalGeneration(config or tiny_llava_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            init_(name, p, g)
        embed = model.get_input_embeddings()
        assert isinstance(embed, torch.nn.Embedding)  # Llama's embed_tokens
        shape_lm_head(model.lm_head.weight, embed.weight)
    return model.eval()
