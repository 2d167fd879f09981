"""Stage-boundary I/O for the model: what source_transform writes and later stages rebuild.

A transformed model is stored as its weights (`model.safetensors`, this
project's key names) plus `model_args.json` (the architecture, max_seq_len and
the source transforms to re-apply). Rebuilding happens on the meta device, so
no random-init copy of a large model is ever allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, QuantConfig
from .model import LlavaModel, ModelArgs
from .source_transforms import apply_source_transforms, check_custom_ops
from .stage import PipelineError, read_json

SOURCE_TRANSFORMS = ("custom_kv_cache", "custom_sdpa")
ARGS_FILE = "model_args.json"
WEIGHTS_FILE = "model.safetensors"
# Room a prompt needs besides the image: BOS, "USER: ", "\n", a short question,
# " ASSISTANT:" and at least one answer token.
MIN_TEXT_TOKENS = 16


def _is_state(key: str) -> bool:
    """KV caches are run-time state, not weights: never stored, zeroed on rebuild."""
    return key.endswith(("k_cache", "v_cache"))


def hf_model_args(ckpt: Path, max_seq_len: int) -> ModelArgs:
    """ModelArgs from a checkpoint's JSON files, with max_seq_len validated against it."""
    from .convert import read_hf_config

    try:
        args = read_hf_config(ckpt, max_seq_len)
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError too
        msg = str(e)
        if "max_position_embeddings" in msg:
            raise ConfigError(f"export.max_seq_len={max_seq_len}: above the model's limit ({msg})") from None
        raise PipelineError(f"{ckpt / 'config.json'}: {msg}") from None
    need = args.vision.num_image_tokens + MIN_TEXT_TOKENS
    if max_seq_len < need:
        raise ConfigError(
            f"export.max_seq_len={max_seq_len}: too small for {args.vision.num_image_tokens} image tokens "
            f"plus a prompt and an answer (need at least {need})"
        )
    return args


def transform_checkpoint(ckpt: Path, max_seq_len: int):
    """Load the HF checkpoint into this project's model and apply the source transforms."""
    from .convert import load_checkpoint

    args = hf_model_args(ckpt, max_seq_len)  # validates before touching weights
    try:
        model = load_checkpoint(ckpt, max_seq_len)
    except (OSError, ValueError, KeyError) as e:  # corrupt/truncated shard, missing tensor
        raise PipelineError(f"{ckpt}: checkpoint weights unusable: {e}") from None
    apply_source_transforms(model, SOURCE_TRANSFORMS)
    check_custom_ops(model, SOURCE_TRANSFORMS)
    return model, args


def write_args(args: ModelArgs, out: Path) -> None:
    data = {"model_args": args.to_dict(), "source_transforms": list(SOURCE_TRANSFORMS)}
    (out / ARGS_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_args(folder: Path) -> ModelArgs:
    return ModelArgs.from_dict(read_json(folder / ARGS_FILE)["model_args"])


def save_transformed(model: LlavaModel, args: ModelArgs, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if not _is_state(k)}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    write_args(args, out)


def empty_model(args: ModelArgs) -> LlavaModel:
    """The transformed architecture with no storage (fill with `fill_model`)."""
    with torch.device("meta"):
        model = LlavaModel(args)
    return apply_source_transforms(model, SOURCE_TRANSFORMS)


def fill_model(model: LlavaModel, state: dict) -> LlavaModel:
    """Assign weights, then materialize and reset run-time buffers (caches, rope, mean/std)."""
    result = model.load_state_dict(state, assign=True, strict=False)
    missing = [k for k in result.missing_keys if not _is_state(k)]
    if missing or result.unexpected_keys:
        raise PipelineError(
            f"weights do not match the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:  # run-time buffers are recomputed by reset_buffers below
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    model.reset_buffers()
    # Inference only; quantized (integer) weights must not require grad for export.
    model.requires_grad_(False)
    return model.eval()


def decoder_in_features(args: ModelArgs) -> dict[str, int]:
    """in_features of every text-decoder linear (lm_head included), without weights."""
    from .quantize import decoder_linears

    return {k: m.in_features for k, m in decoder_linears(empty_model(args)).items()}


def load_transformed(folder: Path) -> LlavaModel:
    from safetensors.torch import load_file

    args = load_args(folder)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:
        raise PipelineError(f"{folder / WEIGHTS_FILE}: unreadable ({e})") from None
    return fill_model(empty_model(args), state)


def load_quantized(folder: Path):
    """(model, args, quant config) from the quantize stage's folder."""
    from .quantize import prepare_quantized_structure

    args = load_args(folder)
    quant = QuantConfig(**read_json(folder / "manifest.json")["config"]["quant"])
    import torchao.quantization  # noqa: F401  registers its tensor subclasses as safe to load

    state = torch.load(folder / "model.pt", weights_only=True, mmap=True)
    model = prepare_quantized_structure(empty_model(args), quant)
    return fill_model(model, state), args, quant


def constant_methods(args: ModelArgs) -> dict:
    from .export import constant_methods as make

    return make(args, args.text.bos_token_id, list(args.text.eos_token_ids))
