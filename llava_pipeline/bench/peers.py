"""llama.cpp on the same LLaVA-1.5 text model: the peer rows of the benchmark.

`python -m llava_pipeline.bench.peers --checkpoint DIR --out outputs/bench/peers.json`

1. Extract the language model of an HF LlavaForConditionalGeneration folder into a
   LlamaForCausalLM folder (config.json from text_config, weights renamed to
   `model.*` / `lm_head.weight`, tokenizer.model copied). Tensors are copied byte for
   byte from the source safetensors (single file or sharded, transformers v4 or v5
   key names) to one output file, a chunk at a time: dtype is kept and memory stays
   flat whatever the checkpoint's size.
2. Convert it to GGUF (F16 by default) with llama.cpp's own `convert_hf_to_gguf.py`
   and gguf-py, taken from the llama-cpp-python sdist of the installed version, so
   converter and runtime are the same llama.cpp. The converter pads the vocabulary
   to the model's (32064 rows, 32000 SentencePiece pieces) with [PAD...] tokens;
   this is checked on the written file.
3. Quantize to Q8_0 and Q4_0 with `llama_model_quantize` (default llama.cpp
   quantization rules, as `llama-quantize` applies them).
4. Time each GGUF in its own fresh process (llava_pipeline.bench.measure.isolated):
   one prefill of exactly N token ids in a single n_batch = n_ubatch = N batch, then
   M greedy decode steps of one token each, after one untimed warm-up run; medians of
   --repeats runs. Weights are mmapped by default (LLAMA_LOAD_MODE_MMAP, what llama.cpp's
   auto mode picks on CPU); mmapped pages count in RSS once touched and the warm-up
   touches all of them, so nothing hides in the page cache. Tensors llama.cpp repacks
   for the CPU (Q4_0 on AVX2/AVX-512) are copied to anonymous memory at load while the
   file pages they came from stay mapped: with mmap their bytes count twice in RSS.
   --no-mmap (LLAMA_LOAD_MODE_NONE) reads everything into anonymous memory instead.
   The JSON's `resident_at_end_mb` gives the anonymous / file-backed split.

Work files (sdist, extracted text model, GGUFs) go under --work, never into git.
Errors in the input are one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

from .measure import isolated

PACKAGE = "llama-cpp-python"
DEFAULT_WORK = Path("outputs/bench/peers-work")
# (variant, llama_ftype) in the order they are reported; the reference comes first.
QUANTS = (("Q8_0", 7), ("Q4_0", 2))
REF_TYPES = {"f16": "F16", "f32": "F32"}
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
COPY_CHUNK = 64 << 20
MODULE = "llava_pipeline.bench.peers"  # not __name__: that is __main__ under -m


class PeersError(RuntimeError):
    """Bad input or a failed step: reported as one `error:` line."""


# --------------------------------------------------------------------------- input


def read_llava_config(ckpt: Path) -> dict:
    """config.json of an HF LLaVA checkpoint, checked: model_type llava, llama text model."""
    path = ckpt / "config.json"
    if not ckpt.is_dir():
        raise PeersError(f"{ckpt}: checkpoint folder not found")
    if not path.is_file():
        raise PeersError(f"{path}: missing from the checkpoint")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeersError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llava":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise PeersError(f"{path}: not a LLaVA config (model_type {got!r}, expected 'llava')")
    text = cfg.get("text_config") or {}
    if not isinstance(text, dict) or text.get("model_type", "llama") != "llama":
        raise PeersError(f"{path}: text_config is not a llama model "
                         f"(model_type {text.get('model_type') if isinstance(text, dict) else text!r})")
    return cfg


def resolved_text_config(ckpt: Path) -> dict:
    """text_config with transformers' defaults filled in (llava-hf configs omit many)."""
    from transformers import LlavaConfig

    try:
        cfg = LlavaConfig.from_pretrained(str(ckpt))
    except Exception as e:  # transformers raises many kinds
        raise PeersError(f"{ckpt / 'config.json'}: transformers cannot read it ({e})") from None
    text = cfg.text_config.to_dict()
    top_dtype = cfg.to_dict().get("dtype") or cfg.to_dict().get("torch_dtype")
    if not text.get("dtype") and top_dtype:
        text["dtype"] = str(top_dtype).replace("torch.", "")
    text.pop("torch_dtype", None)
    text["architectures"] = ["LlamaForCausalLM"]
    text["model_type"] = "llama"
    return text


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint (index first, then a single file)."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise PeersError(f"{index}: not a safetensors index ({e})") from None
        files = [ckpt / n for n in names]
        for f in files:
            if not f.is_file():
                raise PeersError(f"{f}: listed in {index.name} but missing")
        return files
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [single]
    raise PeersError(f"{single}: missing from the checkpoint (and no {index.name})")


