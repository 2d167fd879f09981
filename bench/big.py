"""`make bench-7b`: the full-size LLaVA-1.5-7B export on this machine, and its run time.

The checkpoint is made locally, not downloaded (docs/bench.md says why): LLaVA-1.5-7B's exact
architecture (CLIP ViT-L/14-336, 24 layers; Llama-2-7B text, 32 layers, vocab 32064) with
random bf16 weights, in HF format with sharded safetensors (llava_pipeline.model.synthetic), in
outputs/bench/llava-1.5-7b-random/ (outside every DVC output: nothing caches a second copy).
It then goes through the normal stages, in a scratch project whose params are the
`llava-1.5-7b` preset with `model.source` pointing at that folder, exactly as a user
would export the real checkpoint. Per stage wall time and peak RSS, the .pte's size per
method, and the run time of the result in ExecuTorch's MultimodalRunner (image encode,
prefill of 576 image tokens + prompt, decode tok/s against the bandwidth limit, peak RSS)
go to outputs/bench/7b.json and into results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from llava_pipeline.base.files import write_json
from llava_pipeline.model.checkpoint_files import INDEX_FILE

from . import export_cost, report
from . import runtime as rt

CHECKPOINT = "llava-1.5-7b-random"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"))
    ap.add_argument("--qparams", default="affine", help="quant.qparams (hqq: ExecuTorch's default, ~25 min more)")
    ap.add_argument("--verify-steps", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-export", action="store_true", help="only the run time, on the export already there")
    ap.add_argument(
        "--keep-intermediates",
        action="store_true",
        help="keep the transformed, quantized and partitioned weights (about 26 GB)",
    )
    ap.add_argument("--image", type=Path, default=Path("assets/images/coffee.jpg"))
    ap.add_argument("--prompt", default="What is shown in this picture?")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / CHECKPOINT
    if not (ckpt / INDEX_FILE).is_file():
        import torch

        from llava_pipeline.model.synthetic import (  # torch, transformers: only to write it
            llava_7b_config,
            write_checkpoint,
        )

        log(f"writing the random bf16 checkpoint to {ckpt}")
        partial = ckpt.with_name(ckpt.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        start = time.perf_counter()
        write_checkpoint(partial, llava_7b_config(), seed=0, dtype=torch.bfloat16)
        partial.rename(ckpt)
        log(f"checkpoint written in {time.perf_counter() - start:.0f} s")
    work = args.out / "work" / "llava-1.5-7b"
    result_file = args.out / "7b.json"
    overrides = [
        "model=llava-1.5-7b",
        f"model.source={os.path.relpath(ckpt, work)}",
        "model.revision=null",
        f"quant.qparams={args.qparams}",
        f"emit.verify_steps={args.verify_steps}",
    ]
    if args.skip_export:
        result = json.loads(result_file.read_text())
    else:
        log("export: " + " ".join(overrides))
        result = export_cost.run_export(
            work, overrides, log=log, after_stage=None if args.keep_intermediates else export_cost.prune
        )
        result["config"] = {"overrides": overrides}
        result["kind"] = "7b"
        write_json(result_file, result)
        if not args.keep_intermediates:  # the run time needs only download/ and the .pte
            for name in ("source_transform", "quantize", "partition"):
                shutil.rmtree(work / "outputs" / name, ignore_errors=True)
        log("export done; run time next")
    log("run time")
    outputs = work / "outputs"
    result["runtime"] = rt.measure_all(
        [("8da4w", outputs / "llava.pte")],
        tokenizer=outputs / "tokenizer.bin",
        checkpoint=outputs / "download",
        image=args.image,
        prompt=args.prompt,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        engines=("executorch",),
    )
    write_json(result_file, result)
    report.write(args.out)
    log(f"done: {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
