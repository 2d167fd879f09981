"""One-off conversion: Llama-2 SentencePiece vocabulary from a llama.cpp vocab GGUF.

Run once by a developer; the outputs are committed. Nothing in the pipeline runs it.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    pip install gguf==0.19.0          # the project's "tools" extra
    python scripts/make_tokenizer_model.py llama_cpp_python-0.3.36.tar.gz

The sdist vendors llama.cpp, whose ``models/ggml-vocab-llama-spm.gguf`` is a
vocab-only GGUF of Meta's Llama-2 SentencePiece vocabulary (32000 pieces, unk 0,
bos 1, eos 2, byte-fallback pieces <0x00>..<0xFF>). This script writes:

- ``assets/tokenizer/llama2.model``: a SentencePiece ``ModelProto`` (BPE) with
  those pieces, scores and types and Llama-2's normalizer settings.
- ``tests/data/llama_spm_cases.json``: llama.cpp's reference tokenizations
  (``.gguf.inp`` / ``.gguf.out`` beside the GGUF) as ``{"text", "ids"}`` cases.

Output is deterministic: the same sdist gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
import tempfile
from pathlib import Path

import gguf
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

REPO = Path(__file__).resolve().parents[1]
SDIST_NAME = "llama_cpp_python-0.3.36"
GGUF_MEMBER = f"{SDIST_NAME}/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
# llama.cpp's tests/test-tokenizer-0.cpp splits the .inp file on this separator and
# reads one line of space-separated ids per case from the .out file.
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"


def _read_member(sdist: Path, member: str) -> bytes:
    with tarfile.open(sdist, "r:gz") as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise FileNotFoundError(f"{member} is not a regular file in {sdist}")
        return handle.read()


def _string_array(field: gguf.ReaderField) -> list[str]:
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _scalar_array(field: gguf.ReaderField) -> list:
    return [field.parts[i][0].item() for i in field.data]


def _scalar(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    return field.parts[field.data[0]][0].item()


def build_model_proto(gguf_path: Path) -> sp_pb2.ModelProto:
    """SentencePiece ModelProto equivalent to Llama-2's tokenizer.model.

    Pieces, scores and types come from the GGUF (GGUF token types use the same
    numbers as SentencePiece's piece types: 1 normal, 2 unknown, 3 control,
    6 byte). Trainer and normalizer settings are those of Llama-2's model; the
    training-only fields that name Meta's corpus files are left out.
    """
    reader = gguf.GGUFReader(str(gguf_path))
    model = _string_array(reader.fields["tokenizer.ggml.model"])
    if model != ["llama"]:
        raise ValueError(f"expected a SentencePiece ('llama') vocabulary, got {model}")
    tokens = _string_array(reader.fields["tokenizer.ggml.tokens"])
    scores = _scalar_array(reader.fields["tokenizer.ggml.scores"])
    types = _scalar_array(reader.fields["tokenizer.ggml.token_type"])
    ids = {k: _scalar(reader, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos")}
    if not (len(tokens) == len(scores) == len(types) == 32000):
        raise ValueError(f"expected 32000 tokens, got {len(tokens)}/{len(scores)}/{len(types)}")
    if ids != {"unknown": 0, "bos": 1, "eos": 2}:
        raise ValueError(f"unexpected special ids {ids}")

    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        entry = proto.pieces.add(piece=piece, score=score)
        if kind != sp_pb2.ModelProto.SentencePiece.NORMAL:
            entry.type = kind  # NORMAL is the proto default; leaving it unset keeps the file small

    t = proto.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.split_digits = True
    t.split_by_unicode_script = True
    t.split_by_whitespace = True
    t.split_by_number = True
    t.treat_whitespace_as_suffix = False
    t.allow_whitespace_only_pieces = True
    t.max_sentencepiece_length = 16
    t.character_coverage = 0.99995
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    t.unk_surface = " \u2047 "

    n = proto.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    n.normalization_rule_tsv = ""
    return proto


def read_cases(inp: bytes, out: bytes) -> list[dict]:
    """llama.cpp's reference cases, parsed as tests/test-tokenizer-0.cpp does."""
    raw = inp.decode("utf-8")
    texts = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(CASE_SEPARATOR, pos)
        if nxt == -1:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(CASE_SEPARATOR)
    lines = out.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ends with a newline
    if len(texts) != len(lines):
        raise ValueError(f"{len(texts)} inputs but {len(lines)} outputs")
    return [{"text": t, "ids": [int(x) for x in line.split()]} for t, line in zip(texts, lines)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help=f"{SDIST_NAME}.tar.gz from pip download")
    parser.add_argument("--model-out", type=Path, default=REPO / "assets/tokenizer/llama2.model")
    parser.add_argument("--cases-out", type=Path, default=REPO / "tests/data/llama_spm_cases.json")
    args = parser.parse_args()

    sdist_sha = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    gguf_bytes = _read_member(args.sdist, GGUF_MEMBER)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = Path(tmp) / "vocab.gguf"
        gguf_path.write_bytes(gguf_bytes)
        proto = build_model_proto(gguf_path)

    args.model_out.parent.mkdir(parents=True, exist_ok=True)
    args.model_out.write_bytes(proto.SerializeToString())
    print(f"wrote {args.model_out} sha256 {hashlib.sha256(args.model_out.read_bytes()).hexdigest()}")

    cases = read_cases(_read_member(args.sdist, GGUF_MEMBER + ".inp"), _read_member(args.sdist, GGUF_MEMBER + ".out"))
    doc = {
        "provenance": {
            "source": f"{SDIST_NAME}.tar.gz (PyPI sdist), sha256 {sdist_sha}",
            "files": [GGUF_MEMBER + ".inp", GGUF_MEMBER + ".out"],
            "licence": "llama.cpp, MIT License, Copyright (c) 2023-2026 The ggml authors",
            "meaning": "ids are the Llama-2 SentencePiece tokenization of text with no BOS/EOS "
            "(llama.cpp test-tokenizer-0, add_special=false); made by scripts/make_tokenizer_model.py",
        },
        "cases": cases,
    }
    args.cases_out.parent.mkdir(parents=True, exist_ok=True)
    args.cases_out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.cases_out} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
