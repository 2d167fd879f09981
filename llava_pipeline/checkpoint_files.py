"""Small readers for the JSON side of an HF-format LLaVA checkpoint folder."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import files
from .errors import PipelineError

read_json = partial(files.read_json, missing="missing from the checkpoint")


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
