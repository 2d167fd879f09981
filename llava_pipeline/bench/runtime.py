"""Run-time benchmark: ExecuTorch (the project's runner) beside transformers eager, same inputs.

    python -m llava_pipeline.bench.runtime --pte outputs/llava.pte [--label 8da4w] \\
        [--pte /tmp/fp32/outputs/llava.pte --label fp32 ...] --tokenizer outputs/tokenizer.bin \\
        --checkpoint outputs/download --image assets/images/coffee.jpg \\
        --out outputs/bench/runtime-tiny.json [--decode-tokens 32] [--threads 2] [--repeats 3]

Every case runs in a fresh interpreter (``measure.isolated``), so its peak RSS is its own;
memory is reported above a baseline taken after the case's imports. Each case does one
warm-up iteration, then ``repeats`` timed ones; every timing is the median of those. All
cases use the same checkpoint weights, image and LLaVA-1.5 prompt
(``USER: <image>\\n{question} ASSISTANT:``: 576 image positions + the text tokens).

ExecuTorch, two processes per .pte:

- runner: ``chat.Chat.first_turn`` on the project's ``Runner`` (C++ MultimodalRunner), as
  ``python -m llava_pipeline.run`` measures it: ``image_encode_s`` is the separate
  ``prefill([image])`` call (vision_encoder + text_decoder over the 576 image positions),
  ``text_prompt_s`` the text prefill (the tokens before and after the image, up to the first
  answer token), ``prefill_s`` their sum; ``decode_tok_s`` is greedy (temperature 0) tokens
  after the first over the time from the first to the last (``decode_tokens`` asked for;
  an EOS stops it earlier: ``decode_tokens_generated``).
- methods: the same .pte through ``executorch.runtime`` (``Program.load_method``), the same
  XNNPACK backend library and the same ExecuTorch thread pool (``libexecutorch_threadpool``
  is shared by the runner binding and the pybindings; its size is set to ``threads`` and
  read back into ``et_threadpool_threads``): ``vision_encoder_s`` alone on the image tensor,
  ``text_prefill600_s`` = text_decoder alone on a 600-position prefill of embeddings
  (seeded random token ids through token_embedding; the figure to put beside llama.cpp's
  600-token prefill), ``text_decode_tok_s`` = text_decoder single-token steps at positions
  600.. (greedy, time of the decoder calls only). The text methods are loaded and timed
  first, alone: ``text_rss_above_base_mb`` is the peak up to then (token embedding + text
  decoder, the counterpart of a text-only engine such as llama.cpp); the vision encoder is
  loaded after them.

transformers eager (``LlavaForConditionalGeneration``, fp32 / bf16, ``torch.set_num_threads``,
``inference_mode``): ``image_encode_s`` = ``get_image_features`` (vision tower + projector),
``prefill_s`` = one forward over the processor's input ids (image + prompt) with
``logits_to_keep=1`` (as ``generate`` does; the .pte returns the last row only too),
``decode_tok_s`` = greedy steps on its KV cache (``decode_tokens - 1`` steps after the first
token, like the runner's count); ``text_prefill600_s`` / ``text_decode_tok_s`` = the same
model fed the 600 seeded ids without an image.

Bandwidth (its own process, before each case and after the last): the best of several
passes of ``torch.sum`` and of ``torch.amax`` (read-only kernels) over a float32 tensor of
``bandwidth_gib`` GiB with ``threads`` threads. The limit uses the highest read rate reached in the run: the best probe,
or a decode that streams its weights from DRAM faster than that (ExecuTorch's fp32 decoder
has outrun the probe by up to 40%), so that no row's fraction exceeds 1 on DRAM-bound
weights. On a shared VM the probe was seen anywhere between 30 and 50 GB/s within an hour. A decode step must stream every weight of the text decoder once (the
token embedding is gathered one row per token, so it is left out) and read the KV cache of
all earlier positions, so
``bandwidth_limit_tok_s = bandwidth / (weight_bytes_per_token + kv_bytes_per_token)`` and
``fraction_of_limit = decode_tok_s / bandwidth_limit_tok_s`` (``text_*`` the same for the
600-position text decode). ``kv_bytes_per_token`` is at the mean context of the measured
decode steps (a step at position p reads p + 1 positions). Where weights + KV fit in the
last-level cache (``weights_fit_in_cache``, e.g. the tiny model) DRAM does not limit decode
and the fraction can exceed 1.

Weight bytes of a .pte (``pte_method_bytes``; reads the flatbuffer and delegate headers, never
the weights): the program flatbuffer (``_flatbuffer_to_program`` on the first
``program_size`` bytes the extended header gives) lists text_decoder's delegates; each
XNNPACK payload (a segment) starts with an ``XH00`` header whose flatbuffer names the
named-data entries it uses (the weights, stored as their own segments, keyed by a hash) and
gives the size of any inline constant data. ``weight_bytes_per_token`` = the segment sizes of
the named-data keys found in text_decoder's delegate flatbuffers + inline constant data + the
method's non-delegated constant tensors (e.g. RMSNorm weights); non-delegated 2-D constants
with one row per cache position (RoPE cos/sin, read one row per token) are left out and
reported in ``weight_bytes_detail.position_tables_left_out``. These are the bytes as stored;
XNNPACK repacks weights at load (layout, same precision), so what it streams can differ
slightly. KV cache: text_decoder's memory-planned 4-D buffers with the longest sequence
dimension (the static caches, deduplicated by memory offset) give the bytes per cached
position. transformers: the language model's parameters except ``embed_tokens``, plus the
lm_head, at the case's dtype; KV = 2 * layers * kv_heads * head_dim * dtype size per position.

Each row also records ``machine_busy_before`` (share of all cores busy during 0.5 s just
before the case started, while this benchmark slept) and ``load_avg_1m``: on this 2-core
machine other jobs slow every timing down, 2-thread torch ops by up to two orders of
magnitude (seen: CLIP tower 0.56 s instead of 0.009 s while another job held a core, as each
parallel region waits for a descheduled thread); trust rows whose ``machine_busy_before`` is
near 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from . import measure

DEFAULT_QUESTION = "What is shown in this picture?"
TEXT_PREFILL_TOKENS = 600  # llama.cpp's comparison prefill (llama-bench -p 600)
ENGINES = ("executorch", "transformers")
HF_DTYPES = ("fp32", "bf16")
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# ExecuTorch ScalarType codes -> element size in bytes.
_ET_ELEMENT_SIZE = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 15: 2}
_MODULE = "llava_pipeline.bench.runtime"


# ------------------------------------------------------------------ pure helpers


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no values")
    return float(statistics.median(values))


def tok_per_s(tokens: int, seconds: float) -> float | None:
    """``tokens / seconds``; None when there is nothing to divide (no step or no time)."""
    return tokens / seconds if tokens > 0 and seconds > 0 else None


def mean_context(start_pos: int, steps: int) -> float:
    """Mean number of cached positions a decode step reads, over ``steps`` steps that feed
    positions ``start_pos`` .. ``start_pos + steps - 1`` (a step at p attends to p + 1)."""
    if steps <= 0:
        return float(start_pos + 1)
    return start_pos + (steps + 1) / 2


def bandwidth_limit(bandwidth_gb_s: float, weight_bytes: float, kv_bytes: float) -> float:
    """Tokens per second if every decode step only had to stream its bytes at ``bandwidth_gb_s``."""
    total = weight_bytes + kv_bytes
    if total <= 0 or bandwidth_gb_s <= 0:
        raise ValueError("bytes per token and bandwidth must be positive")
    return bandwidth_gb_s * 1e9 / total


def seeded_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """``n`` reproducible token ids among the ordinary pieces (3 .. min(vocab, 32000) - 1:
    no BOS/EOS/UNK, no ``<image>``/``<pad>`` or padding ids)."""
    import random

    high = min(vocab_size, 32000)
    rng = random.Random(seed)
    return [rng.randrange(3, high) for _ in range(n)]


def add_bandwidth_fields(row: dict, bandwidth_gb_s: float, cache_bytes: int | None = None) -> dict:
    """Fill the bandwidth-limit fields of ``row`` from its bytes and rates (in place).
    ``weights_fit_in_cache``: weights + KV of a decode step fit in ``cache_bytes`` (the
    last-level cache), so the DRAM limit need not bind (fractions above 1 are possible)."""
    per_pos = row.get("kv_bytes_per_position")
    weights = row.get("weight_bytes_per_token")
    if per_pos is None or weights is None:
        return row
    if cache_bytes:
        row["weights_fit_in_cache"] = weights + per_pos * (row.get("decode_mean_context") or 0) <= cache_bytes
    for prefix, ctx_key, rate_key in (("", "decode_mean_context", "decode_tok_s"),
                                       ("text_", "text_decode_mean_context", "text_decode_tok_s")):
        ctx = row.get(ctx_key)
        if ctx is None:
            continue
        kv = per_pos * ctx
        limit = bandwidth_limit(bandwidth_gb_s, weights, kv)
        row[f"{prefix}kv_bytes_per_token"] = round(kv)
        row[f"{prefix}bandwidth_limit_tok_s"] = round(limit, 3)
        rate = row.get(rate_key)
        row[f"{prefix}fraction_of_limit"] = round(rate / limit, 4) if rate else None
        # the read rate this decode sustained if it streamed those bytes once per token
        row[f"{prefix}achieved_gb_s"] = round(rate * (weights + kv) / 1e9, 2) if rate else None
    return row


def machine_bandwidth(probes: list[float], rows: list[dict]) -> tuple[float, str]:
    """The read bandwidth the limits use: the highest that anything reached in the run, the
    probe or a decode that streams its weights from DRAM (one faster than the probe proves
    the probe low). Returns it and what reached it."""
    best, by = max(probes), "probe"
    for row in rows:
        if row.get("weights_fit_in_cache"):
            continue
        for prefix in ("", "text_"):
            achieved = row.get(f"{prefix}achieved_gb_s")
            if achieved and achieved > best:
                best, by = achieved, f"{row['engine']} {row['variant']} {'text' if prefix else 'runner'} decode"
    return best, by


# ------------------------------------------------------------------ .pte byte accounting

_XNN_MAGIC = b"XH00"


def _xnn_payload_parts(payload_head: bytes) -> tuple[int, int, int, int] | None:
    """(flatbuffer offset, size, constant data offset, size) from an XNNPACK payload's
    header (its first 30 bytes), or None if it has none (a bare flatbuffer)."""
    if len(payload_head) < 30 or payload_head[4:8] != _XNN_MAGIC:
        return None
    fb_off, fb_size, const_off = struct.unpack_from("<III", payload_head, 10)
    (const_size,) = struct.unpack_from("<Q", payload_head, 22)
    return fb_off, fb_size, const_off, const_size


@dataclass(frozen=True)
class PteBytes:
    weight_bytes: int  # what a decode step streams: delegated named data + inline + other constants
    named_data_bytes: int
    inline_constant_bytes: int
    other_constant_bytes: int
    position_table_bytes: int  # left out of weight_bytes (one row read per token)
    kv_bytes_per_position: int
    kv_buffers: int
    delegates: int
    backends: tuple[str, ...] = ()  # the delegates' backend ids


def pte_method_bytes(pte: Path, method: str = "text_decoder") -> PteBytes:
    """Byte accounting of one method of a .pte (see the module docstring); reads the
    flatbuffer and the method's delegate headers only, never the weights themselves."""
    from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header
    from executorch.exir.schema import DataLocation, Tensor

    with open(pte, "rb") as f:
        head = f.read(64)
        eh = _get_extended_header(head)
        if eh is None or not eh.is_valid():
            raise ValueError(f"{pte}: no extended header (not a segmented .pte)")
        f.seek(0)
        program = _flatbuffer_to_program(f.read(eh.program_size))
        plans = {p.name: p for p in program.execution_plan}
        if method not in plans:
            raise ValueError(f"{pte} has no method {method}")
        plan = plans[method]
        segment_of_key = {nd.key: nd.segment_index for nd in (program.named_data or [])}

        def read_segment(index: int, start: int, size: int) -> bytes:
            seg = program.segments[index]
            f.seek(eh.segment_base_offset + seg.offset + start)
            return f.read(min(size, seg.size - start))

        keys: set[str] = set()
        inline = 0
        for delegate in plan.delegates:
            loc = delegate.processed.location
            if loc == DataLocation.SEGMENT:
                idx = delegate.processed.index
                parts = _xnn_payload_parts(read_segment(idx, 0, 30))
                if parts is None:  # no header: the whole payload is a flatbuffer
                    fb = read_segment(idx, 0, program.segments[idx].size)
                else:
                    fb_off, fb_size, _, const_size = parts
                    fb = read_segment(idx, fb_off, fb_size)
                    inline += const_size
            else:
                data = bytes(program.backend_delegate_data[delegate.processed.index].data)
                parts = _xnn_payload_parts(data[:30])
                fb = data if parts is None else data[parts[0]: parts[0] + parts[1]]
                inline += 0 if parts is None else parts[3]
            keys.update(k for k in segment_of_key if k.encode() in fb)

    named = sum(program.segments[segment_of_key[k]].size for k in keys)
    tensors = [v.val for v in plan.values if isinstance(v.val, Tensor)]
    planned4d = [t for t in tensors if t.allocation_info is not None and len(t.sizes) == 4]
    longest = max((t.sizes[1] for t in planned4d), default=0)  # the KV caches' length
    other = positional = 0
    for t in tensors:
        if t.data_buffer_idx > 0 and t.allocation_info is None:
            nbytes = _ET_ELEMENT_SIZE.get(int(t.scalar_type), 4)
            for d in t.sizes:
                nbytes *= d
            if len(t.sizes) == 2 and t.sizes[0] == longest:  # one row per cache position
                positional += nbytes
            else:
                other += nbytes
    seen, kv_per_pos = set(), 0
    for t in planned4d:
        a = t.allocation_info
        where = (a.memory_id, a.memory_offset_low, a.memory_offset_high)
        if t.sizes[1] != longest or where in seen:
            continue
        seen.add(where)
        kv_per_pos += _ET_ELEMENT_SIZE.get(int(t.scalar_type), 4) * t.sizes[0] * t.sizes[2] * t.sizes[3]
    return PteBytes(
        weight_bytes=named + inline + other,
        named_data_bytes=named,
        inline_constant_bytes=inline,
        other_constant_bytes=other,
        position_table_bytes=positional,
        kv_bytes_per_position=kv_per_pos,
        kv_buffers=len(seen),
        delegates=len(plan.delegates),
        backends=tuple(sorted({d.id for d in plan.delegates})),
    )


