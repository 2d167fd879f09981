"""Running an exported .pte with ExecuTorch's C++ MultimodalRunner (Python binding).

The binding does not carry the LLM custom kernels (update_cache, custom_sdpa)
nor the quantized kernels (embedding_byte, ...): they are registered by
importing their modules before the first generate().
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


def load_kernels() -> None:
    """Register the custom LLM ops and quantized kernels with the runtime."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


@dataclass
class Generation:
    pieces: list[str] = field(default_factory=list)  # decoded text of each new token
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def image_input(pixels: torch.Tensor):
    """A runner image input from a uint8 CHW (or 1xCHW) tensor."""
    from executorch.extension.llm.runner import make_image_input

    if pixels.dim() == 4:
        pixels = pixels[0]
    return make_image_input(pixels.contiguous())


def token_input(ids: list[int]):
    from executorch.extension.llm.runner import make_token_input

    return make_token_input([int(i) for i in ids])


def text_input(text: str):
    from executorch.extension.llm.runner import make_text_input

    return make_text_input(text)


@contextlib.contextmanager
def native_output_captured():
    """Capture what native code writes to fds 1 and 2 (the runner prints every token
    and its logs itself). Python's sys.stdout keeps writing to the real stdout.
    Yields a list that receives the captured text when the block exits."""
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    real_stdout = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    old_stdout = sys.stdout
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        sys.stdout = real_stdout
        try:
            yield captured
        finally:
            real_stdout.flush()
            sys.stdout = old_stdout
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            real_stdout.close()
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))


class Runner:
    """A MultimodalRunner over one .pte + tokenizer."""

    def __init__(self, model_path: Path, tokenizer_path: Path):
        load_kernels()
        from executorch.extension.llm.runner import MultimodalRunner

        self._runner = MultimodalRunner(str(model_path), str(tokenizer_path))

    def generate(
        self,
        inputs: list,
        max_new_tokens: int,
        temperature: float = 0.0,
        num_bos: int = 0,
        seq_len: int = -1,
        on_piece: Callable[[str], None] | None = None,
    ) -> Generation:
        from executorch.extension.llm.runner import GenerationConfig

        out = Generation()

        def piece(text: str) -> None:
            out.pieces.append(text)
            if on_piece is not None:
                on_piece(text)

        def stats(s) -> None:
            import json

            out.stats = json.loads(s.to_json_string())

        config = GenerationConfig(
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seq_len=seq_len,
            echo=False,
            num_bos=num_bos,
        )
        self._runner.generate(inputs, config, piece, stats)
        return out

    def reset(self) -> None:
        self._runner.reset()
