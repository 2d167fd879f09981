"""Scoring an exported .pte against the transformers reference (llava_pipeline.pipeline.reference).

Two passes over the eval items, one program resident at a time:

1. answers: ExecuTorch's MultimodalRunner (the path `llava_main` and the apps run) answers
   each question greedily from a reset cache: text before the image, the image, text after,
   up to `max_new_tokens` or EOS. Timed per item (image encode, prefill, decode).
2. teacher forcing: the program's own methods (token_embedding, vision_encoder,
   text_decoder, through ExecuTorch's pybindings) are fed the prompt and then the reference's answer
   token by token; the logits at each answer position are compared with the reference's.

Metrics (`quality_metrics`), all deterministic for a given program and reference:

- accuracy.<type> / ref_accuracy.<type>: exact answers (stripped text equal to the right
  answer) of the .pte and of the reference, per question type, where right answers exist;
- agreement: share of items whose .pte answer equals the reference's answer;
- top1: share of answer tokens where the .pte's argmax is the reference's;
- kl: mean KL(reference || .pte) per answer token, as llama.cpp's `perplexity
  --kl-divergence` reports it, over the reference's top_k tokens plus one bucket for the
  rest of the vocabulary (a lower bound of the full KL, equal to it when the rest is ~0);
- ppl / ref_ppl: perplexity of the reference answers under the .pte and the reference;
- size_mb.<method>: the .pte's bytes per method.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from llava_pipeline.base.errors import PipelineError
from llava_pipeline.formats.tokenizer import _load_llama2c, runner_prompt_token_segments
from llava_pipeline.runtime.chat import Chat, first_prompt_ids
from llava_pipeline.runtime.runner import Runner, load_runtime_kernels, native_output_captured

MB = 1 << 20


@dataclass
class Answer:
    text: str
    image_s: float
    prefill_s: float
    prompt_tokens: int
    tokens: int
    decode_s: float


def runner_answers(
    pte: Path,
    tokenizer: Path,
    records: list[dict],
    pixels: dict[str, torch.Tensor],
    max_new_tokens: int,
    progress: Callable[[Iterable], Iterable] = iter,
) -> list[Answer]:
    """Greedy answers of ExecuTorch's MultimodalRunner, one per reference record."""
    with native_output_captured():
        runner = Runner(pte, tokenizer)
    out = []
    for rec in progress(records):
        runner.reset()
        chat = Chat(runner, runner.meta.max_context_len, 0.0, max_new_tokens)
        before, after = first_prompt_ids(runner.vocab, rec["question"])
        pieces: list[str] = []
        with native_output_captured():
            turn = chat.first_turn(before, pixels[rec["image"]], after, pieces.append)
        out.append(
            Answer(
                "".join(pieces).strip(),
                turn.image_s or 0.0,
                turn.prefill_s,
                turn.prompt_tokens,
                turn.tokens,
                turn.decode_s,
            )
        )
    del runner
    return out


def teacher_forced(
    pte: Path,
    tokenizer: Path,
    records: list[dict],
    pixels: dict[str, torch.Tensor],
    progress: Callable[[Iterable], Iterable] = iter,
) -> list[torch.Tensor]:
    """Per record, the .pte's log-probabilities [n_answer, V] at the reference answer's positions:
    the prompt prefilled as the runner does (text, image, text), then the reference answer fed
    one token at a time through the program's own methods."""
    # The extension module itself: the portable_lib wrapper imports executorch.exir (seconds).
    from executorch.extension.pybindings._C import _load_for_executorch

    load_runtime_kernels()
    vocab = _load_llama2c(tokenizer)
    with native_output_captured():
        module = _load_for_executorch(str(pte))

    def run(method: str, *inputs) -> torch.Tensor:
        return module.run_method(method, inputs)[0].clone()  # outputs alias planned memory

    def last_logits(x: torch.Tensor, pos: int) -> torch.Tensor:
        logits = run("text_decoder", x, torch.tensor([pos]))
        return logits.reshape(-1, logits.shape[-1])[-1]

    image, features = None, None
    out = []
    for rec in progress(records):
        before, after = runner_prompt_token_segments(vocab, rec["question"])
        if rec["image"] != image:
            image, features = rec["image"], run("vision_encoder", pixels[rec["image"]].unsqueeze(0))
        assert features is not None  # encoded at the first record (image starts as None)
        chunks = [run("token_embedding", torch.tensor([before])), features]
        if after:
            chunks.append(run("token_embedding", torch.tensor([after])))
        pos = 0
        for x in chunks:
            logits = last_logits(x, pos)
            pos += x.shape[1]
        rows = [logits]
        for tok in rec["ids"][:-1]:
            rows.append(last_logits(run("token_embedding", torch.tensor([[tok]])), pos))
            pos += 1
        out.append(torch.log_softmax(torch.stack(rows).float(), dim=-1))
    return out


def _kl_top_k(ref_ids: list[int], ref_logp: list[float], logp: torch.Tensor) -> float:
    """KL(p || q) over the reference's top-k tokens plus one bucket for the rest."""
    p = torch.tensor(ref_logp, dtype=torch.float64).exp()
    q = logp[torch.tensor(ref_ids)].double().exp()
    p_rest, q_rest = max(0.0, 1.0 - float(p.sum())), max(1e-30, 1.0 - float(q.sum()))
    kl = float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum())
    if p_rest > 0:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(0.0, kl)


def _share(hits: list[bool]) -> float:
    return round(sum(hits) / len(hits), 4) if hits else 0.0