def hf_text_bytes(model) -> tuple[int, int]:
    """(weight bytes a decode step streams, KV bytes per cached position) of a transformers
    LLaVA: the language model's parameters except the token embedding, plus the lm_head
    (counted once if tied); KV = 2 * layers * kv_heads * head_dim * element size."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    total, seen = head.numel() * head.element_size(), {id(head), id(embed)}
    for name, p in model.named_parameters():
        if "language_model" in name and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_pos = 2 * cfg.num_hidden_layers * kv_heads * head_dim * embed.element_size()
    return total, per_pos


# ------------------------------------------------------------------ cases (each in its own process)


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
    by_kernel = {name: round(n * 4 / min(_timed(lambda: float(fn(x)), max(1, repeats))) / 1e9, 2)
                 for name, fn in (("sum", torch.sum), ("amax", torch.amax))}
    return {"bandwidth_gb_s": max(by_kernel.values()), "bandwidth_by_kernel_gb_s": by_kernel,
            "bandwidth_bytes": n * 4, "bandwidth_threads": torch.get_num_threads()}


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache size ("32768K", "2M", "512")."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def last_level_cache_bytes(cpu_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the CPU's highest cache level (None where sysfs does not say). Weights and KV
    cache smaller than it need not come from DRAM: the bandwidth limit does not bind then."""
    best = None
    for index in sorted(cpu_dir.glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def _set_et_threads(threads: int) -> int:
    """Size ExecuTorch's thread pool (shared by the runner binding and the pybindings)."""
    from executorch.extension.pybindings import _C

    if _C._threadpool_get_thread_count() != threads:
        _C._unsafe_reset_threadpool(threads)
    return int(_C._threadpool_get_thread_count())


def _xnnpack_registered() -> bool:
    from executorch.extension.pybindings import _C

    return "XnnpackBackend" in list(_C._get_registered_backend_names())


def executorch_runner_case(pte: str, tokenizer: str, image: str, question: str, decode_tokens: int,
                           threads: int, repeats: int) -> dict:
    """The MultimodalRunner, timed as ``python -m llava_pipeline.run`` times it."""
    # Imported in the case, not at the top: measure.isolated imports this module before it
    # takes the memory baseline, so top-level imports would land in every case's baseline
    # (the preimports say what each case's baseline holds).
    from ..chat import Chat
    from ..image import load_pixels
    from ..runner import Runner, load_runtime_kernels, native_output_captured
    from ..tokenizer import runner_prompt_token_segments

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
    image_s = median([t.image_s for t in turns])
    text_s = median([t.prefill_s for t in turns])
    prompt_len = len(before) + meta.image_tokens + len(after)
    return {
        "image_encode_s": round(image_s, 5),
        "text_prompt_s": round(text_s, 5),
        "prefill_s": round(median([t.image_s + t.prefill_s for t in turns]), 5),
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

    from ..image import load_pixels  # in the case: see executorch_runner_case
    from ..runner import load_runtime_kernels, native_output_captured, read_program_meta

    with native_output_captured():
        load_runtime_kernels()
        et_threads = _set_et_threads(threads)
        from executorch.runtime import Runtime

        meta = read_program_meta(Path(pte))
        # The text methods first, alone: their peak is the figure to put beside a text-only
        # engine (llama.cpp); the vision encoder is loaded after them.
        measure.reset_peak_rss()  # drop the transient of reading the metadata
        program = Runtime.get().load_program(Path(pte))
        embed = program.load_method("token_embedding")
        decoder = program.load_method("text_decoder")
    n = TEXT_PREFILL_TOKENS
    if meta.max_context_len < n + 1:
        raise ValueError(f"{pte}: a context of {meta.max_context_len} positions has no room for the {n}-token "
                         "prefill and a decode step (export with a larger export.max_seq_len)")
    ids = torch.tensor([seeded_ids(n, meta.vocab_size)], dtype=torch.long)
    chunk = meta.max_seq_len
    embeds = torch.cat([embed.execute([ids[:, i: i + chunk]])[0].clone() for i in range(0, n, chunk)], dim=1)
    steps = max(0, min(decode_tokens, meta.max_context_len - n))

    def prefill():
        out = None
        for i in range(0, n, chunk):
            out = decoder.execute([embeds[:, i: i + chunk], torch.tensor([i], dtype=torch.long)])[0]
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
    text_peak = measure.peak_rss_mb()
    with native_output_captured():
        vision = program.load_method("vision_encoder")
    pixels = load_pixels(Path(image), meta.image_size)[None]
    if vision.metadata.input_tensor_meta(0).dtype() == 6:  # a float32 vision input
        pixels = pixels.float()
    vision_s = _timed(lambda: vision.execute([pixels]), repeats)
    return {
        "text_rss_above_base_mb": (None if measure.baseline_mb is None
                                   else round(text_peak - measure.baseline_mb, 1)),
        "vision_encoder_s": round(median(vision_s), 5),
        "text_prefill600_s": round(median(prefill_s[1:]), 5),
        "text_prefill_chunk": chunk,
        "text_decode_steps": steps,
        "text_decode_tok_s": _round(tok_per_s(steps, median(decode_s[1:])), 3),
        "text_decode_mean_context": mean_context(n, steps),
        "et_threadpool_threads_methods": et_threads,
        "xnnpack_registered_methods": _xnnpack_registered(),
    }


def transformers_case(checkpoint: str, image: str, question: str, dtype: str, decode_tokens: int,
                      threads: int, repeats: int) -> dict:
    """transformers eager: image features, image+prompt prefill, greedy decode; then the
    text model alone on the 600 seeded ids."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..image import load_image
    from ..tokenizer import IMAGE_TOKEN, LLAVA_PROMPT_TEMPLATE

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
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
            out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=inputs["attention_mask"],
                        use_cache=True, logits_to_keep=1)
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


def merge_processes(runs: list[dict]) -> dict:
    """One result from the same case run in several processes: each number is the median
    over them (None if a run had none), anything else is the first run's; ``processes``
    says how many."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(runs) > 1:
            if None in values:
                out[key] = None
            elif all(isinstance(v, int) for v in values):  # counts stay counts
                out[key] = statistics.median_low(values)
            else:
                out[key] = round(median(values), 5)
    out["processes"] = len(runs)
    return out


def _median_rate(rates: list[float | None]) -> float | None:
    """Median of per-run rates, None if a run had none (an EOS as the first answer token)."""
    return None if None in rates else round(median(rates), 3)


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


# ------------------------------------------------------------------ orchestration


@dataclass(frozen=True)
class PteCase:
    label: str
    pte: Path
    tokenizer: Path


def infer_label(pte: Path) -> str:
    """The quantization scheme recorded by the pipeline that made ``pte`` (its outputs
    folder's quantize/manifest.json; "none" reads "fp32"), else the file's stem."""
    manifest = Path(pte).parent / "quantize" / "manifest.json"
    try:
        scheme = json.loads(manifest.read_text())["config"]["quant"]["scheme"]
    except (OSError, ValueError, KeyError, TypeError):
        return Path(pte).stem
    return "fp32" if scheme == "none" else str(scheme)


def resolve_ptes(items: Iterable, tokenizer: Path | None = None) -> list[PteCase]:
    """PteCases from a mix of PteCase, (label, path) pairs and paths; a folder means its
    llava.pte; the tokenizer is ``tokenizer`` if given, else tokenizer.bin beside the .pte."""
    cases = []
    for item in items:
        label = None
        if isinstance(item, PteCase):
            cases.append(item)
            continue
        if isinstance(item, tuple):
            label, item = item
        path = Path(item)
        if path.is_dir():
            path = path / "llava.pte"
        tok = Path(tokenizer) if tokenizer is not None else path.parent / "tokenizer.bin"
        cases.append(PteCase(label or infer_label(path), path, tok))
    labels = [c.label for c in cases]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must differ, got {labels}")
    for c in cases:
        for what in (c.pte, c.tokenizer):
            if not what.is_file():
                raise ValueError(f"{what}: not found")
    return cases


def _shown(path: Path) -> str:
    """A path for the JSON: relative to the working directory when under it, else its name."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return Path(path).name


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def busy_fraction(before: str, after: str) -> float | None:
    """Share of all cores' time spent busy between two readings of /proc/stat's "cpu" line."""
    a, b = ([int(v) for v in line.split()[1:9]] for line in (before, after))
    total = sum(b) - sum(a)
    idle = (b[3] + b[4]) - (a[3] + a[4])  # idle + iowait
    return round((total - idle) / total, 3) if total > 0 else None


def machine_busy(interval: float = 0.5) -> float | None:
    """How busy the machine's cores are over ``interval`` s while this process only sleeps:
    the CPU other jobs take away from the next case (0 = idle, 1 = every core busy)."""
    def read() -> str:
        with open("/proc/stat") as f:
            return f.readline()

    try:
        first = read()
        time.sleep(interval)
        return busy_fraction(first, read())
    except (OSError, ValueError, IndexError):
        return None


def _log(message: str) -> None:
    print(f"[bench runtime] {message}", file=sys.stderr, flush=True)


_ET_PREIMPORT = ("torch", "executorch.extension.llm.runner", "executorch.extension.pybindings.portable_lib",
                 "llava_pipeline.runner", "llava_pipeline.chat")
_HF_PREIMPORT = ("torch", "transformers", "transformers.models.llava.modeling_llava", "PIL.Image",
                 "llava_pipeline.image")


def measure_all(ptes: Iterable, checkpoint: Path, image: Path, prompt: str = DEFAULT_QUESTION, *,
                tokenizer: Path | None = None, decode_tokens: int = 32, threads: int = 2,
                engines: Sequence[str] = ENGINES, hf_dtypes: Sequence[str] = HF_DTYPES, repeats: int = 3,
                bandwidth_gib: float = 1.0, processes: int | dict[str, int] = 1,
                isolated=measure.isolated) -> dict:
    """Every case, each in its own process; the JSON-able result (see the module docstring).

    ``ptes``: .pte paths, folders holding llava.pte, ``(label, path)`` pairs or PteCases.
    ``prompt`` is the question put in the LLaVA-1.5 template. ``processes``: how many
    processes each ExecuTorch case runs in, for all labels or per label (numbers are then
    medians over them: on a shared machine runs differ by more than repeats within one
    process do). The bandwidth is measured before each case and after the last; the highest
    sets the limit.
    ``isolated`` runs one case (tests pass a fake)."""
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        raise ValueError(f"engines must be among {ENGINES}, got {list(engines)}")
    if decode_tokens < 2:
        raise ValueError("decode_tokens must be at least 2 (the first token comes from the prefill)")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    bad = [d for d in hf_dtypes if d not in _TORCH_DTYPES]
    if bad:
        raise ValueError(f"hf_dtypes must be among {list(_TORCH_DTYPES)}, got {bad}")
    cases = resolve_ptes(ptes, tokenizer) if "executorch" in engines else []
    common = dict(decode_tokens=decode_tokens, threads=threads, repeats=repeats)

    def run(what: str, kwargs: dict, preimport: tuple[str, ...]) -> dict:
        _log(f"{what} ...")
        t0 = time.perf_counter()
        load, busy = _load_average(), machine_busy()
        out = isolated(f"{_MODULE}:{what.split()[0]}", kwargs, preimport=preimport, threads=threads)
        # other jobs on the machine make every timing slower and noisier
        out.update(load_avg_1m=load, machine_busy_before=busy)
        _log(f"{what}: {time.perf_counter() - t0:.1f} s (before it: 1-minute load average {load}, "
             f"cores busy {busy})")
        return out

    bandwidths = []

    def probe():  # memory bandwidth: a shared machine's varies over minutes; the best counts
        bandwidths.append(run("bandwidth_case", dict(threads=threads, gib=bandwidth_gib), ("torch",)))

    llc = last_level_cache_bytes()
    rows, ids = [], {}
    for case in cases:
        probe()
        counted = pte_method_bytes(case.pte)
        n = processes if isinstance(processes, int) else processes.get(case.label, 1)
        r = merge_processes([run(f"executorch_runner_case {case.label}",
                                 dict(pte=str(case.pte), tokenizer=str(case.tokenizer), image=str(image),
                                      question=prompt, **common), _ET_PREIMPORT) for _ in range(n)])
        m = merge_processes([run(f"executorch_methods_case {case.label}",
                                 dict(pte=str(case.pte), image=str(image), **common),
                                 _ET_PREIMPORT + ("executorch.runtime",)) for _ in range(n)])
        ids[("executorch", case.label)] = r.pop("prompt_ids")
        m.pop("processes")
        row = {"engine": "executorch", "variant": case.label, "pte": _shown(case.pte),
               "pte_bytes": case.pte.stat().st_size, **r,
               **{f"methods_{k}": m.pop(k) for k in ("rss_base_mb", "rss_peak_mb", "rss_above_base_mb",
                                                      "load_avg_1m", "machine_busy_before")}, **m,
               "weight_bytes_per_token": counted.weight_bytes,
               "weight_bytes_detail": {"named_data": counted.named_data_bytes,
                                       "inline_delegate_constants": counted.inline_constant_bytes,
                                       "other_constants": counted.other_constant_bytes,
                                       "position_tables_left_out": counted.position_table_bytes,
                                       "delegates": counted.delegates,
                                       "backends": list(counted.backends)},
               "kv_bytes_per_position": counted.kv_bytes_per_position,
               "kv_buffers": counted.kv_buffers}
        rows.append(row)
    if "transformers" in engines:
        for dtype in hf_dtypes:
            probe()
            r = run(f"transformers_case {dtype}", dict(checkpoint=str(checkpoint), image=str(image),
                                                        question=prompt, dtype=dtype, **common), _HF_PREIMPORT)
            ids[("transformers", dtype)] = r.pop("prompt_ids")
            rows.append({"engine": "transformers", "variant": dtype, **r})
    probe()
    best = max(bandwidths, key=lambda b: b["bandwidth_gb_s"])
    bw = {k: best[k] for k in ("bandwidth_by_kernel_gb_s", "bandwidth_bytes", "bandwidth_threads")}
    bw.update(bandwidth_probe_gb_s=best["bandwidth_gb_s"], bandwidth_load_avg_1m=best["load_avg_1m"],
              bandwidth_machine_busy_before=best["machine_busy_before"],
              bandwidth_runs_gb_s=[b["bandwidth_gb_s"] for b in bandwidths])
    rows = [add_bandwidth_fields(row, best["bandwidth_gb_s"], llc) for row in rows]
    bw["bandwidth_gb_s"], bw["bandwidth_reached_by"] = machine_bandwidth(bw["bandwidth_runs_gb_s"], rows)
    rows = [add_bandwidth_fields(row, bw["bandwidth_gb_s"], llc) for row in rows]
    reference = next((v for k, v in ids.items() if k[0] == "executorch"), None)
    for row in rows:
        row["prompt_ids_match_executorch"] = (None if reference is None
                                              else ids[(row["engine"], row["variant"])] == reference)
    return {
        "kind": "runtime",
        "threads": threads,
        "repeats": repeats,
        "decode_tokens": decode_tokens,
        "text_prefill_tokens": TEXT_PREFILL_TOKENS,
        "prompt": prompt,
        "image": _shown(image),
        "checkpoint": _shown(checkpoint),
        "last_level_cache_bytes": llc,
        **bw,
        "rows": rows,
    }


# ------------------------------------------------------------------ command line


class _PteAction(argparse.Action):
    """--pte appends [path, None] to ``ptes``; --label names the --pte right before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        ptes = getattr(namespace, "ptes", None) or []
        if option_string == "--pte":
            ptes.append([Path(value), None])
        elif not ptes or ptes[-1][1] is not None:
            parser.error("--label must follow the --pte it names")
        else:
            ptes[-1][1] = value
        namespace.ptes = ptes


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n")[0])
    p.set_defaults(ptes=[])
    p.add_argument("--pte", action=_PteAction, dest="ptes",
                   help="a .pte (or a folder holding llava.pte); repeat for several")
    p.add_argument("--label", action=_PteAction, dest="ptes",
                   help="names the --pte just before it (default: its pipeline's quant scheme, none = fp32)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.bin for every .pte (default: beside each)")
    p.add_argument("--checkpoint", type=Path, required=True, help="the HF checkpoint folder (outputs/download)")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", default=DEFAULT_QUESTION, help="the question, put in the LLaVA-1.5 template")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--hf-dtypes", default=",".join(HF_DTYPES))
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--processes", type=int, default=1,
                   help="processes per ExecuTorch case; numbers are medians over them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    engines = tuple(e for e in args.engines.split(",") if e)
    if "executorch" in engines and not args.ptes:
        print("error: --pte is required for the executorch engine", file=sys.stderr)
        return 2
    try:
        result = measure_all(
            [(label, pte) if label else pte for pte, label in args.ptes], args.checkpoint, args.image, args.prompt,
            tokenizer=args.tokenizer, decode_tokens=args.decode_tokens, threads=args.threads, engines=engines,
            hf_dtypes=tuple(d for d in args.hf_dtypes.split(",") if d), repeats=args.repeats,
            bandwidth_gib=args.bandwidth_gib, processes=args.processes,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
