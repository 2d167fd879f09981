"""End to end: the exported .pte in ExecuTorch's C++ MultimodalRunner vs transformers.

The proof that an export is right: outputs/llava.pte + tokenizer.bin + image.pt,
run by `executorch.extension.llm.runner.MultimodalRunner`, produce what
`LlavaForConditionalGeneration.generate` produces on the same checkpoint,
prompt and image.
"""

from __future__ import annotations

import json

import pytest
import torch

from llava_pipeline.formats import image as image_mod
from llava_pipeline.formats import tokenizer as tok_mod
from llava_pipeline.formats.vocabulary import Vocabulary
from llava_pipeline.runtime.runner import Runner, image_input, text_input, token_input

pytestmark = pytest.mark.slow

QUESTION = "Describe the picture."
NEW_TOKENS = 40
# Top-1 agreement floors along the 8da4w .pte's own greedy path (its answer, up to EOS).
# vs fp32: the built-in model is trained, its answer tokens are decisive; chance agreement
# is 1/32064 and a broken export (wrong cache position, wrong image, wrong weights) scores
# near 0.
FP32_AGREEMENT_FLOOR = 0.5
# vs the eager torchao-quantized model it was exported from: measured 0.95-1.0;
# only activation-rounding differences between XNNPACK and torchao's reference
# kernels remain, which flip near-ties only.
EAGER_QUANT_AGREEMENT_FLOOR = 0.9


def _hf(outputs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt = outputs / "download"
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    return model, processor


def _hf_inputs(processor, workdir):
    params = __import__("yaml").safe_load((workdir / "params.yaml").read_text())
    picture = image_mod.load_image(workdir / params["emit"]["image"])
    prompt = tok_mod.LLAVA_PROMPT_TEMPLATE.format(question=QUESTION)
    return processor(images=picture, text=prompt, return_tensors="pt")


def _split_at_image(ids: list[int], image_id: int) -> tuple[list[int], list[int]]:
    first = ids.index(image_id)
    last = len(ids) - 1 - ids[::-1].index(image_id)
    return ids[:first], ids[last + 1 :]


def _pieces(tokenizer_bin, ids) -> list[bytes]:
    """What the runner's token callback gets for each id."""
    vocab = Vocabulary(tokenizer_bin)
    return [vocab.piece(i) for i in ids]


def _run(outputs, inputs, n=NEW_TOKENS):
    runner = Runner(outputs / "llava.pte", outputs / "tokenizer.bin")
    return runner.generate(inputs, max_new_tokens=n, temperature=0.0, num_bos=0)


def test_fp32_runner_equals_transformers_generate(export_fp32):
    model, processor = _hf(export_fp32)
    inputs = _hf_inputs(processor, export_fp32.parent)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_ids = inputs["input_ids"][0].tolist()
    hf_new = out[0, len(prompt_ids) :].tolist()
    eos = model.config.text_config.eos_token_id
    assert eos in hf_new, hf_new  # the trained model ends its answer with </s>
    answer = hf_new[: hf_new.index(eos)]

    # image.pt is exactly what the HF processor feeds its normalization.
    pixels = torch.load(export_fp32 / "image.pt")
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 336, 336)

    before, after = _split_at_image(prompt_ids, model.config.image_token_id)
    gen = _run(export_fp32, [token_input(before), image_input(pixels), token_input(after)])
    assert gen.piece_bytes == _pieces(export_fp32 / "tokenizer.bin", answer)
    assert gen.stop == "eos" and gen.eos_id == eos
    assert gen.stats["prompt_tokens"] == len(prompt_ids)


