"""Run-time benchmark: ExecuTorch (the project's runner) beside transformers eager, same inputs.

    python -m bench.runtime --pte outputs/llava.pte [--label 8da4w] \\
        [--pte /tmp/fp32/outputs/llava.pte --label fp32 ...] --tokenizer outputs/tokenizer.bin \\
        --checkpoint outputs/download --image assets/images/coffee.jpg \\
        --out outputs/bench/runtime-tiny.json [--decode-tokens 32] [--threads 2] [--repeats 3]

Every case runs in a fresh interpreter (``measure.isolated``), so its peak RSS is its own;
memory is reported above a baseline taken after the case's imports. What each case times:
``bench.runtime_cases`` (two processes per .pte: the runner, and the methods alone;
transformers eager per dtype). All cases use the same checkpoint weights, image and
LLaVA-1.5 prompt (``USER: <image>\\n{question} ASSISTANT:``: 576 image positions + the text
tokens).

Bandwidth: its own process (``bandwidth_case``) before each case and after the last; the
limits use the highest read rate reached in the run (``rates.machine_bandwidth``). A row's
``bandwidth_limit_tok_s`` and ``fraction_of_limit`` (``text_*`` for the 600-position text
decode) come from its weight and KV bytes per token (``bench.pte_bytes`` for a .pte, the
parameters for transformers) as ``bench.rates`` defines them.

Each row also records ``machine_busy_before`` (share of all cores busy during 0.5 s just
before the case started, while this benchmark slept) and ``load_avg_1m``: other jobs on the
machine slow every timing down, so trust rows whose ``machine_busy_before`` is near 0
(docs/bench.md has the slowdowns measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from . import measure
from .host import last_level_cache_bytes, load_average, machine_busy
from .pte_bytes import pte_method_bytes
from .rates import add_bandwidth_fields, machine_bandwidth, merge_processes
from .runtime_cases import TEXT_PREFILL_TOKENS, TORCH_DTYPES

DEFAULT_QUESTION = "What is shown in this picture?"
ENGINES = ("executorch", "transformers")
HF_DTYPES = ("fp32", "bf16")
_MODULE = "bench.runtime"
_CASES = "bench.runtime_cases"  # the functions measure.isolated runs, one process each


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


def _log(message: str) -> None:
    print(f"[bench runtime] {message}", file=sys.stderr, flush=True)


_ET_PREIMPORT = (
    "torch",
    "executorch.extension.llm.runner",
    "executorch.extension.pybindings.portable_lib",
    "llava_pipeline.runtime.runner",
    "llava_pipeline.runtime.chat",
)
_HF_PREIMPORT = (
    "torch",
    "transformers",
    "transformers.models.llava.modeling_llava",
    "PIL.Image",
    "llava_pipeline.formats.image",
)


def measure_all(
    ptes: Iterable,
    checkpoint: Path,
    image: Path,
    prompt: str = DEFAULT_QUESTION,
    *,
    tokenizer: Path | None = None,
    decode_tokens: int = 32,
    threads: int = 2,
    engines: Sequence[str] = ENGINES,
    hf_dtypes: Sequence[str] = HF_DTYPES,
    repeats: int = 3,
    bandwidth_gib: float = 1.0,
    processes: int | dict[str, int] = 1,
    isolated=measure.isolated,
) -> dict:
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
    bad = [d for d in hf_dtypes if d not in TORCH_DTYPES]
    if bad:
        raise ValueError(f"hf_dtypes must be among {list(TORCH_DTYPES)}, got {bad}")
    cases = resolve_ptes(ptes, tokenizer) if "executorch" in engines else []
    common = dict(decode_tokens=decode_tokens, threads=threads, repeats=repeats)

    def run(what: str, kwargs: dict, preimport: tuple[str, ...]) -> dict:
        _log(f"{what} ...")
        t0 = time.perf_counter()
        load, busy = load_average(), machine_busy()
        out = isolated(f"{_CASES}:{what.split()[0]}", kwargs, preimport=preimport, threads=threads)
        # other jobs on the machine make every timing slower and noisier
        out.update(load_avg_1m=load, machine_busy_before=busy)
        _log(f"{what}: {time.perf_counter() - t0:.1f} s (before it: 1-minute load average {load}, cores busy {busy})")
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
        r = merge_processes(
            [
                run(
                    f"executorch_runner_case {case.label}",
                    dict(pte=str(case.pte), tokenizer=str(case.tokenizer), image=str(image), question=prompt, **common),
                    _ET_PREIMPORT,
                )
                for _ in range(n)
            ]
        )
        m = merge_processes(
            [
                run(
                    f"executorch_methods_case {case.label}",
                    dict(pte=str(case.pte), image=str(image), **common),
                    _ET_PREIMPORT + ("executorch.runtime",),
                )
                for _ in range(n)
            ]
        )
        ids[("executorch", case.label)] = r.pop("prompt_ids")
        m.pop("processes")
        row = {
            "engine": "executorch",
            "variant": case.label,
            "pte": _shown(case.pte),
            "pte_bytes": case.pte.stat().st_size,
            **r,
            **{
                f"methods_{k}": m.pop(k)
                for k in ("rss_base_mb", "rss_peak_mb", "rss_above_base_mb", "load_avg_1m", "machine_busy_before")
            },
            **m,
            "weight_bytes_per_token": counted.weight_bytes,
            "weight_bytes_detail": {
                "named_data": counted.named_data_bytes,
                "inline_delegate_constants": counted.inline_constant_bytes,
                "other_constants": counted.other_constant_bytes,
                "position_tables_left_out": counted.position_table_bytes,
                "delegates": counted.delegates,
                "backends": list(counted.backends),
            },
            "kv_bytes_per_position": counted.kv_bytes_per_position,
            "kv_buffers": counted.kv_buffers,
        }
        rows.append(row)
    if "transformers" in engines:
        for dtype in hf_dtypes:
            probe()
            r = run(
                f"transformers_case {dtype}",
                dict(checkpoint=str(checkpoint), image=str(image), question=prompt, dtype=dtype, **common),
                _HF_PREIMPORT,
            )
            ids[("transformers", dtype)] = r.pop("prompt_ids")
            rows.append({"engine": "transformers", "variant": dtype, **r})
    probe()
    best = max(bandwidths, key=lambda b: b["bandwidth_gb_s"])
    bw = {k: best[k] for k in ("bandwidth_by_kernel_gb_s", "bandwidth_bytes", "bandwidth_threads")}
    bw.update(
        bandwidth_probe_gb_s=best["bandwidth_gb_s"],
        bandwidth_load_avg_1m=best["load_avg_1m"],
        bandwidth_machine_busy_before=best["machine_busy_before"],
        bandwidth_runs_gb_s=[b["bandwidth_gb_s"] for b in bandwidths],
    )
    rows = [add_bandwidth_fields(row, best["bandwidth_gb_s"], llc) for row in rows]
    bw["bandwidth_gb_s"], bw["bandwidth_reached_by"] = machine_bandwidth(bw["bandwidth_runs_gb_s"], rows)
    rows = [add_bandwidth_fields(row, bw["bandwidth_gb_s"], llc) for row in rows]
    reference = next((v for k, v in ids.items() if k[0] == "executorch"), None)
    for row in rows:
        row["prompt_ids_match_executorch"] = (
            None if reference is None else ids[(row["engine"], row["variant"])] == reference
        )
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
    p.add_argument(
        "--pte", action=_PteAction, dest="ptes", help="a .pte (or a folder holding llava.pte); repeat for several"
    )
    p.add_argument(
        "--label",
        action=_PteAction,
        dest="ptes",
        help="names the --pte just before it (default: its pipeline's quant scheme, none = fp32)",
    )
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
    p.add_argument(
        "--processes", type=int, default=1, help="processes per ExecuTorch case; numbers are medians over them"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    engines = tuple(e for e in args.engines.split(",") if e)
    if "executorch" in engines and not args.ptes:
        print("error: --pte is required for the executorch engine", file=sys.stderr)
        return 2
    try:
        result = measure_all(
            [(label, pte) if label else pte for pte, label in args.ptes],
            args.checkpoint,
            args.image,
            args.prompt,
            tokenizer=args.tokenizer,
            decode_tokens=args.decode_tokens,
            threads=args.threads,
            engines=engines,
            hf_dtypes=tuple(d for d in args.hf_dtypes.split(",") if d),
            repeats=args.repeats,
            bandwidth_gib=args.bandwidth_gib,
            processes=args.processes,
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
