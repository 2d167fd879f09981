"""Step 1 of the peer benchmark: the language model of an HF LLaVA checkpoint as a
LlamaForCausalLM folder (config.json, model.safetensors, tokenizer.model), tensors copied raw
in COPY_CHUNK pieces. Bad input raises PeersError naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llava_pipeline.base.errors import PipelineError
from llava_pipeline.model.checkpoint_files import safetensors_files, split_key

from . import PeersError

COPY_CHUNK = 64 << 20


def read_llava_config(ckpt: Path) -> dict:
    """config.json of an HF LLaVA checkpoint, checked: model_type llava, llama text model."""
    path = ckpt / "config.json"
    if not ckpt.is_dir():
        raise PeersError(f"{ckpt}: checkpoint folder not found")
    if not path.is_file():
        raise PeersError(f"{path}: missing from the checkpoint")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeersError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llava":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise PeersError(f"{path}: not a LLaVA config (model_type {got!r}, expected 'llava')")
    text = cfg.get("text_config") or {}
    if not isinstance(text, dict) or text.get("model_type", "llama") != "llama":
        raise PeersError(
            f"{path}: text_config is not a llama model "
            f"(model_type {text.get('model_type') if isinstance(text, dict) else text!r})"
        )
    return cfg


def resolved_text_config(ckpt: Path) -> dict:
    """text_config with transformers' defaults filled in (llava-hf configs omit many)."""
    from transformers import LlavaConfig, PreTrainedConfig

    try:
        cfg = LlavaConfig.from_pretrained(str(ckpt))
    except Exception as e:  # transformers raises many kinds
        raise PeersError(f"{ckpt / 'config.json'}: transformers cannot read it ({e})") from None
    # LlavaConfig always makes text_config a PreTrainedConfig (a LlamaConfig by default)
    assert isinstance(cfg.text_config, PreTrainedConfig), type(cfg.text_config)
    text = cfg.text_config.to_dict()
    top_dtype = cfg.to_dict().get("dtype") or cfg.to_dict().get("torch_dtype")
    if not text.get("dtype") and top_dtype:
        text["dtype"] = str(top_dtype).replace("torch.", "")
    text.pop("torch_dtype", None)
    text["architectures"] = ["LlamaForCausalLM"]
    text["model_type"] = "llama"
    return text


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint, as the pipeline lists them."""
    try:
        return safetensors_files(ckpt)
    except (FileNotFoundError, PipelineError) as e:
        raise PeersError(str(e)) from None


def text_key(name: str) -> str | None:
    """LlamaForCausalLM name of a LLaVA tensor; None for vision tower and projector.

    transformers v4 layout: language_model.model.* / language_model.lm_head.weight;
    v5 layout: model.language_model.* / lm_head.weight.
    """
    try:
        component, inner = split_key(name)
    except ValueError:
        return None
    return {"text": f"model.{inner}", "lm_head": f"lm_head.{inner}"}.get(component)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where the data starts)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < (256 << 20):
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PeersError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def plan_text_tensors(files: list[Path]) -> dict[str, tuple[Path, int, dict]]:
    """New name -> (source file, data start, header entry), for the text model only."""
    plan: dict[str, tuple[Path, int, dict]] = {}
    for path in files:
        header, start = read_safetensors_header(path)
        for name, entry in header.items():
            new = text_key(name)
            if new is None:
                continue
            if new in plan:
                raise PeersError(f"{path}: tensor {name} maps to {new}, which another tensor already gave")
            plan[new] = (path, start, entry)
    return dict(sorted(plan.items()))


def check_text_tensors(plan: dict, text_cfg: dict, where: Path) -> None:
    n_layers = text_cfg["num_hidden_layers"]
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    if not text_cfg.get("tie_word_embeddings"):
        need.append("lm_head.weight")
    for i in range(n_layers):
        need += [
            f"model.layers.{i}.{p}.weight"
            for p in (
                "input_layernorm",
                "post_attention_layernorm",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            )
        ]
    missing = [k for k in need if k not in plan]
    if missing:
        raise PeersError(f"{where}: the language model lacks {len(missing)} tensor(s), e.g. {missing[0]}")


def write_text_model(ckpt: Path, out: Path, text_cfg: dict | None = None) -> dict:
    """The LlamaForCausalLM folder (config.json, model.safetensors, tokenizer.model).

    Tensors are copied raw from the source files in COPY_CHUNK pieces. Returns the
    text config written."""
    read_llava_config(ckpt)
    tok = ckpt / "tokenizer.model"
    if not tok.is_file():
        raise PeersError(f"{tok}: missing from the checkpoint (the SentencePiece model is needed)")
    text_cfg = text_cfg or resolved_text_config(ckpt)
    plan = plan_text_tensors(weight_files(ckpt))
    check_text_tensors(plan, text_cfg, ckpt)

    header, offset = {}, 0
    for name, (_, _, entry) in plan.items():
        begin, end = entry["data_offsets"]
        header[name] = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "data_offsets": [offset, offset + end - begin],
        }
        offset += end - begin
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as dst:
        dst.write(len(blob).to_bytes(8, "little"))
        dst.write(blob)
        for name, (src_path, start, entry) in plan.items():
            begin, end = entry["data_offsets"]
            with open(src_path, "rb") as src:
                src.seek(start + begin)
                left = end - begin
                while left:
                    chunk = src.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise PeersError(f"{src_path}: truncated in tensor data")
                    dst.write(chunk)
                    left -= len(chunk)
    (out / "config.json").write_text(json.dumps(text_cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(tok, out / "tokenizer.model")
    return text_cfg
