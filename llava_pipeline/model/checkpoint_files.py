"""The files of an HF-format LLaVA checkpoint folder: its JSON side, its safetensors weight files
(listed, and written in shards)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from llava_pipeline.base import files
from llava_pipeline.base.errors import PipelineError

if TYPE_CHECKING:  # torch is heavy; nothing here needs it at run time
    from torch import Tensor

read_json = partial(files.read_json, missing="missing from the checkpoint")

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model-{:05d}.safetensors"
SHARD_BYTES = 2 << 30


def safetensors_files(ckpt: Path) -> list[Path]:
    """The weight files of a checkpoint: the shards its `model.safetensors.index.json` names
    (sorted, each once), or its single `model.safetensors`. FileNotFoundError names what is
    missing; PipelineError a malformed index."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise PipelineError(f"{index}: not a safetensors index ({e!r})") from None
        shards = [ckpt / n for n in names]
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: listed in {INDEX_FILE} but missing")
        return shards
    single = ckpt / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{ckpt}: neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    return [single]


# The prefixes of a LLaVA checkpoint's tensor names per component, in transformers' v4 layout
# (language_model.model.*, language_model.lm_head.*) and its v5 layout (model.language_model.*,
# lm_head.*). Longest match wins (vision_tower.vision_model. before vision_tower.).
KEY_PREFIXES: dict[str, str] = {
    "language_model.model.": "text",
    "model.language_model.": "text",
    "language_model.lm_head.": "lm_head",
    "lm_head.": "lm_head",
    "vision_tower.vision_model.": "vision",
    "model.vision_tower.vision_model.": "vision",
    "vision_tower.": "vision",
    "model.vision_tower.": "vision",
    "multi_modal_projector.": "projector",
    "model.multi_modal_projector.": "projector",
}


def split_key(hf_key: str) -> tuple[str, str]:
    """(component: text | lm_head | vision | projector, the name inside it) of a checkpoint key."""
    for prefix in sorted(KEY_PREFIXES, key=len, reverse=True):
        if hf_key.startswith(prefix):
            return KEY_PREFIXES[prefix], hf_key[len(prefix) :]
    raise ValueError(f"unexpected checkpoint key {hf_key!r}: not a LLaVA component")


class ShardWriter:
    """Safetensors shards of at most `shard_bytes` plus an HF-style index, written as
    tensors arrive, so that at most one shard is in memory."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, Tensor] = {}
        self.size = 0
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, key: str, tensor: Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.pending and self.size + n > self.shard_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.size += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = SHARD_PATTERN.format(len(set(self.weight_map.values())) + 1)
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending or not self.weight_map:
            self._flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class TokenizerSpec:
    vocab_size: int  # the model's vocabulary (rows of lm_head), >= the tokenizer's
    added_tokens: dict[int, str]  # tokens added on top of the SentencePiece model
    bos_id: int
    eos_ids: tuple[int, ...]


def tokenizer_spec(ckpt: Path) -> TokenizerSpec:
    """Vocabulary facts the runner needs, from config.json and tokenizer_config.json."""
    cfg = read_json(ckpt / "config.json")
    text = cfg.get("text_config") or {}
    vocab_size = text.get("vocab_size") or cfg.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise PipelineError(f"{ckpt / 'config.json'}: text_config.vocab_size missing")
    added = {i: t for i, t in hf_added_tokens(ckpt).items() if i >= sentencepiece_size(ckpt)}
    bos = text.get("bos_token_id", 1)
    eos = text.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    return TokenizerSpec(vocab_size=vocab_size, added_tokens=added, bos_id=bos, eos_ids=eos_ids)


def sentencepiece_size(ckpt: Path) -> int:
    import sentencepiece as spm

    path = ckpt / "tokenizer.model"
    try:
        return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise PipelineError(f"{path}: not a SentencePiece model ({e})") from None


def hf_added_tokens(ckpt: Path) -> dict[int, str]:
    """Tokens the HF tokenizer adds (whatever file format the checkpoint uses)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:
        raise PipelineError(f"{ckpt}: the HF tokenizer does not load ({e})") from None
    return {int(i): t.content for i, t in tok.added_tokens_decoder.items()}


def preprocessor_config(ckpt: Path) -> dict:
    return read_json(ckpt / "preprocessor_config.json")
