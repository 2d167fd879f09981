"""Stage-boundary I/O for the model: what source_transform writes and later stages rebuild.

A transformed model is stored as `weights.json` (each of this project's weight names -> the
checkpoint file, named relative to the folder, and the key in it: source_transform only renames,
so no weight is copied) plus `model_args.json` (the architecture, max_seq_len and the source
transforms to re-apply). Rebuilding happens on the meta device, so no random-init copy of a
large model is ever allocated.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from llava_pipeline.base.config import ConfigError, QuantConfig
from llava_pipeline.base.errors import PipelineError
from llava_pipeline.base.files import read_json, write_json
from llava_pipeline.export import export
from llava_pipeline.export.quantize import decoder_linears, prepare_quantized_structure
from llava_pipeline.model.checkpoint_files import safetensors_files
from llava_pipeline.model.convert import read_hf_config, renamed, tensor_refs
from llava_pipeline.model.model import LlavaModel, load_units
from llava_pipeline.model.model_args import ModelArgs
from llava_pipeline.model.source_transforms import apply_source_transforms, check_custom_ops

SOURCE_TRANSFORMS = ("custom_kv_cache", "custom_sdpa")  # export.kv_cache=fp32
KV_CACHE_TRANSFORMS = {"fp32": SOURCE_TRANSFORMS, "int8": (*SOURCE_TRANSFORMS, "quantized_kv_cache")}
ARGS_FILE = "model_args.json"
WEIGHTS_MAP = "weights.json"
QUANTIZED_FILE = "model.pt"
INT4_FILE = "int4.pt"  # the int4 weights' values, two per byte (save_quantized)
# Room a prompt needs besides the image: BOS, "USER: ", "\n", a short question,
# " ASSISTANT:" and at least one answer token.
MIN_TEXT_TOKENS = 16


def _is_state(key: str) -> bool:
    """KV caches are run-time state, not weights: never stored, zeroed on rebuild."""
    return key.endswith(("k_cache", "v_cache", "_cache_scales", "_cache_zero_points"))


def hf_model_args(ckpt: Path, max_seq_len: int) -> ModelArgs:
    """ModelArgs from a checkpoint's JSON files, with max_seq_len validated against it."""
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


def write_transformed(
    ckpt: Path, max_seq_len: int, out: Path, transforms: tuple[str, ...] = SOURCE_TRANSFORMS
) -> ModelArgs:
    """The source_transform stage: the checkpoint's weights under this project's names.

    The transforms swap modules, not weights, so they are applied to a meta-device model
    (checked there), and each checkpoint tensor the model uses is recorded as (file, key),
    shape-checked against that model from the safetensors headers alone: no weight is read or
    written (at 7B, 14 GB). Files are named relative to `out`, so the folder works wherever the
    checkpoint folder sits beside it as it did here (outputs/download beside
    outputs/source_transform, in any copy of outputs/). Later stages read the checkpoint's
    own dtype and upcast what they keep."""
    args = hf_model_args(ckpt, max_seq_len)  # validates before touching weights
    model = empty_model(args, transforms)
    check_custom_ops(model, transforms)
    shapes = {k: v.shape for k, v in model.state_dict().items() if not _is_state(k)}
    try:
        refs = {
            ours: {"file": Path(os.path.relpath(ref.path, out)).as_posix(), "key": ref.key}
            for ours, ref in renamed(args, tensor_refs(safetensors_files(ckpt)), shapes)
        }
    except (OSError, ValueError, KeyError) as e:  # corrupt/truncated shard, missing tensor
        raise PipelineError(f"{ckpt}: checkpoint weights unusable: {e}") from None
    write_json(out / WEIGHTS_MAP, {"weights": refs})
    write_args(args, out, transforms)
    return args


