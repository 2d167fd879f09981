"""llama.cpp on the same LLaVA-1.5 text model: the peer rows of the benchmark.

`python -m bench.peers --checkpoint DIR --out outputs/bench/peers.json` (``__main__``)

1. Extract the language model of an HF LlavaForConditionalGeneration folder into a
   LlamaForCausalLM folder (``text_model``): config.json from text_config, weights renamed
   to `model.*` / `lm_head.weight`, tokenizer.model copied. Tensors are copied byte for
   byte from the source safetensors (single file or sharded, transformers v4 or v5 key
   names) to one output file, a chunk at a time: dtype is kept and memory stays flat
   whatever the checkpoint's size.
2. Convert it to GGUF (F16 by default) with llama.cpp's own `convert_hf_to_gguf.py` and
   gguf-py, taken from the llama-cpp-python sdist of the installed version, so converter
   and runtime are the same llama.cpp (``llama_tools``). The converter pads the vocabulary
   to the model's (32064 rows, 32000 SentencePiece pieces) with [PAD...] tokens; this is
   checked on the written file.
3. Quantize to Q8_0 and Q4_0 with `llama_model_quantize` (default llama.cpp quantization
   rules, as `llama-quantize` applies them).
4. Time each GGUF in its own fresh process (bench.measure.isolated, ``timing``): one
   prefill of exactly N token ids in a single n_batch = n_ubatch = N batch, then M greedy
   decode steps of one token each, after one untimed warm-up run; medians of --repeats
   runs. Weights are mmapped by default (LLAMA_LOAD_MODE_MMAP, what llama.cpp's auto mode
   picks on CPU); mmapped pages count in RSS once touched and the warm-up touches all of
   them, so nothing hides in the page cache. --no-mmap (LLAMA_LOAD_MODE_NONE) reads
   everything into anonymous memory instead. The JSON's `resident_at_end_mb` gives the
   anonymous / file-backed split with the model loaded.

Work files (sdist, extracted text model, GGUFs) go under --work, never into git.
Errors in the input are one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

PACKAGE = "llama-cpp-python"


class PeersError(RuntimeError):
    """Bad input or a failed step: reported as one `error:` line."""


def log(msg: str) -> None:
    print(f"peers: {msg}", file=sys.stderr, flush=True)
