"""Tokenizer files: llama2c tokenizer.bin (ExecuTorch runner) vs SentencePiece vs HF.

Known, asserted differences (see llava_pipeline/formats/tokenizer.py's docstring):
llama2c cannot encode empty text and treats a literal "▁" as a character;
transformers 5's Metaspace gives no dummy prefix to text starting with a space;
HF splits special-token text out of a string.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image
from pytorch_tokenizers import CppLlama2cTokenizer
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from llava_pipeline.formats import tokenizer as T

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets/tokenizer/llama2.model"
CASES = json.loads((REPO / "tests/data/llama_spm_cases.json").read_text(encoding="utf-8"))["cases"]

SAMPLE_QUESTION = "What is shown in this picture?"
# What llava-hf/llava-1.5-7b-hf's tokenizer gives for the LLaVA-1.5 prompt with
# SAMPLE_QUESTION: note 29871 ("▁") on both sides of <image> (32000).
SAMPLE_PROMPT_IDS = [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 5618, 338, 4318, 297, 445, 7623,
                     29973, 319, 1799, 9047, 13566, 29901]  # fmt: skip

TEXTS = [
    "Hello world",
    "  two leading spaces",
    "double  space and trailing ",
    "trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\nstarts with a newline",
    "tabs\tand\t\tmore tabs\t",
    "digits 0123456789 and 3.14159, 1,000,000",
    "Accents: naïve café, Ærøskøbing, São Paulo, Dvořák",
    "CJK: 你好，世界。日本語のテキスト。한국어 문장.",
    "Emoji: 🙂🐱🚀 and 👩‍👩‍👧 family",
    "Punctuation!? (brackets) [square] {curly} <angle> \"quotes\" 'single' — dash… ellipsis",
    "Mixed\r\nline endings\rand form\x0cfeed",
    "a",
    " ",
    "x" * 40 + " " * 17 + "y",
]

QUESTIONS = [
    SAMPLE_QUESTION,
    "Describe the image in detail.",
    "How many cats are there?  Count carefully, please.",
    "¿Qué hay en la foto? Beschreibe es bitte.",
    "这是什么？请用中文回答。",
    "Is this 🐱 or 🐶?",
    "List 3 colours:\n1.\n2.\n3.",
    "   leading spaces, trailing spaces   ",
    "Tabs\there, digits 1234567890.",
    "\nA question that itself starts with a newline",
]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(MODEL))


@pytest.fixture(scope="module")
def bin_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bin") / "tokenizer.bin"
    T.write_tokenizer_bin(MODEL, path, T.LLAVA_VOCAB_SIZE, T.LLAVA_ADDED_TOKENS)
    return path


@pytest.fixture(scope="module")
def llama2c(bin_path) -> CppLlama2cTokenizer:
    tok = CppLlama2cTokenizer()
    tok.load(str(bin_path))
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    T.write_hf_tokenizer(MODEL, out)
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)


def read_tokenizer_bin(path: Path) -> tuple[tuple[int, ...], list[tuple[float, bytes]]]:
    """Independent reader of the llama2c format: header and (score, piece bytes) per id."""
    data = path.read_bytes()
    header = struct.unpack_from("<4I", data, 0)
    pos, entries = 16, []
    while pos < len(data):
        score, length = struct.unpack_from("<fI", data, pos)
        pos += 8
        entries.append((score, data[pos : pos + length]))
        pos += length
    return header, entries


# ------------------------------------------------------------------ the asset


def test_model_asset_is_llama2_vocabulary(sp):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(MODEL.read_bytes())
    assert sp.vocab_size() == 32000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 13, 258, 29871)] == [
        "<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>", "▁"]  # fmt: skip
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    norm = proto.normalizer_spec
    assert (norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces) == (True, False, True)
    assert sp.encode("Hello world") == [15043, 3186]


def test_reference_cases_file_is_complete():
    assert len(CASES) == 46
    assert all(isinstance(c["text"], str) and all(isinstance(i, int) for i in c["ids"]) for c in CASES)
    assert {"text": "Hello world", "ids": [15043, 3186]} in CASES


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_sentencepiece_and_llama2c_match_llama_cpp_reference(case, sp, llama2c):
    assert sp.encode(case["text"]) == case["ids"]
    if case["text"]:
        assert llama2c.encode(case["text"], 0, 0) == case["ids"]
    else:
        # Known difference: llama2c refuses empty text (SentencePiece gives []),
        # so the runner must never be handed an empty text segment.
        with pytest.raises(RuntimeError, match="EncodeFailure"):
            llama2c.encode(case["text"], 0, 0)


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_hf_matches_reference_except_leading_space(case, sp, hf):
    got = hf.encode(case["text"], add_special_tokens=False)
    if case["text"].startswith(" "):
        # Known transformers 5 difference: Metaspace adds no dummy prefix to text
        # that already starts with a space, so " x" encodes like SentencePiece's "x"
        # (and " " alone as "▁").
        assert got == (sp.encode(case["text"][1:]) or [29871])
        assert got != case["ids"]
    else:
        assert got == case["ids"]


# ------------------------------------------------------------------ tokenizer.bin


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_llama2c_encodes_like_sentencepiece(text, sp, llama2c):
    assert llama2c.encode(text, 0, 0) == sp.encode(text)
    assert llama2c.encode(text, 1, 1) == [1] + sp.encode(text) + [2]


def test_llama2c_literal_metaspace_character_differs(sp, llama2c):
    # A literal "▁" is a space to SentencePiece but an unknown character (byte
    # fallback) to llama2c, whose pieces store spaces as " ".
    assert sp.encode("x▁y") == sp.encode("x y") == [921, 343]
    assert llama2c.encode("x▁y", 0, 0) == [921, 229, 153, 132, 29891]


def test_tokenizer_bin_covers_model_vocab(bin_path, llama2c, sp):
    header, entries = read_tokenizer_bin(bin_path)
    assert header[:3] == (32064, 1, 2)
    assert header[3] == max(len(piece) for _, piece in entries)
    assert len(entries) == 32064
    assert (llama2c.vocab_size(), llama2c.bos_tok(), llama2c.eos_tok()) == (32064, 1, 2)
    assert entries[29871][1] == b" " and entries[15043][1] == b" Hello"
    assert entries[32000][1] == b"<image>" and entries[32001][1] == b"<pad>"
    assert entries[32002][1] == T.padding_piece(32002).encode() == b"<unused_32002>"
    assert len({piece for _, piece in entries}) == 32064  # unique, so lookups are unambiguous
    for i in range(32000):
        assert entries[i][0] == pytest.approx(sp.get_score(i))
    # llama2c merges only pairs scoring above -1e10: added and padding pieces never.
    assert all(score <= -1e10 for score, _ in entries[32000:])
    assert [llama2c.decode(i) for i in (1, 2, 13, 15043, 32000, 32001, 32063)] == [
        "<s>", "</s>", "\n", " Hello", "<image>", "<pad>", "<unused_32063>"]  # fmt: skip
    with pytest.raises(RuntimeError, match="OutOfRange"):
        llama2c.decode(32064)


def test_llama2c_decode_round_trips(llama2c):
    text = "Hello  world\nnaïve café 数学 (3.14)"
    ids = llama2c.encode(text, 1, 0)
    # the runner strips the dummy prefix after BOS; joined pieces carry it
    assert "".join(llama2c.decode(i) for i in ids[1:]) == " " + text


def test_added_and_padding_pieces_are_never_produced_from_text(sp, llama2c):
    text = "<image> <pad> <unused_32002> <unused_32063> <s> </s> <unk> <0x0A>"
    ids = llama2c.encode(text, 0, 0)
    assert max(ids) < 32000 and 1 not in ids and 2 not in ids
    assert ids == sp.encode(text)


def test_tokenizer_bin_is_deterministic(tmp_path, bin_path):
    again = tmp_path / "again.bin"
    T.write_tokenizer_bin(MODEL, again, T.LLAVA_VOCAB_SIZE, T.LLAVA_ADDED_TOKENS)
    assert again.read_bytes() == bin_path.read_bytes()


def test_tokenizer_bin_without_added_tokens(tmp_path):
    out = tmp_path / "plain.bin"
    T.write_tokenizer_bin(MODEL, out, 32000, {})
    header, entries = read_tokenizer_bin(out)
    assert header[0] == 32000 and len(entries) == 32000


@pytest.mark.parametrize(
    ("vocab_size", "added", "message"),
    [
        (32001, T.LLAVA_ADDED_TOKENS, "smaller than the 32000 SentencePiece pieces plus 2"),
        (31999, {}, "smaller"),
        (32064, {5: "<image>"}, "collides with SentencePiece piece 5"),
        (32064, {32064: "<image>"}, "outside vocab_size"),
        (32064, {32000: "<s>"}, "duplicates an existing piece"),
        (32064, {32000: "<x>", 32001: "<x>"}, "duplicates"),
        (32064, {32000: ""}, "non-empty"),
        (32064, {32000: "<unused_32005>"}, "padding piece '<unused_32005>' duplicates"),
    ],
)
def test_tokenizer_bin_bad_arguments(tmp_path, vocab_size, added, message):
    out = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match=message):
        T.write_tokenizer_bin(MODEL, out, vocab_size, added)
    assert not out.exists()


# ------------------------------------------------------------------ HF tokenizer


def test_hf_tokenizer_files_and_specials(hf_dir, hf):
    assert {p.name for p in hf_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    assert (
        hashlib.sha256((hf_dir / "tokenizer.model").read_bytes()).digest()
        == hashlib.sha256(MODEL.read_bytes()).digest()
    )
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["legacy"] is True and config["add_bos_token"] is True and config["add_eos_token"] is False
    assert type(hf).__name__ == "LlamaTokenizer"
    assert len(hf) == 32002
    assert (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 32001)
    assert hf.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    added = hf.added_tokens_decoder
    assert [(added[i].content, added[i].special, added[i].normalized) for i in (32000, 32001)] == [
        ("<image>", True, False), ("<pad>", True, False)]  # fmt: skip
    assert hf("Hello world").input_ids == [1, 15043, 3186]
    assert hf.decode([1, 15043, 3186, 29892, 32000, 2], skip_special_tokens=True) == "Hello world,"


@pytest.mark.parametrize("text", [t for t in TEXTS if not t.startswith(" ")])
def test_hf_encodes_like_sentencepiece(text, sp, hf):
    assert hf.encode(text, add_special_tokens=False) == sp.encode(text)


def test_sample_prompt_ids(hf, llama2c):
    prompt = T.LLAVA_PROMPT_TEMPLATE.format(question=SAMPLE_QUESTION)
    assert prompt == "USER: <image>\nWhat is shown in this picture? ASSISTANT:"
    assert hf(prompt).input_ids == SAMPLE_PROMPT_IDS
    seg = T.runner_prompt_segments(SAMPLE_QUESTION)
    assert seg == T.PromptSegments("USER: ", "\nWhat is shown in this picture? ASSISTANT:")
    assert llama2c.encode(seg.before_image, 1, 0) == SAMPLE_PROMPT_IDS[:5]
    assert llama2c.encode(seg.after_image, 0, 0) == SAMPLE_PROMPT_IDS[6:]


@pytest.mark.parametrize("question", QUESTIONS, ids=range(len(QUESTIONS)))
def test_runner_segments_equal_hf_prompt_ids(question, hf, llama2c, bin_path):
    expected = hf(T.LLAVA_PROMPT_TEMPLATE.format(question=question)).input_ids
    assert expected.count(32000) == 1
    seg = T.runner_prompt_segments(question)
    by_text = llama2c.encode(seg.before_image, 1, 0) + [32000] + llama2c.encode(seg.after_image, 0, 0)
    assert by_text == expected
    before, after = T.runner_prompt_token_segments(bin_path, question)
    assert before + [32000] + after == expected


@pytest.fixture(scope="module")
def hf_first_only():
    return T.make_hf_tokenizer(MODEL, legacy=False)


@pytest.mark.parametrize("question", QUESTIONS, ids=range(len(QUESTIONS)))
def test_token_segments_for_non_legacy_tokenizer(question, hf_first_only, llama2c):
    expected = hf_first_only(T.LLAVA_PROMPT_TEMPLATE.format(question=question)).input_ids
    before, after = T.runner_prompt_token_segments(llama2c, question, dummy_prefix_after_image=False)
    assert before + [32000] + after == expected
    # ...which is the legacy tokenization minus the 29871 after <image>
    assert after == T.runner_prompt_token_segments(llama2c, question)[1][1:]


def test_llava_processor_expands_image_between_runner_segments(hf_dir, bin_path, tmp_path):
    from transformers import LlavaProcessor

    # a checkpoint-like folder: our tokenizer files + llava-1.5-7b-hf's processor configs
    for path in hf_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor",
        "resample": 3, "size": {"shortest_edge": 336}}))  # fmt: skip
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}))  # fmt: skip
    processor = LlavaProcessor.from_pretrained(str(tmp_path), local_files_only=True)

    image = Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8))
    question = "Describe the image in detail."
    out = processor(images=image, text=T.LLAVA_PROMPT_TEMPLATE.format(question=question), return_tensors="np")
    before, after = T.runner_prompt_token_segments(bin_path, question)
    assert out["input_ids"][0].tolist() == before + [32000] * 576 + after
    assert out["pixel_values"].shape == (1, 3, 336, 336)


def test_legacy_survives_a_processor_save(tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(), tokenizer=T.make_hf_tokenizer(MODEL), patch_size=14
    )
    processor.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert reloaded(T.LLAVA_PROMPT_TEMPLATE.format(question=SAMPLE_QUESTION)).input_ids == SAMPLE_PROMPT_IDS


def test_tokenizer_from_bare_model_ranks_merges_by_id(tmp_path, sp):
    """Why write_hf_tokenizer ships score-ranked merges in tokenizer.json: from a bare
    tokenizer.model, transformers 5 ranks merges by piece id and runs of spaces merge
    differently from SentencePiece."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.model").write_bytes(MODEL.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
    bare = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "Hello    world"
    assert sp.encode(text) == [15043, 1678, 3186]
    assert bare.encode(text, add_special_tokens=False) == [15043, 268, 11526]


def test_prompt_helpers_reject_what_they_cannot_match(llama2c):
    with pytest.raises(ValueError, match="exactly once"):
        T.split_prompt("no image here")
    with pytest.raises(ValueError, match="exactly once"):
        T.runner_prompt_segments("another <image> please")
    with pytest.raises(ValueError, match="special token text '</s>'"):
        T.runner_prompt_token_segments(llama2c, "stop</s>")
    with pytest.raises(ValueError, match="before_image is empty"):
        T.runner_prompt_segments("q", template="<image>\n{question}")
    with pytest.raises(ValueError, match="after_image starts with a space"):
        T.runner_prompt_segments("q", template="USER: <image> {question}")
    with pytest.raises(ValueError, match="before_image starts with a space"):
        T.runner_prompt_token_segments(llama2c, "q", template=" USER: <image>\n{question}")
    with pytest.raises(ValueError, match="dummy prefix merged"):
        T.runner_prompt_token_segments(llama2c, "q", template="USER: <image>{question}", dummy_prefix_after_image=False)
    # an image first in the prompt still works as token segments: BOS alone
    assert T.runner_prompt_token_segments(llama2c, "Hi", template="<image>\n{question}") == ([1], [29871, 13, 18567])
