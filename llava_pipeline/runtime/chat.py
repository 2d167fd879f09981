"""A LLaVA-1.5 conversation about one image on the project's ``Runner`` (ExecuTorch's
MultimodalRunner), its KV cache kept across turns: what ``python -m llava_pipeline.run``, the
evaluate stage and the runtime benchmark ask the program through.

Turns follow LLaVA-1.5's conversation format,
``USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:``: the answer's EOS (or, for an
answer cut at ``max_new_tokens``, its last token and an EOS) goes into the cache before the
next ``USER``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from llava_pipeline.formats import tokenizer as tok_mod
from llava_pipeline.runtime.runner import image_input, token_input


def first_prompt_ids(vocab, prompt: str, raw: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a first turn's text before and after the image: ``prompt`` put in the
    LLaVA-1.5 chat format (``raw``: as is, it must contain <image>); BOS first. ValueError
    for a prompt the format does not take."""
    segments = tok_mod.split_prompt(prompt) if raw else tok_mod.runner_prompt_segments(prompt)
    before = vocab.encode(segments.before_image, vocab.bos, 0) if segments.before_image else [vocab.bos]
    after = vocab.encode(segments.after_image, 0, 0) if segments.after_image else []
    return before, after


@dataclass
class Turn:
    """Timings of one answer (seconds, time.perf_counter differences)."""

    prompt_tokens: int  # text tokens prefilled for this turn
    prefill_s: float  # those tokens' prefill, up to the first answer token
    tokens: int  # answer tokens sampled (an EOS included)
    decode_s: float  # from the first to the last answer token
    stop: str
    image_s: float | None = None  # first turn: the separate prefill([image]) call
    resyncs: int = 0


class Chat:
    """A LLaVA-1.5 conversation about one image on a ``Runner``, its KV cache kept."""

    def __init__(self, runner, seq_len: int, temperature: float, max_new_tokens: int):
        self.runner = runner
        self.vocab = runner.vocab
        self.seq_len = seq_len
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.pending: list[int] = []  # tokens that close the previous answer, fed before the next turn
        self.over = ""  # why the conversation cannot go on, once it cannot

    @property
    def pos(self) -> int:
        return self.runner.pos

    def first_turn(self, before: list[int], pixels, after: list[int], on_text) -> Turn:
        image = image_input(pixels, max(self.runner.meta.image_size))  # a bad picture fails before any prefill
        t0 = time.perf_counter()
        self.runner.prefill([token_input(before)])
        t1 = time.perf_counter()
        if after:
            self.runner.prefill([image])
            image_s, last = time.perf_counter() - t1, [token_input(after)]
        else:  # a raw prompt ending in <image>: the image is the last input, prefilled by generate()
            image_s, last = None, [image]
        turn = self._answer(last, on_text)
        turn.prefill_s += t1 - t0
        turn.prompt_tokens = len(before) + len(after)
        turn.image_s = image_s
        return turn

    def next_ids(self, question: str) -> list[int]:
        """Token ids of a follow-up turn: the previous answer's closing tokens, then
        ``USER: {question} ASSISTANT:`` (with the dummy prefix SentencePiece gives it)."""
        tok_mod.runner_prompt_segments(question)  # same checks as the first turn (ValueError)
        return self.pending + self.vocab.encode(f"USER: {question} ASSISTANT:", 0, 0)

    def fits(self, ids: list[int]) -> bool:
        return self.pos + len(ids) < self.seq_len  # room for the turn and one answer token

    def next_turn(self, ids: list[int], on_text) -> Turn:
        turn = self._answer([token_input(ids)], on_text)
        turn.prompt_tokens = len(ids)
        return turn

    def _answer(self, inputs: list, on_text) -> Turn:
        gen = self.runner.generate(
            inputs,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            num_bos=0,
            seq_len=self.seq_len,
            on_text=on_text,
        )
        if gen.stop == "eos":
            self.pending = [gen.eos_id]
        elif gen.stop == "max_new_tokens" and gen.pending_id is not None:
            self.pending = [gen.pending_id, self.vocab.eos]
        elif gen.stop == "max_new_tokens":
            self.pending, self.over = [], "the answer's last piece maps to no token id"
        else:
            self.pending, self.over = [], "context full"

        t_first = gen.t_first if gen.t_first is not None else time.perf_counter()
        return Turn(
            prompt_tokens=0,
            prefill_s=t_first - gen.t_start,
            tokens=gen.tokens,
            decode_s=(gen.t_last or t_first) - t_first,
            stop=gen.stop,
            resyncs=gen.resyncs,
        )
