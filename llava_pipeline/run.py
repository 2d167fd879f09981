"""Ask an exported LLaVA about a picture, with ExecuTorch's MultimodalRunner.

    python -m llava_pipeline.run --model_path=outputs/llava.pte \\
        --tokenizer_path=outputs/tokenizer.bin --image_path=outputs/image.pt \\
        --prompt="What is shown in this picture?" --seq_len=768 --temperature=0

Flags follow ExecuTorch's llava_main (``--flag=value`` or ``--flag value``).
``--image_path`` takes the pipeline's ``image.pt`` (uint8 CHW at the model's size)
or an ordinary image file, preprocessed as LLaVA-1.5's HF processor does (336 px
shortest edge, bicubic, center crop). The prompt is put in the LLaVA-1.5 chat
format unless ``--raw``. The answer streams to stdout; timings go to stderr.

``--interactive`` keeps the conversation, and its KV cache, across turns read
from stdin (one question a line; the image is given once, with the first turn).
Turns follow LLaVA-1.5's conversation format,
``USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:``: the answer's EOS (or,
for an answer cut at ``--max_new_tokens``, its last token and an EOS) goes into the
cache before the next ``USER``. When the next turn no longer fits in ``--seq_len``
positions the CLI says so and stops.

Bad input gives one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from llava_pipeline.base import rss
from llava_pipeline.formats.program_meta import read_program_meta
from llava_pipeline.formats.vocabulary import Vocabulary
from llava_pipeline.runtime.chat import Chat, Turn, first_prompt_ids
from llava_pipeline.runtime.runner import Runner, load_runtime_kernels, native_output_captured


class UsageError(Exception):
    """Bad input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UsageError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m llava_pipeline.run", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True, type=Path)
    p.add_argument("--tokenizer_path", required=True, type=Path)
    p.add_argument("--image_path", required=True, type=Path)
    p.add_argument("--prompt", help="the question (with --interactive: the first turn; else read from stdin)")
    p.add_argument(
        "--seq_len",
        type=int,
        default=None,
        help="total positions: prompt + image + answer(s); default: the model's context",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; at most 1")
    p.add_argument("--max_new_tokens", type=int, default=-1, help="per answer; -1: until EOS or --seq_len")
    p.add_argument("--raw", action="store_true", help="send the prompt as is (must contain <image>)")
    p.add_argument("--interactive", action="store_true", help="keep asking: one question a line on stdin")
    return p.parse_args(argv)


def _check_flags(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.temperature) and 0.0 <= args.temperature <= 1.0):
        raise UsageError(f"--temperature: {args.temperature} is outside [0, 1]")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq_len: {args.seq_len} must be positive")
    if args.max_new_tokens == 0 or args.max_new_tokens < -1:
        raise UsageError(f"--max_new_tokens: {args.max_new_tokens} must be positive (or -1: no limit)")
    if args.raw and args.interactive:
        raise UsageError("--raw and --interactive do not combine (follow-up turns use the chat format)")
    if args.prompt is None and not args.interactive:
        raise UsageError("--prompt is required (or --interactive to read it from stdin)")
    for flag, path in (
        ("--model_path", args.model_path),
        ("--tokenizer_path", args.tokenizer_path),
        ("--image_path", args.image_path),
    ):
        if not path.is_file():
            raise UsageError(f"{flag}: {path} not found")


def _load_pixels(path: Path, size: tuple[int, int]):
    from llava_pipeline.formats import image as image_mod  # torch: after the flags are checked

    try:
        return image_mod.load_pixels(path, size)
    except image_mod.ImageFileError as e:
        raise UsageError(f"--image_path: {e}") from None


def format_stats(turn: Turn, chat: Chat, image_tokens: int) -> list[str]:
    lines = []
    if turn.image_s is not None:
        lines.append(
            f"image encode: {turn.image_s:.3f} s (one prefill([image]) call: vision_encoder, then "
            f"text_decoder over its {image_tokens} embeddings)"
        )
    rate = turn.prompt_tokens / turn.prefill_s if turn.prefill_s > 0 else float("inf")
    lines.append(
        f"prefill: {turn.prefill_s:.3f} s for {turn.prompt_tokens} text tokens ({rate:.0f} tok/s; "
        f"up to the first answer token)"
    )
    steps = turn.tokens - 1
    if steps > 0 and turn.decode_s > 0:
        decode = f"{steps / turn.decode_s:.1f} tok/s ({steps} tokens after the first in {turn.decode_s:.3f} s)"
    else:
        decode = f"n/a ({turn.tokens} token)"
    stop = {
        "eos": "EOS",
        "max_new_tokens": "--max_new_tokens",
        "seq_len": "--seq_len reached",
        "unmappable": "a piece the tokenizer cannot map back",
    }.get(turn.stop, turn.stop)
    lines.append(f"decode: {decode}; stopped by {stop}; context {chat.pos}/{chat.seq_len} positions")
    if turn.resyncs:
        lines.append(f"resumed {turn.resyncs}x after pieces that are not UTF-8 on their own")
    lines.append(f"peak RSS: {rss.peak_mb():.0f} MiB (whole process so far, VmHWM)")
    return [f"[stats] {line}" for line in lines]


