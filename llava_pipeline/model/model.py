"""LLaVA-1.5 (CLIP ViT-L/14-336 + MLP projector + Llama/Vicuna) as three exportable modules.

`LlavaModel` owns the three entry points the ExecuTorch multimodal runner calls:

- `vision_encoder(image uint8 [1, C, H, W]) -> [1, N_img, D_text]`: channel mapping, centred
  padding and normalisation happen in the graph, so the runner hands over the decoded picture
  as ExecuTorch's llava_main does (C 1..4, H and W up to the image size; runner_image.py).
- `token_embedding(ids int64 [1, S]) -> [1, S, D_text]`: a plain `nn.Embedding`, so embedding
  quantizers that look for `nn.Embedding` find it.
- `text_decoder(embeds [1, S, D_text], input_pos int64 [1]) -> logits float32 [1, V]` for the
  last position. It owns a static KV cache; prefill may arrive in chunks at any start position.

Floating tensors are in the model's parameter dtype (float32 unless converted). The KV-cache
update and the attention kernel are separate modules (`KVCache`, `SDPA`) so that
`source_transforms` can swap them for ExecuTorch's custom ops without touching this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_pipeline.formats.runner_image import RunnerImage, check_image, pad_color
from llava_pipeline.model.model_args import ModelArgs, TextArgs, VisionArgs

# ---------------------------------------------------------------------------------------------
# Vision: CLIP ViT up to the feature layer, then the projector
# ---------------------------------------------------------------------------------------------


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t):
            return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

        # Written out rather than F.scaled_dot_product_attention: its edge decomposition
        # guards fully masked rows with where/eq/any ops that XNNPACK does not take (about a
        # sixth of the image encoder's time); matmul + softmax lower to XNNPACK whole.
        q = heads(self.q_proj(x)) * (d // self.n_heads) ** -0.5
        weights = torch.softmax(q @ heads(self.k_proj(x)).transpose(-2, -1), dim=-1)
        y = weights @ heads(self.v_proj(x))
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as CLIP was trained


class VisionLayer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.self_attn = VisionAttention(a.hidden_size, a.num_heads)
        self.layer_norm2 = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.mlp = VisionMLP(a.hidden_size, a.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class VisionEncoder(nn.Module):
    """uint8 image [1, C, H, W] as ExecuTorch's runners send it (C 1..4, H and W 1..image_size;
    see runner_image.py) -> projected image tokens [1, N_img, D_text]."""

    mean: torch.Tensor  # buffers (register_buffer): typed here for the checker
    std: torch.Tensor

    def __init__(self, a: VisionArgs, text_dim: int, projector_bias: bool = True):
        super().__init__()
        self.args = a
        d = a.hidden_size
        self.register_buffer("mean", torch.empty(1, a.num_channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, a.num_channels, 1, 1), persistent=False)
        self.patch_embedding = nn.Conv2d(a.num_channels, d, a.patch_size, a.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Parameter(torch.zeros(a.num_patches + 1, d))
        self.pre_norm = nn.LayerNorm(d, eps=a.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(a) for _ in range(a.num_layers_used))
        self.projector = Projector(d, text_dim, projector_bias)
        if a.num_channels != 3:
            raise ValueError(f"vision_config.num_channels: only 3 (RGB) is supported, got {a.num_channels}")
        self.canvas = RunnerImage(a.image_size, pad_color(a.image_mean))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Refill the derived buffers (needed after `to_empty`)."""
        self.mean.copy_(torch.tensor(self.args.image_mean).view_as(self.mean))
        self.std.copy_(torch.tensor(self.args.image_std).view_as(self.std))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        a = self.args
        check_image(image, a.image_size)
        if image.dim() != 4:
            raise ValueError(f"image: expected uint8 [1, C, H, W], got {list(image.shape)}")
        x = (self.canvas(image).to(self.mean.dtype) / 255.0 - self.mean) / self.std
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [1, N, D]
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1) + self.position_embedding)
        for layer in self.layers:
            x = layer(x)
        if a.select_strategy == "default":
            x = x[:, 1:]
        return self.projector(x)


