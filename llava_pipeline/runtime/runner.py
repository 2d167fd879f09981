"""Running an exported .pte with ExecuTorch's C++ MultimodalRunner (Python binding).

Kernels: the binding does not carry the LLM custom kernels (update_cache,
custom_sdpa) nor the quantized kernels (embedding_byte, ...). ``load_kernels``
imports their Python modules (which also registers the eager torch ops, for
code that runs the eager model); ``load_runtime_kernels`` only loads the two
shared libraries, which is all the runner needs and seconds faster.

Text that is not valid UTF-8 piece by piece. The runner hands each new token's
text to the Python callback as a ``str``, and the binding decodes it as strict
UTF-8 first. A byte-fallback piece (``<0x80>`` .. ``<0xFF>``, one byte of an emoji
or of a CJK character missing from the vocabulary) is not valid UTF-8 on its own:
the conversion raises ``UnicodeDecodeError`` inside the C++ decode loop, the
exception unwinds through it and generation stops. Observed with executorch
1.5.1 (tests/test_run_cli.py checks it on the real binding):

- the exception reaches Python intact, ``.object`` holding the piece's raw bytes,
  and the process and the runner stay usable;
- the runner's position stays where that ``generate()`` call's prefill left it,
  while its KV cache already holds the tokens the decode loop fed after it;
- the token whose text failed was sampled but not fed (the runner never feeds the
  last token it samples, exactly as when a generation ends normally).

``Runner.generate`` therefore catches it, maps the raw bytes (and the pieces
before it) back to token ids with the runner's own tokenizer, feeds the tokens the
runner had already decoded again one at a time (the decode loop's shape at the
same positions: the cache gets the same values), and resumes with the failed token
as the next input. Text goes out through ``Utf8Stream``, which holds an incomplete
UTF-8 sequence back until its last byte arrives. With greedy decoding the result
is token for token what an uninterrupted run would give. (``generate_text`` does
not raise mid-way but only returns at the end, without streaming, and then fails
on the whole text's conversion.)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llava_pipeline.formats.program_meta import ProgramMeta, read_program_meta
from llava_pipeline.formats.vocabulary import Utf8Stream, Vocabulary


def load_kernels() -> None:
    """Register the custom LLM ops and quantized kernels with the runtime (and with eager torch)."""
    import executorch.extension.llm.custom_ops.custom_ops  # llama::update_cache, custom_sdpa
    import executorch.kernels.quantized  # noqa: F401


_RUNTIME_KERNEL_LIBS = (
    "extension/llm/custom_ops/*custom_ops_aot_lib.*",
    "kernels/quantized/*quantized_ops_aot_lib.*",
)


_runtime_kernels_loaded = False


def load_runtime_kernels() -> None:
    """Register the same kernels with the ExecuTorch runtime by loading their shared
    libraries only (importing the Python modules pulls in executorch.exir and torchao,
    ~4 s). Falls back to ``load_kernels`` where the libraries are not found."""
    global _runtime_kernels_loaded
    if _runtime_kernels_loaded:
        return
    import importlib.util

    import torch  # the libraries link against libtorch

    spec = importlib.util.find_spec("executorch")
    root = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else None
    libs = [next(iter(sorted(root.glob(pattern))), None) if root else None for pattern in _RUNTIME_KERNEL_LIBS]
    if None in libs:
        load_kernels()
    else:
        for lib in libs:
            torch.ops.load_library(str(lib))
    _runtime_kernels_loaded = True


def image_input(pixels, max_side: int | None = None):
    """A runner image input from a uint8 CHW (or 1xCHW) tensor, as llava_main builds one: C is
    1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA), planar. The .pte's encoder takes sides up
    to the model's image size (`max_side`, checked when given: a larger picture otherwise fails
    inside generate() with a bare "Generation failed"). Raises ValueError naming the fault."""
    from executorch.extension.llm.runner import Image, MultimodalInput, make_image_input

    from llava_pipeline.formats.runner_image import check_image  # imports torch, which this module's top level does not

    check_image(pixels, max_side)
    if pixels.dim() == 4:
        pixels = pixels[0]
    if pixels.shape[0] in (3, 4):
        return make_image_input(pixels.contiguous())
    # make_image_input takes 3 or 4 channels only; the Image class takes what stb decodes.
    c, h, w = pixels.shape
    return MultimodalInput(Image(pixels.contiguous().flatten().tolist(), w, h, c))


def token_input(ids: list[int]):
    from executorch.extension.llm.runner import make_token_input

    return make_token_input([int(i) for i in ids])


def text_input(text: str):
    from executorch.extension.llm.runner import make_text_input

    return make_text_input(text)


@contextlib.contextmanager
def native_output_captured():
    """Capture what native code writes to fds 1 and 2 (the runner prints every token
    and its logs itself; Python's own stderr goes there too). ``sys.stdout`` keeps
    writing to the real stdout. Yields a list that receives the captured text when
    the block exits."""
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    real_stdout = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding=encoding, errors="replace")
    old_stdout = sys.stdout
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        sys.stdout = real_stdout
        try:
            yield captured
        finally:
            real_stdout.flush()
            sys.stderr.flush()
            sys.stdout = old_stdout
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            real_stdout.close()
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))


# ------------------------------------------------------------------ generation


@dataclass
class Generation:
    piece_bytes: list[bytes] = field(default_factory=list)  # each new token's text, raw (EOS left out)
    stats: dict = field(default_factory=dict)  # the runner's Stats of its last completed generate()
    stop: str = ""  # "eos", "max_new_tokens", "seq_len" (the context limit) or "unmappable"
    pending_id: int | None = None  # the last token shown: sampled but not in the KV cache yet
    eos_id: int | None = None  # the EOS token that ended it, if one did (not in the cache either)
    resyncs: int = 0  # times generation resumed after a piece the binding could not pass on
    tokens: int = 0  # tokens sampled, the EOS included
    t_start: float = 0.0  # time.perf_counter() at the call, the first and the last token
    t_first: float | None = None
    t_last: float | None = None

    @property
    def pieces(self) -> list[str]:
        """Each token's text; a piece that is not UTF-8 on its own keeps its bytes as
        surrogate escapes (``"".join(pieces).encode("utf-8", "surrogateescape")`` is exact)."""
        return [b.decode("utf-8", errors="surrogateescape") for b in self.piece_bytes]

    @property
    def text(self) -> str:
        return b"".join(self.piece_bytes).decode("utf-8", errors="replace")


class Runner:
    """A MultimodalRunner over one .pte + tokenizer that keeps track of its KV-cache position.

    ``pos`` counts the positions filled (None when unknown: text inputs are encoded by
    the runner, which decides about BOS; it is known again after a generate()).
    ``binding``/``vocab``/``meta`` replace the real runner, tokenizer and .pte
    metadata (tests)."""

    def __init__(
        self,
        model_path: Path | None,
        tokenizer_path: Path | None,
        *,
        binding=None,
        vocab: Vocabulary | None = None,
        meta: ProgramMeta | None = None,
    ):
        if binding is None:
            load_runtime_kernels()
            from executorch.extension.llm.runner import MultimodalRunner

            binding = MultimodalRunner(str(model_path), str(tokenizer_path))
        self._runner = binding
        self.vocab = vocab if vocab is not None else Vocabulary(tokenizer_path)
        if meta is None:
            assert model_path is not None, "a Runner without meta reads it from model_path"
            meta = read_program_meta(model_path)
        self.meta = meta
        self._eos = {self.vocab.piece(i): i for i in (self.meta.eos_ids or (self.vocab.eos,))}
        self.pos: int | None = 0

    def reset(self) -> None:
        self._runner.reset()
        self.pos = 0

    def _positions(self, inputs: list) -> int | None:
        total = 0
        for inp in inputs:
            if inp.is_tokens():
                total += len(inp.get_tokens())
            elif inp.is_image():
                total += self.meta.image_tokens
            else:
                return None
        return total

    def _advance(self, inputs: list) -> None:
        n = self._positions(inputs)
        self.pos = None if n is None or self.pos is None else self.pos + n

    def prefill(self, inputs: list) -> None:
        """Put inputs in the KV cache without generating (raises RuntimeError on failure)."""
        try:
            self._runner.prefill(inputs)
        except BaseException:
            self.pos = None
            raise
        self._advance(inputs)

    def generate(
        self,
        inputs: list,
        max_new_tokens: int,
        temperature: float = 0.0,
        num_bos: int = 0,
        seq_len: int = -1,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Prefill ``inputs`` and generate until EOS, ``max_new_tokens`` tokens (-1: no
        limit) or ``seq_len`` positions (-1: the model's context). ``on_text`` gets the
        answer's text as it completes (never a partial UTF-8 character, never the EOS)."""
        from executorch.extension.llm.runner import GenerationConfig

        out = Generation(t_start=time.perf_counter())
        stream = Utf8Stream()
        held: list[bytes] = []  # an EOS-looking piece, until we know it ended generation
        failed: list[BaseException] = []  # what our own callback raised

        def emit(raw: bytes) -> None:
            out.tokens += 1
            out.t_last = time.perf_counter()
            out.t_first = out.t_first or out.t_last
            if held:
                show(held.pop())
            if raw in self._eos:
                held.append(raw)
            else:
                show(raw)

        def show(raw: bytes) -> None:
            out.piece_bytes.append(raw)
            text = stream.feed(raw)
            if text and on_text is not None:
                on_text(text)

        cap = self.meta.max_context_len if seq_len <= 0 else min(seq_len, self.meta.max_context_len)
        remaining = max_new_tokens
        segment_inputs = list(inputs)
        while True:
            segment: list[bytes] = []
            self._advance(segment_inputs)  # where the runner's position is once they are prefilled

            def on_token(piece: str) -> None:
                try:
                    raw = piece.encode("utf-8")  # lossless: the binding decoded it from these bytes
                    segment.append(raw)
                    emit(raw)
                except BaseException as e:
                    failed.append(e)
                    raise

            def on_stats(s) -> None:
                out.stats = json.loads(s.to_json_string())

            config = GenerationConfig(
                temperature=temperature, max_new_tokens=remaining, seq_len=seq_len, echo=False, num_bos=num_bos
            )
            try:
                self._runner.generate(segment_inputs, config, on_token, on_stats)
            except UnicodeDecodeError as e:
                if failed:
                    self.pos = None
                    raise failed[0] from None
                raw = bytes(e.object)
                segment.append(raw)
                emit(raw)
            except BaseException:
                self.pos = None
                raise
            else:
                self._finish(out, segment, held, remaining)
                break
            # Resume: the runner's position is still right after this segment's prefill.
            ids = self._ids_of(segment)
            if ids is None:
                out.stop = "unmappable"
                break
            for token in ids[:-1]:  # already in the cache; feeding them again moves the position on
                self._runner.prefill([token_input([token])])
            if self.pos is not None:
                self.pos += len(ids) - 1
            out.resyncs += 1
            if remaining > 0:
                remaining -= len(segment)
            if remaining == 0 or (self.pos is not None and self.pos + 1 >= cap):
                out.stop, out.pending_id = ("max_new_tokens" if remaining == 0 else "seq_len"), ids[-1]
                break
            segment_inputs = [token_input([ids[-1]])]
        tail = stream.flush()
        if tail and on_text is not None:
            on_text(tail)
        return out

    def _finish(self, out: Generation, segment: list[bytes], held: list[bytes], remaining: int) -> None:
        s = out.stats
        if s:
            self.pos = int(s["prompt_tokens"]) + int(s["generated_tokens"])
        if held:  # the runner stops right after an EOS
            out.stop, out.eos_id = "eos", self._eos[held.pop()]
            return
        out.stop = "max_new_tokens" if 0 < remaining <= len(segment) else "seq_len"
        out.pending_id = self.vocab.id_of(segment[-1]) if segment else None

    def _ids_of(self, segment: list[bytes]) -> list[int] | None:
        ids: list[int] = []
        for raw in segment:
            token = self.vocab.id_of(raw)
            if token is None and ids and ids[-1] == self.vocab.bos:
                token = self.vocab.id_of(b" " + raw)  # the decoder drops a leading space after BOS
            if token is None:
                return None
            ids.append(token)
        return ids
