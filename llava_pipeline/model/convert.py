"""Hugging Face LLaVA checkpoint -> `LlavaModel` weights.

The key map is data: HF names differ only by a per-component prefix between checkpoint
generations, so a key is first reduced to (component, name inside the component) and then
looked up in one table per component.

Prefixes seen in the wild (transformers' own `conversion_mapping.py` renames the first set to
the second when loading, and `save_pretrained` writes the first set back):
  transformers 4 / hub safetensors (llava-hf/llava-1.5-7b-hf):
      language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
      multi_modal_projector.*  (transformers 5.2x writes vision_tower.* without vision_model)
  transformers 5 module names:
      model.language_model.*, lm_head.*, model.vision_tower[.vision_model].*,
      model.multi_modal_projector.*
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Protocol, TypeVar

import torch
from safetensors import safe_open

from llava_pipeline.model.checkpoint_files import split_key
from llava_pipeline.model.model_args import ModelArgs, model_args_from_hf_config

# Component -> the prefix used when naming a missing key (the hub checkpoint's spelling).
_HUB_PREFIX = {
    "text": "language_model.model.",
    "lm_head": "language_model.lm_head.",
    "vision": "vision_tower.vision_model.",
    "projector": "multi_modal_projector.",
}

_TEXT = {"embed_tokens.weight": "token_embedding.weight", "norm.weight": "text_decoder.norm.weight"}
_TEXT_LAYER = {  # text_decoder.layers.{i}.<ours>  <-  layers.{i}.<hf>
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_LM_HEAD = {"weight": "text_decoder.output.weight"}
_VISION = {
    "embeddings.patch_embedding.weight": "vision_encoder.patch_embedding.weight",
    "embeddings.class_embedding": "vision_encoder.class_embedding",
    "embeddings.position_embedding.weight": "vision_encoder.position_embedding",
    "pre_layrnorm.weight": "vision_encoder.pre_norm.weight",  # sic: CLIP's spelling
    "pre_layrnorm.bias": "vision_encoder.pre_norm.bias",
}
_VISION_LAYER = [  # same names on both sides: vision_encoder.layers.{i}.<n> <- encoder.layers.{i}.<n>
    f"{m}.{p}"
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for p in ("weight", "bias")
]
_PROJECTOR = [f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]

# Present in checkpoints, unused on purpose (component, regex on the name inside it).
_DROPPED = [
    ("vision", r"post_layernorm\.(weight|bias)"),  # feeds only CLIP's pooled output
    ("vision", r"embeddings\.position_ids"),  # index buffer some checkpoints carry
    ("text", r"(layers\.\d+\.self_attn\.)?rotary_emb\.(original_)?inv_freq"),  # derived buffers
]
_VISION_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.")


def _key_table(args: ModelArgs) -> dict[tuple[str, str], str]:
    """(component, HF name inside it) -> our state-dict key, for every parameter we need."""
    t: dict[tuple[str, str], str] = {("text", k): v for k, v in _TEXT.items()}
    t.update({("lm_head", k): v for k, v in _LM_HEAD.items()})
    t.update({("vision", k): v for k, v in _VISION.items()})
    for i in range(args.text.num_layers):
        t.update({("text", f"layers.{i}.{k}"): f"text_decoder.layers.{i}.{v}" for k, v in _TEXT_LAYER.items()})
    for i in range(args.vision.num_layers_used):
        t.update({("vision", f"encoder.layers.{i}.{k}"): f"vision_encoder.layers.{i}.{k}" for k in _VISION_LAYER})
    projector = _PROJECTOR if args.projector_bias else [k for k in _PROJECTOR if k.endswith("weight")]
    t.update({("projector", k): f"vision_encoder.projector.{k}" for k in projector})
    return t


class KeyMapper:
    """Maps HF keys to ours for one `ModelArgs`, and remembers which targets it has produced."""

    def __init__(self, args: ModelArgs):
        self.args = args
        self.table = _key_table(args)
        self.seen: set[str] = set()

    def __call__(self, hf_key: str) -> str | None:
        """Our key, or None for a key dropped on purpose. Raises ValueError for unknown keys."""
        comp, name = split_key(hf_key)
        ours = self.table.get((comp, name))
        if ours is not None:
            if ours in self.seen:
                raise ValueError(f"checkpoint key {hf_key!r}: {ours} given twice")
            self.seen.add(ours)
            return ours
        if any(c == comp and re.fullmatch(rx, name) for c, rx in _DROPPED):
            return None
        m = _VISION_LAYER_RE.match(name)
        if comp == "vision" and m and self.args.vision.num_layers_used <= int(m[1]) < self.args.vision.num_layers:
            return None  # vision layers past the feature layer never run
        raise ValueError(f"unexpected checkpoint key {hf_key!r}")

    def check_complete(self) -> None:
        missing = [(c, n) for (c, n), ours in self.table.items() if ours not in self.seen]
        if missing:
            c, n = missing[0]
            raise KeyError(f"checkpoint lacks {_HUB_PREFIX[c]}{n} (and {len(missing) - 1} more)")


class TensorRef(NamedTuple):
    """Where a checkpoint tensor is (file, key in it) and its shape, read from the header."""

    path: Path
    key: str
    shape: torch.Size


def tensor_refs(files: Iterable[Path]) -> Iterator[tuple[str, TensorRef]]:
    """(key, TensorRef) for every tensor of the safetensors `files`, from their headers alone:
    no tensor data is read. A truncated or corrupt file fails here, named (the header records
    every tensor's extent, and safetensors checks the file covers them)."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                refs = [(key, TensorRef(path, key, torch.Size(f.get_slice(key).get_shape()))) for key in f.keys()]
        except Exception as e:  # SafetensorError does not say which file
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from e
        yield from refs


def read_hf_config(ckpt_dir: Path, max_seq_len: int) -> ModelArgs:
    """`ModelArgs` from config.json, with mean/std from preprocessor_config.json if present."""
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    pre_path = ckpt_dir / "preprocessor_config.json"
    extra = {}
    if pre_path.exists():
        pre = json.loads(pre_path.read_text())
        extra = {k: pre[k] for k in ("image_mean", "image_std") if k in pre}
    return model_args_from_hf_config(cfg, max_seq_len, **extra)


class _Shaped(Protocol):
    @property
    def shape(self) -> torch.Size: ...


Shaped = TypeVar("Shaped", bound=_Shaped)


def renamed(
    args: ModelArgs, tensors: Iterable[tuple[str, Shaped]], shapes: Mapping[str, torch.Size]
) -> Iterator[tuple[str, Shaped]]:
    """(our key, tensor) for each (HF key, tensor) the model uses, shape-checked against
    `shapes`; after the last one, raises KeyError naming a missing key. A tensor is anything
    with a `shape`: a `torch.Tensor`, or a `TensorRef` when only the place is wanted."""
    mapper = KeyMapper(args)
    for hf_key, tensor in tensors:
        ours = mapper(hf_key)
        if ours is None:
            continue
        if tensor.shape != shapes[ours]:
            raise ValueError(
                f"checkpoint key {hf_key!r}: shape {list(tensor.shape)}, expected {list(shapes[ours])} for {ours}"
            )
        yield ours, tensor
    mapper.check_complete()