def test_fp32_runner_fills_the_context_like_transformers(export_random):
    """Generating until the static cache is full: every position up to max_seq_len - 1
    (the cache's last slot included) is written and read like HF's dynamic cache. On the
    random-weight model, whose greedy text never stops at EOS."""
    export_fp32 = export_random
    model, processor = _hf(export_fp32)
    inputs = _hf_inputs(processor, export_fp32.parent)
    prompt_ids = inputs["input_ids"][0].tolist()
    room = 768 - len(prompt_ids)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=room, do_sample=False)
    hf_new = out[0, len(prompt_ids) :].tolist()
    assert len(hf_new) == room
    pixels = torch.load(export_fp32 / "image.pt")
    before, after = _split_at_image(prompt_ids, model.config.image_token_id)
    gen = _run(export_fp32, [token_input(before), image_input(pixels), token_input(after)], n=-1)
    assert gen.piece_bytes == _pieces(export_fp32 / "tokenizer.bin", hf_new)


def test_fp32_runner_text_prompt_equals_hf_ids(export_fp32):
    """The runner's own tokenizer on the text segments gives HF's ids (same answer)."""
    model, processor = _hf(export_fp32)
    inputs = _hf_inputs(processor, export_fp32.parent)
    prompt_ids = inputs["input_ids"][0].tolist()
    before, after = _split_at_image(prompt_ids, model.config.image_token_id)
    pixels = torch.load(export_fp32 / "image.pt")
    seg = tok_mod.runner_prompt_segments(QUESTION)
    by_text = Runner(export_fp32 / "llava.pte", export_fp32 / "tokenizer.bin").generate(
        [text_input(seg.before_image), image_input(pixels), text_input(seg.after_image)],
        max_new_tokens=8,
        num_bos=1,
    )
    by_ids = _run(export_fp32, [token_input(before), image_input(pixels), token_input(after)], n=8)
    assert by_text.pieces == by_ids.pieces
    assert by_text.stats["prompt_tokens"] == len(prompt_ids)


def test_8da4w_top1_agreement(export_8da4w, export_fp32, record_property):
    """Greedy path of the 8da4w .pte; at each step, does fp32 HF pick the same token?"""
    model, processor = _hf(export_8da4w)
    inputs = _hf_inputs(processor, export_8da4w.parent)
    prompt_ids = inputs["input_ids"][0].tolist()
    before, after = _split_at_image(prompt_ids, model.config.image_token_id)
    pixels = torch.load(export_8da4w / "image.pt")
    gen = _run(export_8da4w, [token_input(before), image_input(pixels), token_input(after)])
    assert gen.stop == "eos"

    # Map the runner's pieces back to ids (the answer and its EOS).
    vocab = Vocabulary(export_8da4w / "tokenizer.bin")
    q_ids = [vocab.id_of(b) for b in gen.piece_bytes] + [gen.eos_id]

    seq = torch.tensor([prompt_ids + q_ids])
    with torch.no_grad():
        logits = model(input_ids=seq, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(seq)).logits[
            0
        ]
    fp_top1 = logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    eager_top1 = _eager_top1(export_8da4w / "quantize", pixels, before, after, q_ids)
    agree = sum(a == b for a, b in zip(fp_top1, q_ids)) / len(q_ids)
    agree_eager = sum(a == b for a, b in zip(eager_top1, q_ids)) / len(q_ids)
    record_property("top1_agreement_8da4w_vs_fp32", agree)
    record_property("top1_agreement_8da4w_vs_eager_8da4w", agree_eager)
    print(json.dumps({"vs_fp32": agree, "vs_eager_8da4w": agree_eager, "steps": len(q_ids)}))
    assert agree_eager >= EAGER_QUANT_AGREEMENT_FLOOR
    assert agree >= FP32_AGREEMENT_FLOOR


def _eager_top1(quant_dir, pixels, before, after, new_ids) -> list[int]:
    """Teacher-forced argmax of the eager quantized model (this project's definition)."""
    from llava_pipeline.export import model_io
    from llava_pipeline.verify import numerics

    model, _, _ = model_io.load_quantized(quant_dir)
    with torch.no_grad():
        chunks = numerics.prefill_chunks(model, before, pixels[None], after)
        logits = numerics.decode_eager(model, chunks, new_ids)
    # The last chunk's logits give the first new token, then one per forced token.
    return [int(x.argmax(-1)) for x in logits[len(chunks) - 1 :]]