def text_key(name: str) -> str | None:
    """LlamaForCausalLM name of a LLaVA tensor; None for vision tower and projector.

    transformers v4 layout: language_model.model.* / language_model.lm_head.weight;
    v5 layout: model.language_model.* / lm_head.weight.
    """
    for prefix in ("language_model.model.", "model.language_model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    return None


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where the data starts)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < (256 << 20):
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PeersError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def plan_text_tensors(files: list[Path]) -> dict[str, tuple[Path, int, dict]]:
    """New name -> (source file, data start, header entry), for the text model only."""
    plan: dict[str, tuple[Path, int, dict]] = {}
    for path in files:
        header, start = read_safetensors_header(path)
        for name, entry in header.items():
            new = text_key(name)
            if new is None:
                continue
            if new in plan:
                raise PeersError(f"{path}: tensor {name} maps to {new}, which another tensor already gave")
            plan[new] = (path, start, entry)
    return dict(sorted(plan.items()))


def check_text_tensors(plan: dict, text_cfg: dict, where: Path) -> None:
    n_layers = text_cfg["num_hidden_layers"]
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    if not text_cfg.get("tie_word_embeddings"):
        need.append("lm_head.weight")
    for i in range(n_layers):
        need += [f"model.layers.{i}.{p}.weight" for p in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    missing = [k for k in need if k not in plan]
    if missing:
        raise PeersError(f"{where}: the language model lacks {len(missing)} tensor(s), e.g. {missing[0]}")


def write_text_model(ckpt: Path, out: Path, text_cfg: dict | None = None) -> dict:
    """The LlamaForCausalLM folder (config.json, model.safetensors, tokenizer.model).

    Tensors are copied raw from the source files in COPY_CHUNK pieces. Returns the
    text config written."""
    read_llava_config(ckpt)
    tok = ckpt / "tokenizer.model"
    if not tok.is_file():
        raise PeersError(f"{tok}: missing from the checkpoint (the SentencePiece model is needed)")
    text_cfg = text_cfg or resolved_text_config(ckpt)
    plan = plan_text_tensors(weight_files(ckpt))
    check_text_tensors(plan, text_cfg, ckpt)

    header, offset = {}, 0
    for name, (_, _, entry) in plan.items():
        begin, end = entry["data_offsets"]
        header[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                        "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.safetensors", "wb") as dst:
        dst.write(len(blob).to_bytes(8, "little"))
        dst.write(blob)
        for name, (src_path, start, entry) in plan.items():
            begin, end = entry["data_offsets"]
            with open(src_path, "rb") as src:
                src.seek(start + begin)
                left = end - begin
                while left:
                    chunk = src.read(min(left, COPY_CHUNK))
                    if not chunk:
                        raise PeersError(f"{src_path}: truncated in tensor data")
                    dst.write(chunk)
                    left -= len(chunk)
    (out / "config.json").write_text(json.dumps(text_cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(tok, out / "tokenizer.model")
    return text_cfg


# --------------------------------------------------------------- llama.cpp tools


def llama_cpp_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise PeersError(f"{PACKAGE} is not installed (pip install {PACKAGE}==0.3.36)") from None


def fetch_sdist(work: Path, version: str, sdist: Path | None = None) -> Path:
    """The llama-cpp-python sdist of `version`: given, cached under work/, or pip-downloaded."""
    if sdist is not None:
        if not sdist.is_file():
            raise PeersError(f"{sdist}: sdist not found")
        return sdist
    cache = work / "sdist"
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (cache / name).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"downloading the {PACKAGE} {version} sdist (for convert_hf_to_gguf.py)")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"{PACKAGE}=={version}", "-d", str(cache)], capture_output=True, text=True)
        if proc.returncode != 0 or not (cache / name).is_file():
            raise PeersError(f"{cache / name}: pip download failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return cache / name


def extract_converter(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp's converter, conversion/ and gguf-py/ from the sdist; the script's path."""
    script = dest / "convert_hf_to_gguf.py"
    stamp = dest / ".from"
    if script.is_file() and stamp.is_file() and stamp.read_text() == sdist.name:
        return script
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/REST
            if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and (m.isfile() or m.isdir()):
                rest = parts[3]
                if any(rest == f or (f.endswith("/") and rest.startswith(f)) for f in CONVERTER_FILES):
                    m.name = rest
                    members.append(m)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise PeersError(f"{sdist}: has no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            tar.extractall(tmp, members=members, filter="data")
        except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
            tar.extractall(tmp, members=members)
    (tmp / ".from").write_text(sdist.name)
    tmp.rename(dest)
    return script


def convert_to_gguf(script: Path, model_dir: Path, out: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py with its own gguf-py (it puts it on sys.path)."""
    tmp = out.with_name(out.name + ".partial")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        raise PeersError(f"{script}: conversion failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    tmp.rename(out)


def gguf_vocab_check(path: Path, converter_dir: Path, vocab_size: int) -> dict:
    """Token list length and token_embd rows of a GGUF must both equal the model's vocab."""
    code = (
        "import json, sys\n"
        "sys.path.insert(1, sys.argv[2])\n"
        "import gguf\n"
        "r = gguf.GGUFReader(sys.argv[1])\n"
        "f = r.fields['tokenizer.ggml.tokens']\n"
        "toks = [bytes(f.parts[i]).decode('utf-8', 'replace') for i in f.data]\n"
        "emb = next(t for t in r.tensors if t.name == 'token_embd.weight')\n"
        "print(json.dumps({'n_tokens': len(toks), 'embd_rows': int(emb.shape[-1]),\n"
        "                  'pad_tokens': sum(t.startswith('[PAD') for t in toks),\n"
        "                  'last': toks[-1], 'gguf': getattr(gguf, '__version__', None)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(converter_dir / "gguf-py")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeersError(f"{path}: cannot read it back with gguf-py: {proc.stderr.strip()[-800:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["n_tokens"] != vocab_size or info["embd_rows"] != vocab_size:
        raise PeersError(f"{path}: vocabulary has {info['n_tokens']} tokens and token_embd "
                         f"{info['embd_rows']} rows, expected {vocab_size}")
    return info


# ----------------------------------------------------------- child-process work


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


def time_gguf(path: str, prompt_tokens: int, decode_tokens: int, threads: int, repeats: int,
              seed: int = 0, use_mmap: bool = True) -> dict:
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
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                out[f"{key.lower()[:3]}_{key[3:].lower()}_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out


# ------------------------------------------------------------------------ driver


def log(msg: str) -> None:
    print(f"peers: {msg}", file=sys.stderr, flush=True)


def fingerprint(ckpt: Path, files: list[Path], version: str, outtype: str) -> str:
    """What the work files depend on: config, weight files (name, size, mtime), tool version."""
    h = hashlib.sha256()
    h.update((ckpt / "config.json").read_bytes())
    tok = ckpt / "tokenizer.model"
    for f in [*files, tok]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"{PACKAGE}=={version} outtype={outtype}".encode())
    return h.hexdigest()


def build_ggufs(ckpt: Path, work: Path, outtype: str, threads: int, sdist: Path | None,
                version: str) -> tuple[dict, dict[str, Path]]:
    """Text model -> reference GGUF -> quantized GGUFs, reused when the fingerprint matches."""
    cfg_text = resolved_text_config(ckpt)
    files = weight_files(ckpt)
    if not (ckpt / "tokenizer.model").is_file():
        raise PeersError(f"{ckpt / 'tokenizer.model'}: missing from the checkpoint")
    ref = REF_TYPES[outtype]
    ggufs = {ref: work / "gguf" / f"text-{ref.lower()}.gguf"}
    ggufs.update({v: work / "gguf" / f"text-{v.lower()}.gguf" for v, _ in QUANTS})
    stamp = work / "gguf" / "fingerprint"
    fp = fingerprint(ckpt, files, version, outtype)
    if stamp.is_file() and stamp.read_text() == fp and all(p.is_file() for p in ggufs.values()):
        log(f"reusing the GGUFs in {work / 'gguf'}")
        return cfg_text, ggufs

    converter = extract_converter(fetch_sdist(work, version, sdist), work / "llama.cpp")
    text_dir = work / "text-model"
    if text_dir.exists():
        shutil.rmtree(text_dir)
    log(f"extracting the language model into {text_dir}")
    write_text_model(ckpt, text_dir, cfg_text)
    (work / "gguf").mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    log(f"converting to GGUF {ref} with {converter.name}")
    t = time.perf_counter()
    convert_to_gguf(converter, text_dir, ggufs[ref], outtype)
    log(f"  {time.perf_counter() - t:.1f} s")
    info = gguf_vocab_check(ggufs[ref], converter.parent, cfg_text["vocab_size"])
    log(f"  vocab {info['n_tokens']} tokens ({info['pad_tokens']} [PAD] tokens, last {info['last']!r})")
    shutil.rmtree(text_dir)  # as big as the text weights; the GGUF holds them now
    for variant, ftype in QUANTS:
        log(f"quantizing to {variant}")
        tmp = ggufs[variant].with_name(ggufs[variant].name + ".partial")
        r = isolated(f"{MODULE}:quantize_gguf",
                     {"src": str(ggufs[ref]), "dst": str(tmp), "ftype": ftype, "threads": threads},
                     preimport=("llama_cpp",), threads=threads)
        tmp.rename(ggufs[variant])
        log(f"  {r['quantize_s']:.1f} s")
    stamp.write_text(fp)
    return cfg_text, ggufs


def _busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes over `seconds` (this one sleeps meanwhile)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def time_all(ggufs: dict[str, Path], args) -> tuple[list[dict], int, dict]:
    """One fresh process per GGUF: the JSON rows, the context size llama.cpp used, and
    per variant the resident memory split (anonymous / file-backed) with the model loaded."""
    rows, n_ctx, resident = [], None, {}
    busy = _busy_cores()
    if busy is not None and busy > 0.25:
        log(f"warning: other processes keep {busy:.1f} of the {os.cpu_count()} cores busy: "
            f"they compete with llama.cpp's {args.threads} threads and the timings will be low")
    for variant, path in ggufs.items():
        log(f"timing {variant} ({path.stat().st_size / 2**20:.0f} MiB)")
        r = isolated(f"{MODULE}:time_gguf",
                     {"path": str(path), "prompt_tokens": args.prompt_tokens,
                      "decode_tokens": args.decode_tokens, "threads": args.threads,
                      "repeats": args.repeats, "seed": args.seed, "use_mmap": not args.no_mmap},
                     preimport=("llama_cpp",), threads=args.threads)
        log(f"  prefill {r['prefill_tok_s']} tok/s, decode {r['decode_tok_s']} tok/s, "
            f"peak RSS {r['rss_peak_mb']} MiB (+{r['rss_above_base_mb']}), runs {r['prefill_s_runs']} / "
            f"{r['decode_s_runs']}, greedy {r['greedy_head']}; resident at the end: "
            f"anon {r.get('rss_anon_mb')} MiB, file {r.get('rss_file_mb')} MiB")
        rows.append({
            "engine": "llama.cpp",
            "variant": variant,
            "file_mb": round(path.stat().st_size / 2**20, 1),
            **{k: r[k] for k in ("prefill_s", "prefill_tok_s", "decode_tok_s",
                                 "rss_above_base_mb", "rss_peak_mb", "rss_base_mb")},
        })
        n_ctx = r["n_ctx"]
        resident[variant] = {"anon": r.get("rss_anon_mb"), "file": r.get("rss_file_mb")}
    return rows, n_ctx, resident


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path, help="HF LLaVA-1.5 checkpoint folder")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/peers.json"))
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outtype", choices=sorted(REF_TYPES), default="f16",
                    help="the unquantized reference GGUF (and the input of the quantizer)")
    ap.add_argument("--no-mmap", action="store_true",
                    help="load weights into anonymous memory instead of mmapping the GGUF")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="sdist, text model, GGUFs")
    ap.add_argument("--sdist", type=Path, default=None,
                    help=f"a {PACKAGE} sdist to take the converter from (default: pip download)")
    args = ap.parse_args(argv)
    try:
        if args.prompt_tokens < 1 or args.decode_tokens < 0 or args.threads < 1 or args.repeats < 1:
            raise PeersError("--prompt-tokens, --threads and --repeats must be >= 1, --decode-tokens >= 0")
        cfg = read_llava_config(args.checkpoint)
        weight_files(args.checkpoint)
        version = llama_cpp_version()
        text_cfg, ggufs = build_ggufs(args.checkpoint, args.work, args.outtype, args.threads,
                                      args.sdist, version)
    except PeersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a llama.cpp step failed in its child process
        print(f"error: {e}", file=sys.stderr)
        return 1
    del cfg
    try:
        rows, n_ctx, resident = time_all(ggufs, args)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {
        "kind": "peers",
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "checkpoint": {
            "text_layers": text_cfg["num_hidden_layers"],
            "hidden_size": text_cfg["hidden_size"],
            "vocab_size": text_cfg["vocab_size"],
        },
        "settings": {
            "use_mmap": not args.no_mmap,
            "n_batch": args.prompt_tokens,
            "n_ubatch": args.prompt_tokens,
            "n_ctx": n_ctx,
            "flash_attn": "auto",
            "seed": args.seed,
            # llama.cpp's default rules: Q4_0 keeps output.weight (lm_head) in Q6_K.
            "quantize": "llama_model_quantize defaults",
        },
        "rows": rows,
        # After the timed runs, model still loaded. With mmap the file pages count in RSS;
        # tensors llama.cpp repacks (Q4_0 on AVX2/AVX-512) also have an anonymous copy.
        "resident_at_end_mb": resident,
        "versions": {"llama_cpp_python": version},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.rename(args.out)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
