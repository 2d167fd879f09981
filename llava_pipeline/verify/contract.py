"""What ExecuTorch's MultimodalRunner needs from the program, and the tokenizer beside it.

Methods `vision_encoder`, `token_embedding`, `text_decoder` and `get_max_seq_len` (a missing
`get_max_context_len` / `get_eos_ids` is a WARN: the runner has defaults); constant values equal
to the model's (cache length, EOS ids); input/output dtypes and shapes from `method_meta`
(vision uint8 [1, 3, H, W] -> float32 [1, N_img, D]; token_embedding int64 [1, S] -> float32
[1, S, D]; text_decoder float32 [1, S, D] + int64 [1] -> float32 [1, V]; dynamic S reported at
its upper bound); and that the tokenizer (llama2c `tokenizer.bin`) has exactly V ids, V the
decoder's logit width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_pipeline.base.methods import MAX_SEQ_LEN, REQUIRED
from llava_pipeline.verify.report import Report

OPTIONAL = ("get_max_context_len", "get_eos_ids")


@dataclass(frozen=True)
class AtLeast:
    """A dynamic dimension, reported at its upper bound, that must be at least `n`."""

    n: int

    def __str__(self) -> str:
        return f"S>={self.n}"


def spec_ok(got, want) -> bool:
    (dtype, sizes), (wdtype, wsizes) = got, want
    return (
        dtype == wdtype
        and len(sizes) == len(wsizes)
        and all(s >= w.n if isinstance(w, AtLeast) else s == w for s, w in zip(sizes, wsizes))
    )


def spec_str(spec) -> str:
    dtype, sizes = spec
    return f"{dtype} [{', '.join(str(s) for s in sizes)}]"


def check_contract(report: Report, desc: dict, args) -> int | None:
    """Rows for methods, constants and tensor metas; returns the logit width (None if unknown)."""
    names = set(desc["methods"])
    missing = [m for m in REQUIRED if m not in names]
    report.add(
        "program",
        "required methods",
        f"missing {missing}" if missing else "all present",
        ", ".join(REQUIRED),
        not missing,
    )
    consts = desc["constants"]
    seq = args.text.max_seq_len
    eos = list(args.text.eos_token_ids)
    expect = {  # name: (check, threshold text)
        MAX_SEQ_LEN: (lambda v: v == [seq], f"== [{seq}]"),
        "get_max_context_len": (lambda v: len(v) == 1 and 0 < v[0] <= seq, f"<= [{seq}] (the cache)"),
        "get_eos_ids": (lambda v: v == eos, f"== {eos}"),
    }
    for name, (ok, text) in expect.items():
        if name in consts:
            report.add(name, "value", str(consts[name]), text, ok(consts[name]))
        elif name in OPTIONAL:
            report.warn(name, "value", "absent (runner uses its default)", text)

    from llava_pipeline.formats.runner_image import MAX_CHANNELS  # imports torch; the contract checks before it do not

    v, t = args.vision, args.text
    n_img, d, vocab = v.num_image_tokens, t.hidden_size, t.vocab_size
    text_room = seq - n_img  # longest text chunk the context can hold
    specs = {
        # The input's bounds: 1..4 channels, sides 1..image_size (runner_image.py).
        "vision_encoder": ([("uint8", [1, MAX_CHANNELS, v.image_size, v.image_size])], [("float32", [1, n_img, d])]),
        "token_embedding": ([("int64", [1, AtLeast(text_room)])], [("float32", [1, AtLeast(text_room), d])]),
        "text_decoder": ([("float32", [1, AtLeast(n_img), d]), ("int64", [1])], [("float32", [1, vocab])]),
    }
    width = None
    for method, (inputs, outputs) in specs.items():
        meta = desc["metas"].get(method)
        if meta is None:
            continue  # already failed as a missing method
        for kind, wants, gots in (("input", inputs, meta["inputs"]), ("output", outputs, meta["outputs"])):
            for i, want in enumerate(wants):
                got = gots[i] if i < len(gots) else None
                report.add(
                    method,
                    f"{kind} {i}",
                    spec_str(got) if got else "absent",
                    spec_str(want),
                    got is not None and spec_ok(got, want),
                )
            if len(gots) > len(wants):
                report.add(method, f"{kind}s", f"{len(gots)}", f"{len(wants)}", False)
    outs = desc["metas"].get("text_decoder", {}).get("outputs")
    if outs:
        width = outs[0][1][-1]
    return width


def check_tokenizer(report: Report, path: Path | None, width: int | None):
    """Row for the tokenizer's vocab vs the logit width; returns the loaded tokenizer if it
    covers exactly the model's vocab, else None."""
    if path is None:
        report.warn("tokenizer", "vocab_size", "no tokenizer.bin beside the .pte: not checked")
        return None
    from pytorch_tokenizers import CppLlama2cTokenizer

    tok = CppLlama2cTokenizer()
    try:
        tok.load(str(path))
        size = tok.vocab_size()
    except RuntimeError as e:
        size = f"unreadable ({e})"
    passed = size == width
    report.add("tokenizer", "vocab_size == text_decoder logit width", str(size), f"== {width}", passed)
    return tok if passed else None
