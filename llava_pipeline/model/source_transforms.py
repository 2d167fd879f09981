"""Source transforms: swap the plain-PyTorch pieces of `model.py` for ExecuTorch custom ops.

Each transform is `replace_<old>_with_<new>(model) -> model`, mutates in place and is applied
by name from a list (`apply_source_transforms`). The untransformed model stays the plain,
debuggable reference; both versions compute the same numbers (tests/test_model_parity.py).

- "custom_kv_cache": `KVCache` -> `CustomKVCache` (`torch.ops.llama.update_cache`)
- "custom_sdpa":     `SDPA`    -> `CustomSDPA`    (`torch.ops.llama.custom_sdpa`, GQA-aware)
- "quantized_kv_cache": `CustomKVCache`/`CustomSDPA` -> int8 caches with per-token scales and
  `torch.ops.llama.custom_quantized_sdpa` (export.kv_cache=int8)

Both ops take the start position as an int, read from the `input_pos` tensor with `.item()`.
For `torch.export` that int is an unbacked symbol; `_start_pos` bounds it with
`torch._check(0 <= start_pos < max_seq_len)`, and update_cache's own meta function adds
`start_pos + S <= max_seq_len`.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

from llava_pipeline.model.model import SDPA, KVCache


def load_custom_ops() -> None:
    """Register `torch.ops.llama.*` (the AOT library shipped in the executorch wheel)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


def _start_pos(input_pos: torch.Tensor, max_seq_len: int):
    start_pos = input_pos[0].item()
    torch._check(start_pos >= 0)
    torch._check(start_pos < max_seq_len)
    return start_pos


class CustomKVCache(KVCache):
    """Same buffers and contract as `KVCache`, written with `llama.update_cache`."""

    def forward(self, input_pos, k, v):
        start_pos = _start_pos(input_pos, self.k_cache.shape[1])
        torch.ops.llama.update_cache(k, self.k_cache, start_pos)  # mutates the cache in place
        torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        return self.k_cache, self.v_cache


class CustomSDPA(nn.Module):
    """Same contract as `SDPA`: `llama.custom_sdpa` reads the [B, S, H, D] caches directly,
    attends causally up to start_pos + i and handles n_heads > n_kv_heads itself."""

    def forward(self, input_pos, q, k_cache, v_cache):
        start_pos = _start_pos(input_pos, k_cache.shape[1])
        # (query, key, value, start_pos, attn_mask, dropout_p, is_causal)
        return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start_pos, None, 0, True)


