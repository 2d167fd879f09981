"""What a .pte declares about itself, read before running it: its methods, the constants the
runner reads (`get_max_seq_len`, `get_max_context_len`, `get_vocab_size`, `get_eos_ids`) and the
vision encoder's and text decoder's tensor shapes. Only the constant methods are loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_pipeline.base.methods import MAX_SEQ_LEN, REQUIRED


@dataclass(frozen=True)
class ProgramMeta:
    """What the CLI needs to know about a .pte before running it."""

    methods: frozenset[str]
    max_seq_len: int  # longest single prefill
    max_context_len: int  # KV-cache positions (the runner's limit on prompt + answer)
    vocab_size: int  # width of text_decoder's logits
    declared_vocab_size: int | None  # the get_vocab_size constant, if any
    eos_ids: tuple[int, ...]
    image_size: tuple[int, int]  # (H, W) the vision encoder takes
    image_tokens: int  # positions one image takes in the KV cache


def _load_program(path: Path):
    try:  # the public executorch.runtime wrapper imports executorch.exir (~4 s) first
        from executorch.extension.pybindings import _C

        return _C._load_program(str(path))
    except ImportError:
        from executorch.runtime import Runtime

        return Runtime.get().load_program(str(path))._program


def read_program_meta(path: Path) -> ProgramMeta:
    """Read constants and tensor shapes from a .pte, loading only its constant methods.

    Raises ValueError (one line) if the file is not an ExecuTorch program or lacks
    a method the runner needs."""
    try:
        program = _load_program(path)
        names = frozenset(program.get_method_name(i) for i in range(program.num_methods()))
    except RuntimeError as e:
        raise ValueError(f"{path} is not a loadable ExecuTorch program ({e})") from None
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise ValueError(f"{path} lacks the method(s) {', '.join(missing)} that the runner needs")

    def constant(name: str) -> list[int] | None:
        if name not in names:
            return None
        return [int(v) for v in program.load_method(name).call([])]

    try:
        declared = constant(MAX_SEQ_LEN)
        assert declared is not None  # one of the REQUIRED methods, checked above
        max_seq_len = declared[0]
        context = constant("get_max_context_len")
        vocab = constant("get_vocab_size")
        eos = constant("get_eos_ids") or []
        vision = program.method_meta("vision_encoder")
        image_in, image_out = vision.input_tensor_meta(0).sizes(), vision.output_tensor_meta(0).sizes()
        logits = program.method_meta("text_decoder").output_tensor_meta(0).sizes()
    except (RuntimeError, IndexError) as e:
        raise ValueError(f"{path}: cannot read the program's metadata ({e})") from None
    return ProgramMeta(
        methods=names,
        max_seq_len=max_seq_len,
        max_context_len=context[0] if context else max_seq_len,
        vocab_size=int(logits[-1]),
        declared_vocab_size=vocab[0] if vocab else None,
        eos_ids=tuple(eos),
        image_size=(int(image_in[-2]), int(image_in[-1])),
        image_tokens=int(image_out[-2]),
    )