def quality_metrics(
    records: list[dict], answers: list[Answer], logps: list[torch.Tensor], method_bytes: dict[str, int]
) -> dict:
    """The deterministic metrics of the module docstring, as a flat-ish dict for DVC."""
    by_type: dict[str, list[bool]] = {}
    ref_by_type: dict[str, list[bool]] = {}
    agree, top1, kls, logp_pte, logp_ref = [], [], [], [], []
    for rec, ans, lp in zip(records, answers, logps):
        if rec["answer"] is not None:
            by_type.setdefault(rec["qtype"], []).append(ans.text == rec["answer"])
            ref_by_type.setdefault(rec["qtype"], []).append(rec["text"] == rec["answer"])
        agree.append(ans.text == rec["text"])
        for i, tok in enumerate(rec["ids"]):
            top1.append(int(lp[i].argmax()) == rec["top_ids"][i][0])
            kls.append(_kl_top_k(rec["top_ids"][i], rec["top_logp"][i], lp[i]))
            logp_pte.append(float(lp[i, tok]))
            logp_ref.append(rec["logp"][i])
    out: dict = {}
    if by_type:
        out["accuracy"] = {k: _share(v) for k, v in sorted(by_type.items())}
        out["ref_accuracy"] = {k: _share(v) for k, v in sorted(ref_by_type.items())}
    out["agreement"] = _share(agree)
    out["top1"] = _share(top1)
    out["kl"] = round(statistics.fmean(kls), 5) if kls else 0.0
    out["ppl"] = round(math.exp(-statistics.fmean(logp_pte)), 4) if logp_pte else 0.0
    out["ref_ppl"] = round(math.exp(-statistics.fmean(logp_ref)), 4) if logp_ref else 0.0
    out["size_mb"] = {k: round(v / MB, 3) for k, v in sorted(method_bytes.items())}
    out["items"] = len(records)
    return out


def speed_metrics(answers: list[Answer]) -> dict:
    """Run-time figures of the runner pass (medians per item; decode over all tokens)."""
    steps = sum(max(0, a.tokens - 1) for a in answers)
    decode_s = sum(a.decode_s for a in answers if a.tokens > 1)
    prefill_tokens = sum(a.prompt_tokens for a in answers)
    prefill_s = sum(a.prefill_s for a in answers)
    return {
        "image_encode_s": round(statistics.median(a.image_s for a in answers), 4),
        "prefill_tok_s": round(prefill_tokens / prefill_s, 1) if prefill_s > 0 else None,
        "decode_tok_s": round(steps / decode_s, 1) if decode_s > 0 else None,
    }


@dataclass(frozen=True)
class Floors:
    min_accuracy: float = 0.0
    min_agreement: float = 0.0
    min_top1: float = 0.0
    max_kl: float | None = None


def check_floors(metrics: dict, floors: Floors) -> None:
    """PipelineError naming the first metric past its floor (accuracy: every question type)."""
    for qtype, value in metrics.get("accuracy", {}).items():
        if value < floors.min_accuracy:
            raise PipelineError(f"accuracy.{qtype} = {value} is below evaluate.min_accuracy = {floors.min_accuracy}")
    for key in ("agreement", "top1"):
        floor = getattr(floors, f"min_{key}")
        if metrics[key] < floor:
            raise PipelineError(f"{key} = {metrics[key]} is below evaluate.min_{key} = {floor}")
    if floors.max_kl is not None and metrics["kl"] > floors.max_kl:
        raise PipelineError(f"kl = {metrics['kl']} is above evaluate.max_kl = {floors.max_kl}")


def summary(metrics: dict, speed: dict | None = None) -> str:
    """One line for a person: accuracy per type, agreement, top-1, KL, size, speed."""
    parts = []
    if "accuracy" in metrics:
        acc = " ".join(f"{k} {v:.2f}" for k, v in metrics["accuracy"].items())
        ref = " ".join(f"{k} {v:.2f}" for k, v in metrics["ref_accuracy"].items())
        parts.append(f"accuracy {acc} (reference: {ref})")
    parts.append(
        f"agreement {metrics['agreement']:.3f}, top-1 {metrics['top1']:.3f}, KL {metrics['kl']:.5f}, "
        f"ppl {metrics['ppl']:.3f} (ref {metrics['ref_ppl']:.3f}) over {metrics['items']} questions"
    )
    parts.append(f".pte {sum(metrics['size_mb'].values()):.1f} MiB")
    if speed and speed.get("decode_tok_s"):
        parts.append(f"image {speed['image_encode_s'] * 1000:.0f} ms, decode {speed['decode_tok_s']:.0f} tok/s")
    return "; ".join(parts)


def require_same_set(records: list[dict], items) -> None:
    """The reference must have been computed on this eval set (same questions, same order)."""
    got = [(r["image"], r["question"]) for r in records]
    want = [(i.image, i.question) for i in items]
    if got != want:
        raise PipelineError("outputs/reference: computed on another eval set (run `dvc repro reference`)")


def main(argv: list[str] | None = None) -> int:
    """`python -m llava_pipeline.evaluate [QUALITY_JSON [SPEED_JSON]]`: the evaluate summary line."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    quality = Path(argv[0]) if argv else Path("metrics/quality.json")
    speed = Path(argv[1]) if len(argv) > 1 else Path("outputs/metrics/evaluate.json")
    if not quality.is_file():
        print(f"error: {quality}: missing (run `dvc repro evaluate`)", file=sys.stderr)
        return 2
    figures = json.loads(speed.read_text()) if speed.is_file() else None
    print("evaluate: " + summary(json.loads(quality.read_text()), figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