# ---------------------------------------------------------------------------------------------
# Text: Llama decoder with a static KV cache
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # statistics in fp32 like HF, whatever the model dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables [max_seq_len, head_dim] in HF Llama's half-split layout."""

    cos: torch.Tensor  # buffers (register_buffer): typed here for the checker
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        freqs = torch.arange(self.cos.shape[0], dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[pos], self.sin[pos]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D], cos/sin [S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class KVCache(nn.Module):
    """Static cache, buffers [1, max_seq_len, n_kv_heads, head_dim].

    [B, S, H, D] is the layout of `llama.update_cache`/`llama.custom_sdpa`, so the plain and
    custom-op pieces can be swapped over the same buffers. `forward(input_pos, k, v)` writes
    k/v [1, S, H_kv, D] at positions input_pos[0] .. +S-1 and returns the whole caches."""

    k_cache: torch.Tensor  # buffers (register_buffer): typed here for the checker
    v_cache: torch.Tensor

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        super().__init__()
        self.register_buffer("k_cache", k_cache)
        self.register_buffer("v_cache", v_cache)

    @classmethod
    def empty(cls, max_seq_len: int, n_kv_heads: int, head_dim: int) -> "KVCache":
        shape = (1, max_seq_len, n_kv_heads, head_dim)
        return cls(torch.zeros(shape), torch.zeros(shape))

    def reset_buffers(self) -> None:
        # Zeroed, not just masked: 0 * NaN from uninitialised memory would still poison SDPA.
        self.k_cache.zero_()
        self.v_cache.zero_()

    def forward(self, input_pos, k, v):
        # Tensor indices instead of input_pos.item(): no data-dependent int in the plain graph.
        idx = input_pos + torch.arange(k.shape[1], device=k.device)
        self.k_cache.index_copy_(1, idx, k)
        self.v_cache.index_copy_(1, idx, v)
        return self.k_cache, self.v_cache


class SDPA(nn.Module):
    """Causal attention of q [1, S, H, D] (positions input_pos[0] + i) over the whole static
    caches [1, L, H_kv, D]; returns [1, S, H, D]. Slots past the current position are masked."""

    def __init__(self, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_rep = n_heads // n_kv_heads

    def forward(self, input_pos, q, k_cache, v_cache):
        q_pos = input_pos + torch.arange(q.shape[1], device=q.device)
        mask = torch.arange(k_cache.shape[1], device=q.device)[None, :] <= q_pos[:, None]  # [S, L]
        k = k_cache.transpose(1, 2).repeat_interleave(self.n_rep, dim=1)  # GQA: head h reads kv h // n_rep
        v = v_cache.transpose(1, 2).repeat_interleave(self.n_rep, dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
        return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, a: TextArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.wq = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)
        self.kv_cache = KVCache.empty(a.max_seq_len, a.num_kv_heads, a.head_dim)
        self.sdpa = SDPA(a.num_heads, a.num_kv_heads)

    def forward(self, x, input_pos, cos, sin):
        b, s, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, s, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        k_all, v_all = self.kv_cache(input_pos, k, v)
        y = self.sdpa(input_pos, q, k_all, v_all)
        return self.wo(y.reshape(b, s, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate_proj
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, a: TextArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.feed_forward = FeedForward(a.hidden_size, a.intermediate_size)

    def forward(self, x, input_pos, cos, sin):
        h = x + self.attention(self.attention_norm(x), input_pos, cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class TextDecoder(nn.Module):
    """(embeds [1, S, D], input_pos int64 [1] = start position of this chunk) -> float32
    logits [1, V] of the chunk's last position. Requires input_pos[0] + S <= max_seq_len; each
    call appends to the KV cache, so a chunk sees every earlier chunk written at lower positions."""

    def __init__(self, a: TextArgs):
        super().__init__()
        self.rope = Rotary(a.head_dim, a.max_seq_len, a.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.output = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        h = embeds.to(self.norm.weight.dtype)
        cos, sin = self.rope(input_pos + torch.arange(h.shape[1], device=h.device))
        for layer in self.layers:
            h = layer(h, input_pos, cos, sin)
        # Only the last row: the runner reads nothing else, and lm_head over S rows is costly.
        return self.output(self.norm(h[:, -1, :])).float()


class LlavaModel(nn.Module):
    """Owns the three runner entry points as submodules (export each one separately)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision_encoder = VisionEncoder(args.vision, args.text.hidden_size, args.projector_bias)
        self.token_embedding = nn.Embedding(args.text.vocab_size, args.text.hidden_size)
        self.text_decoder = TextDecoder(args.text)

    def reset_buffers(self) -> None:
        """Recompute every non-learned buffer and zero the KV caches: the step that makes a
        model built on the meta device and `to_empty`-ed usable."""
        for m in self.modules():
            reset = getattr(m, "reset_buffers", None)
            if m is not self and callable(reset):
                reset()


def load_units(model: LlavaModel) -> list[str]:
    """The pieces a model is loaded (and quantized) in, one at a time: each decoder layer,
    the lm_head, the token embedding, and the rest. At 7B the largest is one layer's
    ~0.8 GB of fp32 weights (or the 0.5 GB embedding table)."""
    n = model.args.text.num_layers
    return [
        "vision_encoder",
        "token_embedding",
        *(f"text_decoder.layers.{i}" for i in range(n)),
        "text_decoder.norm",
        "text_decoder.output",
    ]