# ------------------------------------------------------------------ the command


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(parse_args(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
    _check_flags(args)
    with native_output_captured():  # library chatter on fds 1 and 2 while loading
        load_runtime_kernels()
        try:
            meta = read_program_meta(args.model_path)
        except ValueError as e:
            raise UsageError(f"--model_path: {e}") from None
        try:
            vocab = Vocabulary(args.tokenizer_path)
        except ValueError as e:
            raise UsageError(f"--tokenizer_path: {e}") from None
    if vocab.size != meta.vocab_size:
        raise UsageError(
            f"--tokenizer_path: {args.tokenizer_path} has {vocab.size} tokens but the model's vocabulary "
            f"has {meta.vocab_size} (text_decoder logits); use the tokenizer.bin exported with it"
        )
    seq_len = meta.max_context_len if args.seq_len is None else args.seq_len
    if seq_len > meta.max_context_len:
        raise UsageError(f"--seq_len: {seq_len} is above the model's maximum of {meta.max_context_len}")
    pixels = _load_pixels(args.image_path, meta.image_size)

    question = args.prompt
    if question is None:  # --interactive without --prompt: the first line is the first turn
        question = _read_question()
        if question is None:
            return 0
    try:
        before, after = first_prompt_ids(vocab, question, args.raw)
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from None
    needed = len(before) + meta.image_tokens + len(after)
    text_tokens = len(before) + len(after)
    if needed >= meta.max_context_len:
        raise UsageError(
            f"--prompt: {needed} tokens ({text_tokens} text + {meta.image_tokens} image) leave no room to answer "
            f"in the model's context of {meta.max_context_len}"
        )
    if max(len(before), len(after)) > meta.max_seq_len:
        raise UsageError(
            f"--prompt: a text segment of {max(len(before), len(after))} tokens is longer than "
            f"the model's longest prefill of {meta.max_seq_len}"
        )
    if needed >= seq_len:
        raise UsageError(
            f"--seq_len: {seq_len} is too small: the prompt takes {needed} positions ({text_tokens} text + "
            f"{meta.image_tokens} image); use at least {needed + 1}"
        )

    with native_output_captured() as log:
        try:
            runner = Runner(args.model_path, args.tokenizer_path, vocab=vocab, meta=meta)
        except RuntimeError as e:
            runner, failure = None, e
    if runner is None:
        raise UsageError(f"--model_path: the runner cannot load {args.model_path} ({failure}){_last_error(log)}")
    chat = Chat(runner, seq_len, args.temperature, args.max_new_tokens)

    turn = _ask(chat, lambda on_text: chat.first_turn(before, pixels, after, on_text))
    _report(turn, chat, meta.image_tokens)
    if not args.interactive:
        return 0
    while not chat.over:
        question = _read_question()
        if question is None:
            return 0
        try:
            ids = chat.next_ids(question)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if len(ids) > meta.max_seq_len:
            print(
                f"error: that turn has {len(ids)} tokens, more than the model's longest prefill of {meta.max_seq_len}",
                file=sys.stderr,
            )
            continue
        if not chat.fits(ids):
            chat.over = "context full"
            break
        _report(_ask(chat, lambda on_text: chat.next_turn(ids, on_text)), chat, meta.image_tokens)
    print(
        f"{chat.over}: {chat.pos} of --seq_len {chat.seq_len} positions are used, no room for another "
        "turn; ending the conversation",
        file=sys.stderr,
    )
    return 0


def _ask(chat: Chat, turn_fn) -> Turn:
    def on_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    # The native runner logs, and prints every token itself: keep that off the
    # terminal and stream through our callback instead.
    with native_output_captured() as log:
        try:
            turn, failure = turn_fn(on_text), None
        except RuntimeError as e:
            turn, failure = None, e
    print()
    if failure is not None:
        raise UsageError(f"generation failed: {failure}{_last_error(log)}")
    return turn


def _report(turn: Turn, chat: Chat, image_tokens: int) -> None:
    for line in format_stats(turn, chat, image_tokens):
        print(line, file=sys.stderr)


def _last_error(log: list[str]) -> str:
    lines = [line.strip() for line in (log[0] if log else "").splitlines() if "rror" in line]
    return f"; {lines[-1]}" if lines else ""


def _read_question() -> str | None:
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return None
        if line.strip():
            return line.rstrip("\r\n")


if __name__ == "__main__":
    sys.exit(main())
