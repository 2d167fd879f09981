"""The run-time benchmark's cases, each run in a fresh interpreter by ``bench.measure.isolated``.

Every case does one warm-up iteration, then ``repeats`` timed ones; every timing is the
median of those. All use the same checkpoint weights, image and LLaVA-1.5 prompt
(``USER: <image>\\n{question} ASSISTANT:``: 576 image positions + the text tokens).

ExecuTorch, two processes per .pte:

- ``executorch_runner_case``: ``chat.Chat.first_turn`` on the project's ``Runner`` (C++
  MultimodalRunner), as ``python -m llava_pipeline.run`` measures it: ``image_encode_s`` is
  the separate ``prefill([image])`` call (vision_encoder + text_decoder over the 576 image
  positions), ``text_prompt_s`` the text prefill (the tokens before and after the image, up
  to the first answer token), ``prefill_s`` their sum; ``decode_tok_s`` is greedy
  (temperature 0) tokens after the first over the time from the first to the last
  (``decode_tokens`` asked for; an EOS stops it earlier: ``decode_tokens_generated``).
- ``executorch_methods_case``: the same .pte through ``executorch.runtime``
  (``Program.load_method``), the same XNNPACK backend library and the same ExecuTorch thread
  pool (``libexecutorch_threadpool`` is shared by the runner binding and the pybindings; its
  size is set to ``threads`` and read back into ``et_threadpool_threads``):
  ``vision_encoder_s`` alone on the image tensor, ``text_prefill600_s`` = text_decoder alone
  on a 600-position prefill of embeddings (seeded random token ids through token_embedding;
  the figure to put beside llama.cpp's 600-token prefill), ``text_decode_tok_s`` =
  text_decoder single-token steps at positions 600.. (greedy, time of the decoder calls
  only). The text methods are loaded and timed first, alone: ``text_rss_above_base_mb`` is
  the peak up to then (token embedding + text decoder, the counterpart of a text-only engine
  such as llama.cpp); the vision encoder is loaded after them.

``transformers_case``: transformers eager (``LlavaForConditionalGeneration``, fp32 / bf16,
``torch.set_num_threads``, ``inference_mode``): ``image_encode_s`` = ``get_image_features``
(vision tower + projector), ``prefill_s`` = one forward over the processor's input ids
(image + prompt) with ``logits_to_keep=1`` (as ``generate`` does; the .pte returns the last
row only too), ``decode_tok_s`` = greedy steps on its KV cache (``decode_tokens - 1`` steps
after the first token, like the runner's count); ``text_prefill600_s`` /
``text_decode_tok_s`` = the same model fed the 600 seeded ids without an image.

``bandwidth_case``: the best of several passes of ``torch.sum`` and of ``torch.amax``
(read-only kernels) over a float32 tensor of ``gib`` GiB with ``threads`` threads.

Nothing heavy is imported at the top: ``measure.isolated`` imports this module before it
takes the memory baseline, so the preimports alone say what each case's baseline holds.
"""

from __future__ import annotations

import time
from pathlib import Path

from llava_pipeline.base import rss

from . import measure
from .pte_bytes import hf_text_bytes
from .rates import mean_context, median, seeded_ids, tok_per_s

TEXT_PREFILL_TOKENS = 600  # llama.cpp's comparison prefill (llama-bench -p 600)
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _timed(fn, repeats: int) -> list[float]:
    """Call ``fn`` once to warm up, then ``repeats`` times; the per-call seconds."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bandwidth_case(threads: int, gib: float = 1.0, repeats: int = 5) -> dict:
    """Read bandwidth: the best of ``repeats`` passes of ``torch.sum`` and of ``torch.amax``
    over a ``gib`` GiB float32 tensor (both only read it; the faster one counts)."""
    import torch

    torch.set_num_threads(threads)
    n = int(gib * (1 << 30)) // 4
    x = torch.ones(n, dtype=torch.float32)
    by_kernel = {
        name: round(n * 4 / min(_timed(lambda: float(fn(x)), max(1, repeats))) / 1e9, 2)
        for name, fn in (("sum", torch.sum), ("amax", torch.amax))
    }
    return {
        "bandwidth_gb_s": max(by_kernel.values()),
        "bandwidth_by_kernel_gb_s": by_kernel,
        "bandwidth_bytes": n * 4,
        "bandwidth_threads": torch.get_num_threads(),
    }


def _set_et_threads(threads: int) -> int:
    """Size ExecuTorch's thread pool (shared by the runner binding and the pybindings)."""
    from executorch.extension.pybindings import _C

    if _C._threadpool_get_thread_count() != threads:
        _C._unsafe_reset_threadpool(threads)
    return int(_C._threadpool_get_thread_count())


def _xnnpack_registered() -> bool:
    from executorch.extension.pybindings import _C

    return "XnnpackBackend" in list(_C._get_registered_backend_names())


