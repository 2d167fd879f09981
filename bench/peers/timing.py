"""The peer benchmark's child-process work, each run by bench.measure.isolated: quantizing a
GGUF (``quantize_gguf``) and timing one (``time_gguf``: load, then one warm-up and
``repeats`` runs of a one-batch prefill of seeded ids and greedy single-token decode steps;
medians, and the resident memory split with the model still loaded).
"""

from __future__ import annotations

import statistics
import time

from llava_pipeline.base import rss


def quantize_gguf(src: str, dst: str, ftype: int, threads: int) -> dict:
    """llama_model_quantize(src -> dst) with llama.cpp's default rules for `ftype`."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) returned {rc}")
    return {"quantize_s": round(time.perf_counter() - t0, 3)}


def prompt_ids(n: int, seed: int, lo: int = 3, hi: int = 32000) -> list[int]:
    """BOS then n-1 ids drawn from a seeded generator: the same prompt for every engine."""
    import random

    rng = random.Random(seed)
    return [1] + [rng.randrange(lo, hi) for _ in range(n - 1)]


def time_gguf(
    path: str, prompt_tokens: int, decode_tokens: int, threads: int, repeats: int, seed: int = 0, use_mmap: bool = True
) -> dict:
    """Load a GGUF, then (1 warm-up + `repeats`) x (prefill N ids in one batch, M greedy steps)."""
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    fields = {f[0] for f in type(mparams)._fields_}
    if "load_mode" in fields:  # llama.cpp replaced the use_mmap flag with a load-mode enum
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP if use_mmap else L.LLAMA_LOAD_MODE_NONE
    elif "use_mmap" in fields:
        mparams.use_mmap = use_mmap
    else:
        raise RuntimeError("llama_model_params has neither load_mode nor use_mmap")
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise RuntimeError(f"{path}: llama.cpp could not load it")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = prompt_tokens + decode_tokens
    cparams.n_batch = prompt_tokens
    cparams.n_ubatch = prompt_tokens
    cparams.n_seq_max = 1
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError(f"{path}: llama.cpp could not create a context")
    load_s = time.perf_counter() - t0
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    ids = prompt_ids(prompt_tokens, seed, hi=min(32000, n_vocab))
    prompt = (L.llama_token * prompt_tokens)(*ids)
    one = (L.llama_token * 1)()

    def decode(arr, n) -> int:
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, n))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run() -> tuple[float, float, list[int]]:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t = time.perf_counter()
        tok = decode(prompt, prompt_tokens)
        prefill = time.perf_counter() - t
        out = [tok]
        t = time.perf_counter()
        for _ in range(decode_tokens):
            one[0] = tok
            tok = decode(one, 1)
            out.append(tok)
        return prefill, time.perf_counter() - t, out

    run()  # warm-up: pages every weight in, sizes the buffers
    prefills, decodes, outs = [], [], []
    for _ in range(repeats):
        p, d, out = run()
        prefills.append(p)
        decodes.append(d)
        outs.append(out)
    tokens = outs[0]
    n_ctx = L.llama_n_ctx(ctx)
    resident = _rss_split_mb()  # with the model still loaded: anonymous vs file-backed (mmap)
    L.llama_free(ctx)
    L.llama_model_free(model)
    prefill_s = statistics.median(prefills)
    decode_s = statistics.median(decodes)
    return {
        "load_s": round(load_s, 3),
        "n_ctx": int(n_ctx),
        "prefill_s": round(prefill_s, 4),
        "prefill_tok_s": round(prompt_tokens / prefill_s, 2),
        "decode_tok_s": round(decode_tokens / decode_s, 3) if decode_tokens else None,
        "prefill_s_runs": [round(x, 4) for x in prefills],
        "decode_s_runs": [round(x, 4) for x in decodes],
        "greedy_head": tokens[:8],
        "greedy_same_each_run": all(o == tokens for o in outs),
        **resident,
    }


def _rss_split_mb() -> dict:
    out = {}
    for key in ("RssAnon", "RssFile"):
        kb = rss.status_kb(key)
        if kb is not None:
            out[f"{key.lower()[:3]}_{key[3:].lower()}_mb"] = round(kb / 1024, 1)
    return out
