"""`make bench`: export cost and run-time speed beside transformers, in one run.

Exports run stage by stage in scratch projects under outputs/bench/work/: the tiny default
(8da4w) and, for the 7B-shape preset, quant.scheme=none (fp32), the preset's 8da4w and an
8da4w export one text and one vision layer deeper (stopping at to_executorch), so that
per-layer costs are measured, not assumed, and scaled to the real 32 text + 24 vision
layers (`--kv8` adds the int8 KV cache variant, `--vision8` the int8 vision tower). The
7B-shape preset is also exported in each other weight scheme (SCHEMES: int4 in groups of 32,
int4 per channel, int8 per channel; `--no-schemes` leaves them out), each timed and profiled
like the preset's own 8da4w, so that results.md names the fastest export of each size class
on this CPU beside llama.cpp's nearest quantization. Then the run-time side
(bench.runtime) times the 7B-shape .pte files in ExecuTorch's
MultimodalRunner and transformers eager fp32/bf16 on the same weights, image and prompt,
with the memory bandwidth measured in the same run. Writes outputs/bench/export.json and
runtime.json (DVC metrics), results.md and plot.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from llava_pipeline.base.machine import machine

from . import export_cost, report
from . import runtime as rt
from .measure import isolated
from .schemes import size_class

FULL_TEXT_LAYERS, FULL_VISION_LAYERS = 32, 24
# The weight schemes exported beside the preset's own (8da4w, groups of 128): variant -> overrides.
SCHEMES = {
    "8da4w-g32": ["quant.group_size=32"],
    "8da4w-pc": ["quant.group_size=0"],  # one scale per output channel
    "8da8w": ["quant.scheme=8da8w", "quant.group_size=0"],
}


def _depth(params: dict) -> tuple[int, int]:
    return params["model"]["text_layers"], params["model"]["vision_layers"]


def extrapolate(
    base: dict, deeper: dict, base_depth, deeper_depth, seq_len: int, kv_width: int, runtime_rss_mb: float | None
) -> dict:
    """Per-layer costs from two exports differing by one text and one vision layer.

    Bytes split exactly by method (decoder vs vision encoder); export time is one number
    for both, so it is split in proportion to the layers' bytes (a stated approximation)."""
    dt, dv = deeper_depth[0] - base_depth[0], deeper_depth[1] - base_depth[1]
    text_b = (deeper["method_bytes"]["text_decoder"] - base["method_bytes"]["text_decoder"]) / dt
    vis_b = (deeper["method_bytes"]["vision_encoder"] - base["method_bytes"]["vision_encoder"]) / dv
    common = [s for s in deeper["stages"] if s in base["stages"]]  # the deeper run stops before emit
    t_base = sum(base["stages"][s]["process_wall_s"] for s in common)
    t_deep = sum(deeper["stages"][s]["process_wall_s"] for s in common)
    per_pair = max(t_deep - t_base, 0.0)
    text_s = per_pair * text_b / (text_b + vis_b) / dt
    vis_s = per_pair * vis_b / (text_b + vis_b) / dv
    add_t, add_v = FULL_TEXT_LAYERS - base_depth[0], FULL_VISION_LAYERS - base_depth[1]
    kv = 2 * seq_len * kv_width * 4  # fp32 K and V cache per text layer
    out = {
        "full_text_layers": FULL_TEXT_LAYERS,
        "full_vision_layers": FULL_VISION_LAYERS,
        "text_layer_bytes": round(text_b),
        "vision_layer_bytes": round(vis_b),
        "pte_bytes": base["pte_bytes"],
        "full_pte_bytes": round(base["pte_bytes"] + add_t * text_b + add_v * vis_b),
        "text_layer_export_s": round(text_s, 2),
        "vision_layer_export_s": round(vis_s, 2),
        "export_s": round(t_base, 1),
        "full_export_s": round(t_base + add_t * text_s + add_v * vis_s, 1),
        "export_stages_scaled": common,
        "seq_len": seq_len,
        "kv_bytes_per_layer": kv,
    }
    if runtime_rss_mb is not None:
        out["runtime_rss_mb"] = runtime_rss_mb
        out["full_runtime_rss_mb"] = round(runtime_rss_mb + (add_t * (text_b + kv) + add_v * vis_b) / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="export and run-time benchmark")
    ap.add_argument("--models", default="tiny,llava-7b-shape")
    ap.add_argument(
        "--runtime-models",
        default="llava-7b-shape",
        help="models whose run time is measured (the tiny model fits in cache: its speeds "
        "say nothing about a real model)",
    )
    ap.add_argument("--kv8", action="store_true", help="also export and time the 8da4w model with export.kv_cache=int8")
    ap.add_argument(
        "--vision8",
        action="store_true",
        help="also export and time the 8da4w model with quant.vision=8da8w (int8 vision tower)",
    )
    ap.add_argument(
        "--no-schemes",
        action="store_true",
        help=f"leave out the other weight schemes of the 7B-shape preset ({', '.join(SCHEMES)})",
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"))
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--processes",
        type=int,
        default=3,
        help="processes each 8da4w case (the ones judged against the targets) runs in; "
        "its numbers are medians over them",
    )
    ap.add_argument("--skip-export", action="store_true", help="reuse the scratch exports already there")
    ap.add_argument("--skip-runtime", action="store_true")
    ap.add_argument(
        "--download-only",
        action="store_true",
        help="only the checkpoints (outputs/bench/work/<model>-fp32/outputs/download), for bench-peers",
    )
    ap.add_argument("--image", type=Path, default=Path("assets/images/coffee.jpg"))
    ap.add_argument("--prompt", default="What is shown in this picture?")
    args = ap.parse_args(argv)
    out, work = args.out, args.out / "work"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    if args.download_only:
        for model in args.models.split(","):
            folder = work / f"{model}-fp32"
            export_cost.make_project(folder, [f"model={model}"])
            export_cost.run_stages(folder, ["download"], log=log)
        return 0
    runs: dict[str, dict] = {}
    params: dict[str, dict] = {}
    for model in args.models.split(","):
        timed = model in args.runtime_models.split(",")
        # (variant, overrides, the variant whose finished stages it reuses)
        plans: list[tuple[str, list[str], str | None]] = (
            [
                ("fp32", [f"model={model}", "quant.scheme=none", "quant.embedding_bits=none"], None),
                ("8da4w", [f"model={model}"], "fp32"),
            ]
            if timed
            else [("8da4w", [f"model={model}"], None)]
        )
        p = export_cost.compose(export_cost.ROOT / "conf", [f"model={model}"])
        if p["model"]["text_layers"] is not None:  # built-in with a depth (the 7B-shape preset)
            t, v = _depth(p)
            if timed and not args.no_schemes:
                plans += [(variant, [f"model={model}", *extra], "fp32") for variant, extra in SCHEMES.items()]
            if args.kv8:
                plans.append(("8da4w-kv8", [f"model={model}", "export.kv_cache=int8"], "fp32"))
            if args.vision8:
                plans.append(("8da4w-vision8", [f"model={model}", "quant.vision=8da8w"], "fp32"))
            # One text and one vision layer more: per-layer costs measured, not assumed.
            plans.append(
                ("8da4w-deeper", [f"model={model}", f"model.text_layers={t + 1}", f"model.vision_layers={v + 1}"], None)
            )
        for variant, overrides, reuse in plans:
            key = f"{model}/{variant}"
            folder = work / f"{model}-{variant}"
            params[key] = export_cost.make_project(folder, overrides)
            # The deeper export only measures sizes and per-layer cost: no emit (its verifier
            # re-runs the model eagerly and is not part of the per-layer scaling).
            until = "to_executorch" if variant.endswith("deeper") else "emit"
            done = folder / "outputs" / ("llava.pte" if until == "emit" else "to_executorch/model.pte")
            if args.skip_export and done.is_file():
                runs[key] = export_cost.collect(folder / "outputs", reused=reuse is not None)
            else:
                log(f"export {key}")
                runs[key] = export_cost.run_export(
                    folder,
                    overrides,
                    work / f"{model}-{reuse}" if reuse else None,
                    log=log,
                    until=until,
                    after_stage=export_cost.prune,
                )
            runs[key]["config"] = {s: params[key][s] for s in ("model", "quant")}
    export: dict[str, Any] = {"kind": "export", "machine": machine(), "runs": runs, "extrapolation": {}}
    runtime: dict[str, Any] | None = None
    if not args.skip_runtime:
        rows, extra = [], {}
        for model in args.runtime_models.split(","):
            log(f"run time {model}")
            variants = [k.split("/")[1] for k in runs if k.startswith(model + "/") and not k.endswith("deeper")]
            pairs = [(v, work / f"{model}-{v}" / "outputs") for v in variants]
            result = rt.measure_all(
                [(label, o / "llava.pte") for label, o in pairs],
                tokenizer=pairs[0][1] / "tokenizer.bin",
                checkpoint=pairs[0][1] / "download",
                image=args.image,
                prompt=args.prompt,
                decode_tokens=args.decode_tokens,
                repeats=args.repeats,
                processes={v: args.processes for v in variants if size_class(v)},
            )
            for r in result["rows"]:
                r["model"] = model
            rows += result["rows"]
            extra = {k: v for k, v in result.items() if k != "rows"}
        runtime = {**extra, "kind": "runtime", "machine": export["machine"], "rows": rows}
    for model in args.models.split(","):
        if f"{model}/8da4w-deeper" not in runs:
            continue
        base, deep = f"{model}/8da4w", f"{model}/8da4w-deeper"
        rss = None
        if runtime is not None:
            rss = next(
                (
                    r["rss_above_base_mb"]
                    for r in runtime["rows"]
                    if r["model"] == model and r["engine"] == "executorch" and r["variant"] == "8da4w"
                ),
                None,
            )
        from llava_pipeline.export.model_io import load_args  # torch and transformers: only for the extrapolation

        text = load_args(work / f"{model}-8da4w" / "outputs" / "source_transform").text
        export["extrapolation"][model] = extrapolate(
            runs[base],
            runs[deep],
            _depth(params[base]),
            _depth(params[deep]),
            params[base]["export"]["max_seq_len"],
            text.num_kv_heads * text.head_dim,
            rss,
        )
    if not args.skip_runtime:  # where each quantized decoder's time goes (ETDump), in its own process
        for key in [k for k in runs if k.split("/")[0] in args.runtime_models.split(",")]:
            model, variant = key.split("/")
            if not size_class(variant) or variant.endswith("deeper"):
                continue
            log(f"profile {key}")
            prof = isolated(
                "bench.profile:profile", {"pte": str(work / f"{model}-{variant}" / "outputs" / "llava.pte")}
            )
            export.setdefault("profile", {})[key] = {k: prof[k] for k in ("prefill", "decode")}
    (out / "export.json").write_text(json.dumps(export, indent=2, sort_keys=True) + "\n")
    if runtime is not None:
        (out / "runtime.json").write_text(json.dumps(runtime, indent=2, sort_keys=True) + "\n")
    report.write(out)
    log(f"done: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