def executorch_runner_case(
    pte: str, tokenizer: str, image: str, question: str, decode_tokens: int, threads: int, repeats: int
) -> dict:
    """The MultimodalRunner, timed as ``python -m llava_pipeline.run`` times it."""
    # Imported in the case, not at the top: see the module docstring.
    from llava_pipeline.formats.image import load_pixels
    from llava_pipeline.formats.tokenizer import runner_prompt_token_segments
    from llava_pipeline.runtime.chat import Chat
    from llava_pipeline.runtime.runner import Runner, load_runtime_kernels, native_output_captured

    with native_output_captured():
        load_runtime_kernels()
        et_threads = _set_et_threads(threads)
        runner = Runner(Path(pte), Path(tokenizer))
    meta = runner.meta
    pixels = load_pixels(Path(image), meta.image_size)
    before, after = runner_prompt_token_segments(tokenizer, question)
    if not after:
        raise ValueError("the prompt must have text after <image> (its prefill is what is timed)")
    turns = []
    with native_output_captured():
        for _ in range(repeats + 1):
            runner.reset()
            chat = Chat(runner, meta.max_context_len, 0.0, decode_tokens)
            turns.append(chat.first_turn(before, pixels, after, on_text=None))
    turns = turns[1:]
    steps = turns[0].tokens - 1
    # text after <image> (checked above): every first turn prefilled the image on its own
    image_times = [t.image_s for t in turns if t.image_s is not None]
    assert len(image_times) == len(turns), "a first turn without a separate image prefill"
    image_s = median(image_times)
    text_s = median([t.prefill_s for t in turns])
    prompt_len = len(before) + meta.image_tokens + len(after)
    return {
        "image_encode_s": round(image_s, 5),
        "text_prompt_s": round(text_s, 5),
        "prefill_s": round(median([i + t.prefill_s for i, t in zip(image_times, turns)]), 5),
        "prompt_tokens": len(before) + len(after),
        "image_tokens": meta.image_tokens,
        "prompt_ids": [*before, -1, *after],
        "decode_tokens_generated": turns[0].tokens,
        "decode_stop": turns[0].stop,
        "decode_tok_s": _median_rate([tok_per_s(t.tokens - 1, t.decode_s) for t in turns]),
        # the first answer token comes from the prefill; steps feed prompt_len .. prompt_len + steps - 1
        "decode_mean_context": mean_context(prompt_len, steps),
        "et_threadpool_threads": et_threads,
        "xnnpack_registered": _xnnpack_registered(),
        "max_context_len": meta.max_context_len,
    }


def executorch_methods_case(pte: str, image: str, decode_tokens: int, threads: int, repeats: int) -> dict:
    """vision_encoder and text_decoder alone through executorch.runtime (same .pte)."""
    import torch

    from llava_pipeline.formats.image import load_pixels  # in the case: see executorch_runner_case
    from llava_pipeline.formats.program_meta import read_program_meta
    from llava_pipeline.runtime.runner import load_runtime_kernels, native_output_captured

    with native_output_captured():
        load_runtime_kernels()
        et_threads = _set_et_threads(threads)
        from executorch.runtime import Runtime

        meta = read_program_meta(Path(pte))
        # The text methods first, alone: their peak is the figure to put beside a text-only
        # engine (llama.cpp); the vision encoder is loaded after them.
        rss.reset_peak()  # drop the transient of reading the metadata
        program = Runtime.get().load_program(Path(pte))
        embed = program.load_method("token_embedding")
        decoder = program.load_method("text_decoder")
    n = TEXT_PREFILL_TOKENS
    if meta.max_context_len < n + 1:
        raise ValueError(
            f"{pte}: a context of {meta.max_context_len} positions has no room for the {n}-token "
            "prefill and a decode step (export with a larger export.max_seq_len)"
        )
    ids = torch.tensor([seeded_ids(n, meta.vocab_size)], dtype=torch.long)
    chunk = meta.max_seq_len
    embeds = torch.cat([embed.execute([ids[:, i : i + chunk]])[0].clone() for i in range(0, n, chunk)], dim=1)
    steps = max(0, min(decode_tokens, meta.max_context_len - n))

    def prefill():
        out = None
        for i in range(0, n, chunk):
            out = decoder.execute([embeds[:, i : i + chunk], torch.tensor([i], dtype=torch.long)])[0]
        return out

    prefill_s, decode_s = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        logits = prefill()
        prefill_s.append(time.perf_counter() - t0)
        total = 0.0
        for pos in range(n, n + steps):
            token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
            e = embed.execute([torch.tensor([[token]], dtype=torch.long)])[0]
            t0 = time.perf_counter()
            logits = decoder.execute([e, torch.tensor([pos], dtype=torch.long)])[0]
            total += time.perf_counter() - t0
        decode_s.append(total)
    text_peak = rss.peak_mb()
    with native_output_captured():
        vision = program.load_method("vision_encoder")
    pixels = load_pixels(Path(image), meta.image_size)[None]
    if vision.metadata.input_tensor_meta(0).dtype() == 6:  # a float32 vision input
        pixels = pixels.float()
    vision_s = _timed(lambda: vision.execute([pixels]), repeats)
    return {
        "text_rss_above_base_mb": (None if measure.baseline_mb is None else round(text_peak - measure.baseline_mb, 1)),
        "vision_encoder_s": round(median(vision_s), 5),
        "text_prefill600_s": round(median(prefill_s[1:]), 5),
        "text_prefill_chunk": chunk,
        "text_decode_steps": steps,
        "text_decode_tok_s": _round(tok_per_s(steps, median(decode_s[1:])), 3),
        "text_decode_mean_context": mean_context(n, steps),
        "et_threadpool_threads_methods": et_threads,
        "xnnpack_registered_methods": _xnnpack_registered(),
    }


