"""The model's hyperparameters (`ModelArgs`: vision tower, text decoder, image token) and how
they are read from a Hugging Face LlavaConfig (`model_args_from_hf_config`), with a ValueError
naming the key for a value this model cannot take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@dataclass(frozen=True)
class VisionArgs:
    """CLIP vision tower and feature selection. `num_layers` is the checkpoint's depth; only
    `num_layers_used` of them are built (LLaVA-1.5 reads layer -2, so the last never runs)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2
    select_strategy: str = "default"  # "default": drop the CLS token; "full": keep it
    image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)

    def __post_init__(self):
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy: unsupported {self.select_strategy!r}")
        if not -self.num_layers - 1 <= self.feature_layer <= self.num_layers:
            raise ValueError(f"vision_feature_layer: {self.feature_layer} out of range")
        if self.image_size % self.patch_size:
            raise ValueError("vision_config.image_size: not a multiple of patch_size")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("image_mean/image_std: need one value per channel")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + (self.select_strategy == "full")

    @property
    def num_layers_used(self) -> int:
        # hidden_states[0] is the embedding output and hidden_states[i] the output of layer i.
        fl = self.feature_layer
        return fl if fl >= 0 else self.num_layers + 1 + fl


@dataclass(frozen=True)
class TextArgs:
    """Llama decoder plus its static KV cache of `max_seq_len` positions."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError("text_config.num_key_value_heads: must divide num_attention_heads")
        if self.max_seq_len < 1:
            raise ValueError("max_seq_len: must be positive")


@dataclass(frozen=True)
class ModelArgs:
    vision: VisionArgs
    text: TextArgs
    image_token_index: int = 32000
    projector_bias: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists once serialised; `from_dict` accepts either)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        def build(klass, sub):
            return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()})

        rest = {k: v for k, v in d.items() if k not in ("vision", "text")}
        return cls(vision=build(VisionArgs, d["vision"]), text=build(TextArgs, d["text"]), **rest)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _integer(key: str, value: object, expected: str = "an integer") -> int:
    """`value` if it is an int (not a bool), else ValueError naming `key`: transformers lets
    null and [h, w] pairs through for some fields this model reads as one integer."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected {expected}, got {value!r}")
    return value


def model_args_from_hf_config(
    cfg: dict,
    max_seq_len: int,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> ModelArgs:
    """Read a LLaVA `config.json` dict. Keys the file omits take transformers' defaults (the
    7B config relies on `LlamaConfig`/`CLIPVisionConfig` defaults). Raises ValueError naming
    the key for anything this model does not implement. `image_mean`/`image_std` come from
    `preprocessor_config.json`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig  # heavy; only config parsing needs it

    if cfg.get("model_type") != "llava":
        raise ValueError(f"model_type: expected 'llava', got {cfg.get('model_type')!r}")
    for key in ("vision_config", "text_config"):
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"{key}: missing from config")
    text_type = cfg["text_config"].get("model_type", "llama")
    if text_type != "llama":
        raise ValueError(f"text_config.model_type: only 'llama' is supported, got {text_type!r}")
    vision_type = cfg["vision_config"].get("model_type", "clip_vision_model")
    if vision_type != "clip_vision_model":
        raise ValueError(f"vision_config.model_type: only 'clip_vision_model', got {vision_type!r}")
    if not isinstance(cfg.get("vision_feature_layer", -2), int):
        raise ValueError("vision_feature_layer: a list of feature layers is not supported")
    if cfg["text_config"].get("rope_scaling") is not None:
        raise ValueError("text_config.rope_scaling: rope scaling is not supported")

    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy: unsupported {strategy!r}")
    try:
        hf = LlavaConfig.from_dict(cfg)  # fills in every default transformers would use
    except Exception as e:  # transformers' strict validation errors name the field
        raise ValueError(f"config.json rejected by transformers: {e}") from e
    v, t = hf.vision_config, hf.text_config
    # model_type was checked above, so transformers built these two classes from the dicts.
    assert isinstance(v, CLIPVisionConfig) and isinstance(t, LlamaConfig), (type(v), type(t))
    rope = t.rope_parameters or {}
    checks = {
        "text_config.rope_parameters.rope_type": (rope.get("rope_type", "default"), "default"),
        "text_config.hidden_act": (t.hidden_act, "silu"),
        "text_config.attention_bias": (t.attention_bias, False),
        "text_config.mlp_bias": (t.mlp_bias, False),
        "vision_config.hidden_act": (v.hidden_act, "quick_gelu"),
        "projector_hidden_act": (hf.projector_hidden_act, "gelu"),
        "tie_word_embeddings": (bool(hf.tie_word_embeddings), False),
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"{key}: only {want!r} is supported, got {got!r}")
    if max_seq_len > t.max_position_embeddings:
        raise ValueError(
            f"text_config.max_position_embeddings: {t.max_position_embeddings} < max_seq_len {max_seq_len}"
        )
    rope_theta = rope.get("rope_theta", 10000.0)
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)):
        raise ValueError(f"text_config.rope_theta: expected a number, got {rope_theta!r}")
    square = "one integer (square images only)"
    vision = VisionArgs(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads,
        image_size=_integer("vision_config.image_size", v.image_size, square),
        patch_size=_integer("vision_config.patch_size", v.patch_size, square),
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        feature_layer=_integer("vision_feature_layer", hf.vision_feature_layer),
        select_strategy=hf.vision_feature_select_strategy,
        image_mean=tuple(float(x) for x in image_mean),
        image_std=tuple(float(x) for x in image_std),
    )
    text = TextArgs(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads,
        num_kv_heads=_integer("text_config.num_key_value_heads", t.num_key_value_heads),
        head_dim=_integer("text_config.head_dim", t.head_dim),
        max_seq_len=max_seq_len,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=float(rope_theta),
        bos_token_id=_integer("text_config.bos_token_id", t.bos_token_id),
        eos_token_ids=_eos_ids(t.eos_token_id),
    )
    image_token = _integer("image_token_index (image_token_id)", hf.image_token_index)
    return ModelArgs(vision, text, image_token, bool(hf.multimodal_projector_bias))
