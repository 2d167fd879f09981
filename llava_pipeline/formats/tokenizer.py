"""Tokenizer files for a LLaVA-1.5 export, made from a Llama-2 SentencePiece model.

Two consumers, two formats:

- ExecuTorch's C++ runner loads an llama2c ``tokenizer.bin`` (header of 4 uint32:
  vocab size, bos, eos, max piece length; then per id: float32 score, uint32
  length, bytes). ``write_tokenizer_bin`` writes one covering the model's whole
  vocabulary (32064 for llava-1.5-7b-hf), because the runner's greedy argmax only
  scans the tokenizer's ids.
- Hugging Face code loads ``tokenizer.json`` + ``tokenizer_config.json``:
  ``write_hf_tokenizer`` writes the files of a llava-hf LLaVA-1.5 checkpoint.

Tokenization of the LLaVA-1.5 prompt (checked by tests/test_tokenizer.py)
--------------------------------------------------------------------------
``"USER: <image>\\nWhat is shown in this picture? ASSISTANT:"`` gives, with the HF
tokenizer written here (and in the HF processor, where ``<image>`` is repeated
576 times)::

    [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 5618, 338, 4318, 297,
     445, 7623, 29973, 319, 1799, 9047, 13566, 29901]
     <s> ▁US  ER   :      ▁     <image> ▁   \\n What ▁is ▁shown ▁in
     ▁this ▁picture ?  ▁A  SS  IST  ANT  :

This is the tokenization LLaVA-1.5 was trained with (the original LLaVA code
encodes the text on each side of ``<image>`` as its own SentencePiece string, so
each gets a dummy-prefix ``▁`` (29871): that is the 29871 after 32000), and the
one published for llava-hf/llava-1.5-7b-hf's ``tokenizer.json`` (those ids, and
HF's integration tests decoding its prompts as "USER:  \\nWhat", two spaces);
the real checkpoint files could not be checked offline. The HF tokenizer
reproduces it with ``legacy=True`` (Metaspace ``prepend_scheme="always"``: a
dummy prefix on every chunk between added tokens). transformers 5 rebuilds that
pre-tokenizer from tokenizer_config.json's ``legacy`` (default False), so a
checkpoint whose config lacks ``"legacy": true`` tokenizes without the 29871
after ``<image>``; see ``dummy_prefix_after_image`` below.

ExecuTorch's runner encodes each text input with ``CppLlama2cTokenizer.encode``,
which also prepends a dummy prefix to every segment, BOS on the first only:

- ``encode("USER: ", 1, 0)`` -> ``[1, 3148, 1001, 29901, 29871]``
- ``encode("\\nWhat is shown in this picture? ASSISTANT:", 0, 0)`` ->
  ``[29871, 13, 5618, ..., 29901]``

so the text segments ``runner_prompt_segments`` returns give exactly the HF ids,
with the image embeddings between them. A tokenizer with ``legacy=False``
(prepend_scheme "first") has no 29871 after ``<image>``; for that case
``runner_prompt_token_segments(..., dummy_prefix_after_image=False)`` returns
token ids with the runner's dummy prefix dropped (valid because the segment
starts with "\\n", a byte-fallback token the prefix can never merge with).

Known differences between the three encoders (asserted in the tests):

- HF splits special-token text (``<s>``, ``</s>``, ``<unk>``, ``<image>``,
  ``<pad>``) out of the prompt; SentencePiece and llama2c encode it as plain text
  (the prompt helpers refuse such questions).
- llama2c refuses to encode empty text (SentencePiece gives ``[]``), so the
  runner must never get an empty text segment.
- transformers 5's Metaspace pre-tokenizer adds no dummy prefix to a chunk that
  already starts with a space (``" Hello"`` -> ``[15043]``, SentencePiece
  ``[29871, 15043]``). The LLaVA prompt's chunks start with "U" and "\\n".
- transformers 5 builds BPE merges from a bare ``tokenizer.model`` in vocabulary
  order, not by piece score, which mis-merges runs of spaces; the
  ``tokenizer.json`` written here carries score-ranked merges instead.
- llama2c looks up a literal "▁" (U+2581) in the text as a character and falls
  back to its bytes; SentencePiece and HF treat it as a space.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
#: llava-hf adds these two to the 32000 Llama-2 pieces.
LLAVA_ADDED_TOKENS: dict[int, str] = {32000: IMAGE_TOKEN, 32001: PAD_TOKEN}
#: llava-1.5-7b-hf's embedding / lm_head size (padded to a multiple of 64).
LLAVA_VOCAB_SIZE = 32064
LLAVA_PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

# llama2c's encoder starts each merge round at best_score = -1e10 and only takes a
# pair scoring strictly above it, so a piece at or below this can never be merged.
_UNMERGEABLE_SCORE = -1e30
_SPECIAL_TEXTS = ("<s>", "</s>", "<unk>", IMAGE_TOKEN, PAD_TOKEN)

_Piece = sp_pb2.ModelProto.SentencePiece


def _load_proto(sp_model: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(sp_model).read_bytes())
    return proto


def padding_piece(token_id: int) -> str:
    """Name of the unused piece that fills id ``token_id`` up to the model's vocab.

    Never produced by encoding: llama2c can only reach a multi-character piece by
    merging, and these pieces score too low to be merged; SentencePiece never
    emits UNUSED pieces.
    """
    return f"<unused_{token_id}>"


def extended_model_proto(sp_model: Path, vocab_size: int, added_tokens: dict[int, str]) -> sp_pb2.ModelProto:
    """The SentencePiece model with added tokens and padding up to ``vocab_size`` ids.

    Added tokens become USER_DEFINED pieces at their ids, the remaining ids UNUSED
    pieces named by ``padding_piece``; both get a score llama2c never merges.
    Raises ValueError if ``vocab_size`` is smaller than pieces + added tokens, an
    added id is below the model's piece count or at/after ``vocab_size``, or an
    added token is empty or duplicates a piece.
    """
    proto = _load_proto(sp_model)
    n_pieces = len(proto.pieces)
    added = {int(k): v for k, v in added_tokens.items()}
    if vocab_size < n_pieces + len(added):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {n_pieces} SentencePiece pieces "
            f"plus {len(added)} added tokens"
        )
    existing = {p.piece for p in proto.pieces}
    for token_id, text in sorted(added.items()):
        if token_id < n_pieces:
            raise ValueError(f"added token {text!r} id {token_id} collides with SentencePiece piece {token_id}")
        if token_id >= vocab_size:
            raise ValueError(f"added token {text!r} id {token_id} is outside vocab_size {vocab_size}")
        if not text or "\0" in text:
            raise ValueError(f"added token at id {token_id} must be non-empty text without NUL")
        if text in existing:
            raise ValueError(f"added token {text!r} (id {token_id}) duplicates an existing piece")
        existing.add(text)
    for token_id in range(n_pieces, vocab_size):
        if token_id in added:
            piece = _Piece(piece=added[token_id], score=_UNMERGEABLE_SCORE, type=_Piece.USER_DEFINED)
        else:
            name = padding_piece(token_id)
            if name in existing:
                raise ValueError(f"padding piece {name!r} duplicates an added token")
            piece = _Piece(piece=name, score=_UNMERGEABLE_SCORE, type=_Piece.UNUSED)
        proto.pieces.append(piece)
    proto.trainer_spec.vocab_size = vocab_size
    return proto


def write_tokenizer_bin(sp_model: Path, out: Path, vocab_size: int, added_tokens: dict[int, str]) -> None:
    """Write an llama2c ``tokenizer.bin`` with exactly ``vocab_size`` ids.

    Ids 0..n-1 are the SentencePiece pieces ("▁" written as a space, as llama2c
    expects), then ``added_tokens`` at their ids, then ``padding_piece`` names.
    Written by pytorch_tokenizers' own llama2c exporter from the extended model
    (``extended_model_proto``). Deterministic: same inputs, same bytes. Errors as
    ``extended_model_proto``. ``out`` is written in place (not atomically).
    """
    from pytorch_tokenizers.llama2c import Llama2cTokenizer

    proto = extended_model_proto(sp_model, vocab_size, added_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "extended.model"
        model_path.write_bytes(proto.SerializeToString(deterministic=True))
        exporter = Llama2cTokenizer(str(model_path))
        if exporter.n_words != vocab_size:
            raise ValueError(f"extended model has {exporter.n_words} ids, expected {vocab_size}")
        exporter.export(str(out))


def make_hf_tokenizer(sp_model: Path, added_tokens: dict[int, str] | None = None, *, legacy: bool = True):
    """A transformers ``LlamaTokenizer`` for LLaVA-1.5 built offline from ``sp_model``.

    Like llava-hf/llava-1.5-7b-hf: bos ``<s>``, eos ``</s>``, unk ``<unk>``,
    add_bos_token true, ``<image>`` (32000) and ``<pad>`` (32001) as added special
    tokens, pad token ``<pad>``, left padding. BPE merges are ranked by piece score
    as SentencePiece ranks them (transformers 5 would rank a bare .model by id).
    ``legacy=True`` puts a dummy prefix on every chunk between added tokens (see
    the module docstring); ``added_tokens`` must be consecutive ids after the pieces.
    """
    from transformers import AddedToken, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    added = dict(sorted((added_tokens if added_tokens is not None else LLAVA_ADDED_TOKENS).items()))
    proto = _load_proto(sp_model)
    if list(added) != list(range(len(proto.pieces), len(proto.pieces) + len(added))):
        raise ValueError(f"added token ids {list(added)} must follow the {len(proto.pieces)} pieces consecutively")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # SentencePiece merges only into normal pieces, and only normal pieces merge.
    normal = {p.piece: p.score for p in proto.pieces if p.type == _Piece.NORMAL}
    merges = generate_merges(vocab, normal, skip_tokens=set(vocab) - set(normal))
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        legacy=legacy,
        add_bos_token=True,
        add_eos_token=False,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    # LlamaTokenizer does not keep `legacy` among the kwargs it saves, and on load
    # rebuilds its pre-tokenizer from it (default False): record it so that any
    # save_pretrained (the tokenizer's or a processor's) round-trips the behaviour.
    tok.init_kwargs["legacy"] = legacy
    special = [AddedToken(text, special=True, normalized=False) for text in added.values()]
    tok.add_tokens(special, special_tokens=True)
    if PAD_TOKEN in added.values():
        tok.pad_token = PAD_TOKEN
    got = tok.convert_tokens_to_ids(list(added.values()))
    if got != list(added):
        raise ValueError(f"added tokens landed at {got}, expected {list(added)}")
    return tok


def write_hf_tokenizer(
    sp_model: Path, out_dir: Path, added_tokens: dict[int, str] | None = None, *, legacy: bool = True
) -> None:
    """Write the HF tokenizer files of a LLaVA-1.5 checkpoint into ``out_dir``.

    ``tokenizer.json``, ``tokenizer_config.json`` (records ``legacy``, which
    transformers 5 needs to rebuild the same pre-tokenizer) and ``tokenizer.model``
    (transformers 5 writes no special_tokens_map.json / added_tokens.json):
    ``AutoTokenizer.from_pretrained(out_dir)`` and ``LlavaProcessor`` load them
    with no network. See ``make_hf_tokenizer``.
    """
    tok = make_hf_tokenizer(sp_model, added_tokens, legacy=legacy)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    # transformers 5 leaves add_bos/eos_token out of tokenizer_config.json; llava-hf's
    # config has them (and `legacy`, see make_hf_tokenizer).
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(legacy=legacy, add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # save_pretrained has no SentencePiece file to copy for a tokenizer built from a
    # vocab; llava-hf ships tokenizer.model beside tokenizer.json, so do we.
    (out_dir / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())


# ---------------------------------------------------------------- runner prompts


@dataclass(frozen=True)
class PromptSegments:
    """Text around the image: encode ``before_image`` with BOS, ``after_image`` without."""

    before_image: str
    after_image: str


def split_prompt(prompt: str) -> PromptSegments:
    """Split a prompt at its single ``<image>``.

    Raises ValueError unless ``<image>`` occurs exactly once and no other special
    token text (``<s>``, ``</s>``, ``<unk>``, ``<pad>``) occurs: HF maps those to
    their ids while the runner would encode them as plain text.
    """
    if prompt.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"prompt must contain {IMAGE_TOKEN} exactly once, found {prompt.count(IMAGE_TOKEN)}")
    before, after = prompt.split(IMAGE_TOKEN)
    for text in _SPECIAL_TEXTS:
        if text in before or text in after:
            raise ValueError(f"prompt contains special token text {text!r}; HF and the runner would disagree on it")
    return PromptSegments(before, after)


def runner_prompt_segments(question: str, template: str = LLAVA_PROMPT_TEMPLATE) -> PromptSegments:
    """Text inputs for ExecuTorch's runner that give the HF ids of the LLaVA-1.5 prompt.

    Give the runner ``make_text_input(before_image)`` (with ``num_bos=1``), the
    image, then ``make_text_input(after_image)``. Exact for the ``legacy=True`` HF
    tokenizer (the llava-hf one) provided each segment is non-empty and does not
    start with a space (transformers' Metaspace adds no dummy prefix there; llama2c
    does). Raises ValueError otherwise, or as ``split_prompt``.
    """
    segments = split_prompt(template.format(question=question))
    _check_segments(segments, allow_empty=False)
    return segments


def _check_segments(segments: PromptSegments, allow_empty: bool) -> None:
    for name, text in (("before_image", segments.before_image), ("after_image", segments.after_image)):
        if not text and not allow_empty:
            raise ValueError(f"{name} is empty: llama2c cannot encode empty text, use token segments")
        if text and text[0] in " \u2581":
            # transformers' Metaspace gives such a chunk no dummy prefix; llama2c
            # merges its own prefix with the space, so no id list can be derived.
            raise ValueError(f"{name} starts with a space: HF and llama2c prefix it differently")


def runner_prompt_token_segments(
    tokenizer, question: str, template: str = LLAVA_PROMPT_TEMPLATE, *, dummy_prefix_after_image: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids before and after the image, computed with the runner's own tokenizer.

    ``tokenizer`` is a path to ``tokenizer.bin`` or a loaded
    ``pytorch_tokenizers.CppLlama2cTokenizer``. The first list starts with BOS.
    ``dummy_prefix_after_image=False`` matches a ``legacy=False`` HF tokenizer by
    dropping llama2c's dummy prefix from the second segment; that raises
    ValueError if the prefix merged into the segment's first piece (segment not
    starting with a byte-fallback character such as "\\n"). Either segment may be
    empty, but not start with a space (ValueError, as ``runner_prompt_segments``).
    Feed the lists with ``make_token_input``. Errors as ``split_prompt``.
    """
    tok = _load_llama2c(tokenizer)
    segments = split_prompt(template.format(question=question))
    _check_segments(segments, allow_empty=True)
    before = tok.encode(segments.before_image, 1, 0) if segments.before_image else [tok.bos_tok()]
    after = tok.encode(segments.after_image, 0, 0) if segments.after_image else []
    if after and not dummy_prefix_after_image:
        # "\n" has no piece of its own, so it encodes as [dummy prefix, <0x0A>]. If the
        # prefix is still a token of its own, no merge touched it and the rest is
        # what encoding the segment without a prefix gives.
        dummy = tok.encode("\n", 0, 0)[0]
        if after[0] != dummy:
            raise ValueError(f"the dummy prefix merged into {segments.after_image[:10]!r}; cannot drop it")
        after = after[1:]
    return list(before), list(after)


def _load_llama2c(tokenizer):
    if isinstance(tokenizer, (str, Path)):
        from pytorch_tokenizers import CppLlama2cTokenizer

        loaded = CppLlama2cTokenizer()
        loaded.load(str(tokenizer))
        return loaded
    return tokenizer
