"""The runner's tokenizer (an llama2c tokenizer.bin) as ExecuTorch's C++ runner reads it: token id
to the bytes its token callback gets and back (`Vocabulary`), and those bytes to text as they
stream in (`Utf8Stream`)."""

from __future__ import annotations

import codecs
import struct
from pathlib import Path


def _llama2c_raw_pieces(path: Path) -> list[bytes] | None:
    """The stored piece strings of an llama2c tokenizer.bin (header of 4 uint32, then per
    id float32 score, uint32 length, bytes); None if the file does not parse as one."""
    data = Path(path).read_bytes()
    try:
        n = struct.unpack_from("<I", data, 0)[0]
        off, pieces = 16, []
        for _ in range(n):
            length = struct.unpack_from("<I", data, off + 4)[0]
            pieces.append(data[off + 8 : off + 8 + length])
            off += 8 + length
    except struct.error:
        return None
    return pieces


def _is_byte_piece(raw: bytes) -> bool:
    return len(raw) == 6 and raw.startswith(b"<0x") and raw.endswith(b">")


class Vocabulary:
    """The runner's tokenizer (an llama2c tokenizer.bin) as pytorch_tokenizers' C++ code reads it.

    ``piece(id)`` is the bytes the runner's token callback gets for that token;
    ``id_of(bytes)`` maps them back. Where several ids decode to the same bytes (in
    Llama-2, the ASCII byte-fallback pieces ``<0x20>``..``<0x7E>`` and the ordinary
    one-character pieces) it prefers the ordinary piece: trained models practically
    never emit a byte-fallback piece for a character the vocabulary has.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        pieces: list[bytes] | None = None,
        bos: int = 1,
        eos: int = 2,
        byte_fallback: frozenset[int] = frozenset(),
    ):
        self._tok = None
        # without a file the pieces are given (none: an empty vocabulary); with one, read lazily
        self._pieces = pieces if pieces is not None or path is not None else []
        self._byte_fallback = byte_fallback
        self._ids: dict[bytes, int] | None = None
        self._path = path
        if path is None:
            self.size, self.bos, self.eos = len(pieces or []), bos, eos
            return
        from pytorch_tokenizers import CppLlama2cTokenizer

        tok = CppLlama2cTokenizer()
        try:
            tok.load(str(path))
        except RuntimeError as e:
            raise ValueError(f"{path} is not an llama2c tokenizer.bin ({e})") from None
        self._tok = tok
        self.size, self.bos, self.eos = tok.vocab_size(), tok.bos_tok(), tok.eos_tok()

    def encode(self, text: str, bos: int = 0, eos: int = 0) -> list[int]:
        """Token ids as the runner's tokenizer encodes ``text`` (a dummy prefix included)."""
        if self._tok is None:
            raise ValueError("this vocabulary has no encoder")
        return list(self._tok.encode(text, bos, eos))

    def piece(self, token_id: int) -> bytes:
        if self._pieces is not None:
            return self._pieces[token_id]
        assert self._tok is not None  # no pieces given: loaded from the file
        try:
            return self._tok.decode(token_id).encode("utf-8")
        except UnicodeDecodeError as e:
            return bytes(e.object)

    def id_of(self, raw: bytes) -> int | None:
        ids = self._ids if self._ids is not None else self._build_index()
        return ids.get(raw)

    def _build_index(self) -> dict[bytes, int]:
        if self._pieces is None:
            assert self._path is not None  # no pieces given: they are the file's
            self._pieces = [self.piece(i) for i in range(self.size)]
            stored = _llama2c_raw_pieces(self._path)
            if stored is not None and len(stored) == self.size:
                self._byte_fallback = frozenset(i for i, s in enumerate(stored) if _is_byte_piece(s))
        ids: dict[bytes, int] = {}
        for i, raw in enumerate(self._pieces):
            if raw not in ids or (ids[raw] in self._byte_fallback and i not in self._byte_fallback):
                ids[raw] = i
        self._ids = ids
        return ids


class Utf8Stream:
    """Bytes of successive pieces in, text out: an incomplete UTF-8 sequence is held back
    until its last byte arrives; bytes that can never form a character become U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