def transformers_case(
    checkpoint: str, image: str, question: str, dtype: str, decode_tokens: int, threads: int, repeats: int
) -> dict:
    """transformers eager: image features, image+prompt prefill, greedy decode; then the
    text model alone on the 600 seeded ids."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_pipeline.formats.image import load_image
    from llava_pipeline.formats.tokenizer import IMAGE_TOKEN, LLAVA_PROMPT_TEMPLATE

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    picture = _picture(image) if Path(image).suffix == ".pt" else load_image(image)
    inputs = processor(images=picture, text=LLAVA_PROMPT_TEMPLATE.format(question=question), return_tensors="pt")
    input_ids, pixel_values = inputs["input_ids"], inputs["pixel_values"].to(torch_dtype)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids_list = input_ids[0].tolist()
    image_tokens = ids_list.count(image_id)
    prompt_ids = _collapse(ids_list, image_id)
    weight_bytes, kv_per_pos = hf_text_bytes(model)

    def decode(logits, cache, start: int, steps: int) -> float:
        total = 0.0
        for pos in range(start, start + steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            total += time.perf_counter() - t0
            logits, cache = out.logits, out.cache
        return total

    prompt_len = len(ids_list)
    text_ids = torch.tensor([seeded_ids(TEXT_PREFILL_TOKENS, model.config.text_config.vocab_size)])
    image_s, prefill_s, decode_s, text_prefill_s, text_decode_s = [], [], [], [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model.get_image_features(pixel_values=pixel_values)
            image_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=inputs["attention_mask"],
                use_cache=True,
                logits_to_keep=1,
            )
            prefill_s.append(time.perf_counter() - t0)
            decode_s.append(decode(out.logits, out.cache, prompt_len, decode_tokens - 1))
            del out
            t0 = time.perf_counter()
            out = model(input_ids=text_ids, use_cache=True, logits_to_keep=1)
            text_prefill_s.append(time.perf_counter() - t0)
            text_decode_s.append(decode(out.logits, out.cache, TEXT_PREFILL_TOKENS, decode_tokens))
            del out
    steps = decode_tokens - 1
    return {
        "image_encode_s": round(median(image_s[1:]), 5),
        "prefill_s": round(median(prefill_s[1:]), 5),
        "prompt_tokens": prompt_len - image_tokens,
        "image_tokens": image_tokens,
        "prompt_ids": prompt_ids,
        "decode_tokens_generated": decode_tokens,
        "decode_tok_s": _round(tok_per_s(steps, median(decode_s[1:])), 3),
        "decode_mean_context": mean_context(prompt_len, steps),
        "text_prefill600_s": round(median(text_prefill_s[1:]), 5),
        "text_decode_steps": decode_tokens,
        "text_decode_tok_s": _round(tok_per_s(decode_tokens, median(text_decode_s[1:])), 3),
        "text_decode_mean_context": mean_context(TEXT_PREFILL_TOKENS, decode_tokens),
        "weight_bytes_per_token": weight_bytes,
        "kv_bytes_per_position": kv_per_pos,
        "torch_threads": torch.get_num_threads(),
    }


def _picture(path: str):
    """A PIL image of a uint8 CHW image.pt (the processor's resize/crop leave its size as is)."""
    import torch
    from PIL import Image

    pixels = torch.load(path, weights_only=True)
    return Image.fromarray(pixels.reshape(pixels.shape[-3:]).permute(1, 2, 0).contiguous().numpy())


def _collapse(ids: list[int], image_id: int) -> list[int]:
    """Ids with each run of the image token replaced by one -1."""
    out: list[int] = []
    for i in ids:
        if i == image_id:
            if not out or out[-1] != -1:
                out.append(-1)
        else:
            out.append(i)
    return out


def _median_rate(rates: list[float | None]) -> float | None:
    """Median of per-run rates, None if a run had none (an EOS as the first answer token)."""
    numbers = [r for r in rates if r is not None]
    return None if len(numbers) < len(rates) else round(median(numbers), 3)


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)
