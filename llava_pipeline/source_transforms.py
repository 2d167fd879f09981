"""Source transforms: swap the plain-PyTorch pieces of `model.py` for ExecuTorch custom ops.

Each transform is `replace_<old>_with_<new>(model) -> model`, mutates in place and is applied
by name from a list (`apply_source_transforms`). The untransformed model stays the plain,
debuggable reference; both versions compute the same numbers (tests/test_model_parity.py).

- "custom_kv_cache": `KVCache` -> `CustomKVCache` (`torch.ops.llama.update_cache`)
- "custom_sdpa":     `SDPA`    -> `CustomSDPA`    (`torch.ops.llama.custom_sdpa`, GQA-aware)

Both ops take the start position as an int, read from the `input_pos` tensor with `.item()`.
For `torch.export` that int is an unbacked symbol; `_start_pos` bounds it with
`torch._check(0 <= start_pos < max_seq_len)`, and update_cache's own meta function adds
`start_pos + S <= max_seq_len`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from llava_pipeline.model import SDPA, KVCache


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


def _replace(model: nn.Module, old: type, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
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


# name -> (transform, plain class it removes, class it installs, op the exported graph must hold)
SOURCE_TRANSFORMS: dict[str, tuple[Callable[[nn.Module], nn.Module], type, type, str]] = {
    "custom_kv_cache": (replace_kv_cache_with_custom_kv_cache, KVCache, CustomKVCache, "llama.update_cache"),
    "custom_sdpa": (replace_sdpa_with_custom_sdpa, SDPA, CustomSDPA, "llama.custom_sdpa"),
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
    """Post-condition of the named transforms (default: all). For an `nn.Module`: no plain
    piece is left and at least one custom piece is present. For an `ExportedProgram` or
    `GraphModule`: the graph calls each transform's op. Raises RuntimeError otherwise."""
    names = list(SOURCE_TRANSFORMS) if names is None else list(names)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.graph_module
    if isinstance(model, torch.fx.GraphModule):
        ops = _graph_op_names(model.graph)
        for name in names:
            op = SOURCE_TRANSFORMS[name][3]
            if not any(op in o for o in ops):
                raise RuntimeError(f"source transform {name!r}: graph has no {op} call")
        return
    for name in names:
        _, old, new, _ = SOURCE_TRANSFORMS[name]
        left = [path for path, m in model.named_modules() if type(m) is old]
        if left:
            raise RuntimeError(f"source transform {name!r} missing: {left[0]} is still {old.__name__}")
        if not any(type(m) is new for m in model.modules()):
            raise RuntimeError(f"source transform {name!r} missing: no {new.__name__} in the model")