class QuantizedKVCache(nn.Module):
    """int8 K/V caches with a float scale and an int8 zero point per (position, head),
    written with `llama.update_cache`; ExecuTorch's quantized-cache layout. Returns
    (cache, scales, zero_points) for K and for V, which `QuantizedSDPA` reads directly.
    A quarter of the fp32 cache's bytes, so a quarter of the cache reads per decode step."""

    k_cache: torch.Tensor  # the first of six buffers (register_buffer), typed for the checker

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, device=None):
        super().__init__()
        shape, qshape = (1, max_seq_len, n_kv_heads, head_dim), (1, max_seq_len, n_kv_heads, 1)
        for name in ("k", "v"):
            self.register_buffer(f"{name}_cache", torch.zeros(shape, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_cache_scales", torch.ones(qshape, device=device))
            self.register_buffer(f"{name}_cache_zero_points", torch.zeros(qshape, dtype=torch.int8, device=device))

    def reset_buffers(self) -> None:
        for name in ("k", "v"):
            getattr(self, f"{name}_cache").zero_()
            getattr(self, f"{name}_cache_scales").fill_(1.0)
            getattr(self, f"{name}_cache_zero_points").zero_()

    def forward(self, input_pos, k, v):
        start_pos = _start_pos(input_pos, self.k_cache.shape[1])
        out = []
        for name, x in (("k", k), ("v", v)):
            q, scale, zero = _quantize_per_token(x)
            cache = getattr(self, f"{name}_cache")
            scales = getattr(self, f"{name}_cache_scales")
            zeros = getattr(self, f"{name}_cache_zero_points")
            torch.ops.llama.update_cache(q, cache, start_pos)
            torch.ops.llama.update_cache(scale, scales, start_pos)
            torch.ops.llama.update_cache(zero, zeros, start_pos)
            out.append((cache, scales, zeros))
        return out[0], out[1]


def _quantize_per_token(x: torch.Tensor):
    """int8 asymmetric over the last dim: (int8 values, fp32 scales, int8 zero points)."""
    scale, zero = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    q = torch.ops.quantized_decomposed.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
    return q, scale.to(torch.float32), zero.to(torch.int8)


class QuantizedSDPA(nn.Module):
    """`CustomSDPA` over a `QuantizedKVCache`: `llama.custom_quantized_sdpa` with the query
    quantized per token too (int8 dot products, fp32 accumulation and softmax)."""

    def forward(self, input_pos, q, k, v):
        (k_q, k_scale, k_zero), (v_q, v_scale, v_zero) = k, v
        start_pos = _start_pos(input_pos, k_q.shape[1])
        q_q, q_scale, q_zero = _quantize_per_token(q)
        return torch.ops.llama.custom_quantized_sdpa(
            q_q,
            k_q,
            v_q,
            start_pos,
            None,
            0,
            True,
            None,
            q_zero,
            q_scale,
            k_zero,
            k_scale,
            v_zero,
            v_scale,
            False,
        )


_Old = TypeVar("_Old", bound=nn.Module)


def _replace(model: nn.Module, old: type[_Old], make: Callable[[_Old], nn.Module]) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old:  # exact type: CustomKVCache subclasses KVCache
                setattr(parent, name, make(child))
    return model


def replace_kv_cache_with_custom_kv_cache(model: nn.Module) -> nn.Module:
    load_custom_ops()
    # The new module adopts the old buffers: no copy, cache contents carry over.
    return _replace(model, KVCache, lambda c: CustomKVCache(c.k_cache, c.v_cache))


def replace_sdpa_with_custom_sdpa(model: nn.Module) -> nn.Module:
    load_custom_ops()
    return _replace(model, SDPA, lambda _: CustomSDPA())


def replace_kv_cache_with_quantized_kv_cache(model: nn.Module) -> nn.Module:
    """After custom_kv_cache and custom_sdpa: int8 caches and the quantized SDPA."""
    load_custom_ops()
    import torch.ao.quantization.fx._decomposed  # noqa: F401  quantized_decomposed per-token ops

    _replace(model, CustomKVCache, _quantized_kv_cache)
    return _replace(model, CustomSDPA, lambda _: QuantizedSDPA())


def _quantized_kv_cache(cache: CustomKVCache) -> QuantizedKVCache:
    _, max_seq_len, n_kv_heads, head_dim = cache.k_cache.shape
    return QuantizedKVCache(max_seq_len, n_kv_heads, head_dim, device=cache.k_cache.device)


# name -> (transform, plain class it removes, class it installs, op the exported graph must hold)
SOURCE_TRANSFORMS: dict[str, tuple[Callable[[nn.Module], nn.Module], type, type, str]] = {
    "custom_kv_cache": (replace_kv_cache_with_custom_kv_cache, KVCache, CustomKVCache, "llama.update_cache"),
    "custom_sdpa": (replace_sdpa_with_custom_sdpa, SDPA, CustomSDPA, "llama.custom_sdpa"),
    "quantized_kv_cache": (
        replace_kv_cache_with_quantized_kv_cache,
        CustomKVCache,
        QuantizedKVCache,
        "llama.custom_quantized_sdpa",
    ),
}


def apply_source_transforms(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Apply the named transforms in order; unknown names raise ValueError before any runs."""
    unknown = [n for n in names if n not in SOURCE_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown source transform(s) {unknown}; known: {sorted(SOURCE_TRANSFORMS)}")
    for name in names:
        model = SOURCE_TRANSFORMS[name][0](model)
    return model


def _graph_op_names(graph: torch.fx.Graph) -> set[str]:
    names = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        names.add(str(node.target))
        # Mutating custom ops may appear wrapped by functionalization.
        if "auto_functionalized" in str(node.target) and node.args:
            names.add(str(node.args[0]))
    return names


def check_custom_ops(model, names: Sequence[str] | None = None) -> None:
    """Post-condition of the named transforms (default: custom_kv_cache and custom_sdpa, the
    fp32-cache set; name quantized_kv_cache to check the int8 one). For an `nn.Module`: no plain
    piece is left and at least one custom piece is present. For an `ExportedProgram` or
    `GraphModule`: the graph calls each transform's op. Raises RuntimeError otherwise."""
    names = ["custom_kv_cache", "custom_sdpa"] if names is None else list(names)
    quantized = "quantized_kv_cache" in names  # it replaces the custom cache and SDPA again
    if isinstance(model, torch.export.ExportedProgram):
        model = model.graph_module
    if isinstance(model, torch.fx.GraphModule):
        if quantized:  # update_cache still writes the int8 caches; the SDPA is the quantized one
            names = ["custom_kv_cache", "quantized_kv_cache"]
        ops = _graph_op_names(model.graph)
        for name in names:
            op = SOURCE_TRANSFORMS[name][3]
            if not any(op in o for o in ops):
                raise RuntimeError(f"source transform {name!r}: graph has no {op} call")
        return
    if quantized:
        plain = [path for path, m in model.named_modules() if type(m) in (KVCache, SDPA, CustomSDPA)]
        if plain:
            raise RuntimeError(f"source transform 'quantized_kv_cache' missing: {plain[0]} is not quantized")
        names = ["quantized_kv_cache"]
    for name in names:
        _, old, new, _ = SOURCE_TRANSFORMS[name]
        left = [path for path, m in model.named_modules() if type(m) is old]
        if left:
            raise RuntimeError(f"source transform {name!r} missing: {left[0]} is still {old.__name__}")
        if not any(type(m) is new for m in model.modules()):
            raise RuntimeError(f"source transform {name!r} missing: no {new.__name__} in the model")
