"""The transformers reference an export is scored against.

For each eval item, `LlavaForConditionalGeneration` loaded from the checkpoint (in
`evaluate.reference_dtype`) and the checkpoint's own processor give:

- the greedy answer (`generate(do_sample=False)`, up to `max_new_tokens`, stopping at EOS):
  its token ids (the EOS included when one ended it) and text;
- teacher-forced on prompt + that answer, per answer token: the log-probability of the
  token and the `top_k` largest log-probabilities with their ids (for the KL divergence,
  where the rest of the vocabulary is one bucket).

The images are the uint8 pixels the .pte gets (already resized and cropped to the model's
input size); the processor is still run on them, which leaves their size as it is and does
the rescale and normalisation. Values are rounded (log-probs to 1e-5) so the JSON is stable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from llava_pipeline.formats.tokenizer import LLAVA_PROMPT_TEMPLATE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DIGITS = 5


def to_picture(pixels: torch.Tensor) -> Image.Image:
    """uint8 [3, H, W] -> the RGB picture it came from."""
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))


@torch.no_grad()
def compute(
    checkpoint: Path,
    items: Iterable,
    pixels: dict[str, torch.Tensor],
    dtype: str,
    max_new_tokens: int,
    top_k: int,
    progress: Callable[[Iterable], Iterable] = iter,
) -> list[dict]:
    """One record per item (see the module docstring); `items` are evalset.EvalItem."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=DTYPES[dtype]).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    eos = model.config.text_config.eos_token_id
    out = []
    for item in progress(list(items)):
        prompt = LLAVA_PROMPT_TEMPLATE.format(question=item.question)
        inputs = processor(text=prompt, images=to_picture(pixels[item.image]), return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        n_prompt = inputs["input_ids"].shape[1]
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=eos
        )
        ids = [int(t) for t in generated[0, n_prompt:]]
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        full = torch.cat([inputs["input_ids"], torch.tensor([ids[:-1]], dtype=torch.long)], dim=1)
        logits = model(
            input_ids=full, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(full)
        ).logits[0, n_prompt - 1 :]
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(top_k, dim=-1)
        text_ids = ids[:-1] if ids and ids[-1] == eos else ids
        out.append(
            {
                "image": item.image,
                "qtype": item.qtype,
                "question": item.question,
                "answer": item.answer,
                "prompt_tokens": n_prompt,
                "ids": ids,
                "text": processor.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                "logp": [round(float(v), DIGITS) for v in logp[torch.arange(len(ids)), torch.tensor(ids)]],
                "top_ids": top.indices.tolist(),
                "top_logp": [[round(float(v), DIGITS) for v in row] for row in top.values],
            }
        )
    return out