def write_args(args: ModelArgs, out: Path, transforms: tuple[str, ...] = SOURCE_TRANSFORMS) -> None:
    data = {"model_args": args.to_dict(), "source_transforms": list(transforms)}
    (out / ARGS_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_args(folder: Path) -> ModelArgs:
    return ModelArgs.from_dict(read_json(folder / ARGS_FILE)["model_args"])


def load_transforms(folder: Path) -> tuple[str, ...]:
    """The source transforms a stage folder's model was built with."""
    return tuple(read_json(folder / ARGS_FILE).get("source_transforms", SOURCE_TRANSFORMS))


def empty_model(args: ModelArgs, transforms: tuple[str, ...] = SOURCE_TRANSFORMS) -> LlavaModel:
    """The transformed architecture with no storage (fill with `fill_model`)."""
    with torch.device("meta"):
        model = LlavaModel(args)
        apply_source_transforms(model, transforms)  # in place
    return model


def _finish(model: LlavaModel) -> LlavaModel:
    """Materialize and reset run-time buffers (caches, rope, mean/std); check no weight is
    left on the meta device."""
    meta = [k for k, p in model.named_parameters() if p.is_meta]
    if meta:
        raise PipelineError(f"weights do not match the model: missing {meta[:3]}")
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:  # run-time buffers are recomputed by reset_buffers below
                module._buffers[name] = torch.empty_like(buf, device="cpu")
    model.reset_buffers()
    # Inference only; quantized (integer) weights must not require grad for export.
    model.requires_grad_(False)
    return model.eval()


def fill_model(model: LlavaModel, state: dict) -> LlavaModel:
    """Assign weights, then materialize and reset run-time buffers."""
    result = model.load_state_dict(state, assign=True, strict=False)
    missing = [k for k in result.missing_keys if not _is_state(k)]
    if missing or result.unexpected_keys:
        raise PipelineError(
            f"weights do not match the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return _finish(model)


def decoder_in_features(args: ModelArgs) -> dict[str, int]:
    """in_features of every text-decoder linear (lm_head included), without weights."""
    return {k: m.in_features for k, m in decoder_linears(empty_model(args)).items()}


def weight_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Our key -> (the safetensors file holding it, its key in that file), from the
    folder's weights.json."""
    refs = read_json(folder / WEIGHTS_MAP)["weights"]
    return {ours: (folder / ref["file"], ref["key"]) for ours, ref in refs.items()}


def load_transformed(folder: Path, on_unit=None, dtype: torch.dtype = torch.float32) -> LlavaModel:
    """Rebuild the transformed model from source_transform's folder, one unit at a time
    (`load_units`), each upcast to `dtype` and then handed to `on_unit(name, model)`,
    which may replace it in place (the quantize stage quantizes it there), before the
    next unit is read. Peak memory: the finished units plus one unit in `dtype`."""
    args = load_args(folder)
    model = empty_model(args, load_transforms(folder))
    files = weight_files(folder)
    try:
        for unit in load_units(model):
            module = model.get_submodule(unit)
            by_file: dict[Path, list[tuple[str, str]]] = {}
            for key in (k for k in files if k.startswith(unit + ".")):
                path, stored = files[key]
                by_file.setdefault(path, []).append((stored, key[len(unit) + 1 :]))
            state = {}
            # Opened per unit and closed at once: a mapping left open keeps every page read
            # through it resident (at 7B, 14 GB of bf16 shards on top of the model).
            for path, keys in by_file.items():
                if not path.is_file():
                    raise PipelineError(f"{path}: missing (source_transform's {WEIGHTS_MAP} names it)")
                with safe_open(str(path), framework="pt") as f:
                    for stored, name in keys:
                        state[name] = f.get_tensor(stored).to(dtype)
            result = module.load_state_dict(state, assign=True, strict=False)
            missing = [k for k in result.missing_keys if not _is_state(k)]
            if missing or result.unexpected_keys:
                raise PipelineError(
                    f"{folder}: weights of {unit} do not match the model: "
                    f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
                )
            del state
            if on_unit is not None:
                on_unit(unit, model)
    except PipelineError:
        raise
    except Exception as e:  # truncated/corrupt shard
        raise PipelineError(f"{folder}: weights unreadable ({e})") from None
    return _finish(model)


_INT4 = getattr(torch, "int4")  # a dtype torch's type stubs lack


def _fits_int4(q: torch.Tensor) -> bool:
    if not q.numel():
        return True
    low, high = torch.aminmax(q)  # one pass
    return -8 <= int(low) and int(high) <= 7


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte (low nibble first)."""
    u = (q.reshape(-1) + 8).view(torch.uint8)  # in int8: [-8, 7] + 8 cannot overflow
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def _unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    both = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)[: math.prod(shape)]
    return (both.to(torch.int8) - 8).reshape(shape)


def save_quantized(state: dict, out: Path) -> None:
    """The quantize stage's files. torchao keeps int4 weight values one per int8 byte; here each
    such weight's values go packed two per byte into int4.pt, with its shape and attributes,
    and its scale and zero point stay in model.pt with everything else (at 7B the decoder's
    values take 3.2 GB instead of 6.5). Consumes `state`: each entry leaves it as it is stored, so
    that with no model holding them too, a weight's unpacked values are freed once packed and
    the packed copies never add to the peak."""
    from torchao.quantization import IntxUnpackedToInt8Tensor  # heavy: only the stages that quantize

    plain, values, layout = {}, {}, {}
    for key in list(state):
        value = state.pop(key)
        if isinstance(value, IntxUnpackedToInt8Tensor) and value.target_dtype == _INT4:
            names, attrs = value.__tensor_flatten__()
            q = value.qdata
            if not _fits_int4(q):
                raise PipelineError(f"{key}: int4 weight values outside [-8, 7]")
            values[key] = _pack_int4(q)
            others = [name for name in names if name != "qdata"]  # scale, zero point
            plain.update({f"{key}|{name}": getattr(value, name) for name in others})
            layout[key] = {"shape": list(q.shape), "tensors": others, "attributes": dict(attrs)}
        else:
            plain[key] = value
    torch.save(plain, out / QUANTIZED_FILE)
    torch.save({"values": values, "layout": layout}, out / INT4_FILE)


def read_quantized_state(folder: Path) -> dict:
    """save_quantized's state dict back. model.pt is memory-mapped; int4.pt is read whole (half
    the unpacked size), not mapped, and each weight's packed values are freed once unpacked."""
    from torchao.quantization import IntxUnpackedToInt8Tensor  # registers its subclasses as safe to load

    state = torch.load(folder / QUANTIZED_FILE, weights_only=True, mmap=True)
    int4 = torch.load(folder / INT4_FILE, weights_only=True)
    values = int4["values"]
    for key, layout in int4["layout"].items():
        data = {"qdata": _unpack_int4(values.pop(key), layout["shape"])}
        data.update({name: state.pop(f"{key}|{name}") for name in layout["tensors"]})
        state[key] = IntxUnpackedToInt8Tensor.__tensor_unflatten__(
            data, layout["attributes"], torch.Size(layout["shape"]), None
        )
    return state


def load_quantized(folder: Path):
    """(model, args, quant config) from the quantize stage's folder."""
    args = load_args(folder)
    quant = QuantConfig(**read_json(folder / "manifest.json")["config"]["quant"])
    state = read_quantized_state(folder)
    model = prepare_quantized_structure(empty_model(args, load_transforms(folder)), quant)
    return fill_model(model, state), args, quant


def constant_methods(args: ModelArgs) -> dict:
    return export.constant_methods(args, args.text.bos_token_id, list(args.text.eos_token_ids))
