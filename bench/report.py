"""Turn the benchmark's JSON files in outputs/bench/ into results.md and plot.png.

Inputs (whichever exist): export.json (`make bench`), runtime.json (`make bench`),
peers.json (`make bench-peers`), 7b.json (`make bench-7b`). The targets the project
holds itself to are checked here, against the 8da4w row of the 7B-shape preset, and every
quantized export of it is set beside llama.cpp's nearest quantization (`schemes`), naming the
fastest of each size class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .markdown import fmt, table
from .schemes import fastest, schemes, schemes_section

MB = 1 << 20
# (name, our metric, peer metric, how: "ge" ratio >= x | "le" ratio <= x, x)
TARGETS = (
    ("decode vs llama.cpp Q4_0", "text_decode_tok_s", "decode_tok_s", "ge", 1.25),
    ("prefill vs llama.cpp Q4_0 (600 tokens)", "text_prefill600_s", "prefill_s", "speedup", 2.0),
    # llama.cpp loads the text model only: ours is the token embedding + text decoder alone
    ("run-time RSS of the text model vs llama.cpp Q4_0", "text_rss_above_base_mb", "rss_above_base_mb", "le", 1.0),
)
BANDWIDTH_TARGET = 0.80


def load(folder: Path) -> dict:
    out = {}
    for name in ("export", "runtime", "peers", "7b"):
        p = folder / f"{name}.json"
        if p.is_file():
            out[name] = json.loads(p.read_text())
    return out


def export_section(export: dict) -> list[str]:
    lines = ["## Export cost (per stage: wall s / peak RSS MiB)", ""]
    stages = ("download", "source_transform", "quantize", "partition", "to_executorch", "emit")
    rows = []
    for key, run in export["runs"].items():
        cells = []
        for s in stages:
            m = run["stages"].get(s)
            cells.append(f"{m['process_wall_s']:.1f} / {m['peak_rss_mb']:.0f}" if m else "shared")
        methods = run["method_bytes"]
        rows.append(
            [
                key,
                *cells,
                run["pte_bytes"] / MB,
                *(methods.get(m, 0) / MB for m in ("vision_encoder", "token_embedding", "text_decoder")),
            ]
        )
    lines += table(["export", *stages, ".pte MiB", "vision MiB", "embedding MiB", "decoder MiB"], rows)
    for model, x in export.get("extrapolation", {}).items():
        lines += [
            f"### {model}: per layer, and scaled to LLaVA-1.5-7B ({x['full_text_layers']} text + "
            f"{x['full_vision_layers']} vision layers)",
            "",
        ]
        lines += table(
            ["quantity", "per text layer", "per vision layer", "measured", "full 7B (extrapolated)"],
            [
                [
                    ".pte MiB",
                    x["text_layer_bytes"] / MB,
                    x["vision_layer_bytes"] / MB,
                    x["pte_bytes"] / MB,
                    x["full_pte_bytes"] / MB,
                ],
                [
                    f"export wall s ({', '.join(x.get('export_stages_scaled', []))})",
                    x["text_layer_export_s"],
                    x["vision_layer_export_s"],
                    x["export_s"],
                    x["full_export_s"],
                ],
            ],
        )
        if "full_runtime_rss_mb" in x:
            lines += [
                f"Run-time footprint at seq_len {x['seq_len']}, scaled: {x['full_runtime_rss_mb'] / 1024:.2f} GiB "
                f"(measured {x['runtime_rss_mb']:.0f} MiB above baseline + per-layer weights + "
                f"{x['kv_bytes_per_layer'] / MB:.0f} MiB KV cache per text layer); the seed reports ~5 GiB.",
                "",
            ]
    return lines


def profile_section(profiles: dict) -> list[str]:
    lines = []
    for key, phases in profiles.items():
        lines += [f"## Where {key}'s text decoder spends its time (ETDump, 600-token prefill, decode at 600+)", ""]
        rows = []
        for phase, data in phases.items():
            for e in data["events"][:6]:
                rows.append(
                    [
                        phase,
                        f"{data['ms_per_call']:.2f}",
                        e["name"],
                        e["count_per_call"],
                        e["ms_per_call"],
                        f"{100 * e['share']:.1f}%",
                    ]
                )
        lines += table(["phase", "ms per call", "operator", "calls", "ms", "share"], rows)
    return lines


def runtime_section(rt: dict, title: str) -> list[str]:
    runs, reached = rt.get("bandwidth_runs_gb_s"), rt.get("bandwidth_reached_by", "probe")
    spread = ""
    if runs:
        by = "" if reached == "probe" else f"; reached by {reached}"
        spread = f" (probe before each case and after the last: {', '.join(fmt(b, 1) for b in runs)}{by})"
    repeated = sorted({r["variant"] for r in rt["rows"] if (r.get("processes") or 1) > 1})
    lines = [
        f"## {title}",
        "",
        f"{rt.get('threads')} threads; memory read bandwidth, the highest reached in the same run: "
        f"{fmt(rt.get('bandwidth_gb_s'), 1)} GB/s{spread}."
        + (
            f" Rows {', '.join(repeated)}: medians over {max(r.get('processes') or 1 for r in rt['rows'])} processes."
            if repeated
            else ""
        ),
        "",
    ]
    rows = []
    for r in rt["rows"]:
        rows.append(
            [
                r.get("model", ""),
                r["engine"],
                r["variant"],
                r.get("image_encode_s"),
                r.get("prefill_s"),
                r.get("prompt_tokens"),
                r.get("decode_tok_s"),
                r.get("fraction_of_limit"),
                r.get("text_prefill600_s"),
                r.get("text_decode_tok_s"),
                r.get("text_achieved_gb_s"),
                r.get("text_fraction_of_limit"),
                r.get("rss_above_base_mb"),
                r.get("text_rss_above_base_mb"),
            ]
        )
    lines += table(
        [
            "model",
            "engine",
            "variant",
            "image encode s",
            "prefill s (image+prompt)",
            "prompt tokens",
            "decode tok/s",
            "fraction of limit",
            "text prefill 600 s",
            "text decode tok/s",
            "text decode GB/s read",
            "text fraction of limit",
            "RSS above base MiB",
            "text methods alone: RSS MiB",
        ],
        rows,
    )
    return lines


def peers_section(peers: dict) -> list[str]:
    lines = [
        "## llama.cpp on the same text weights",
        "",
        f"{peers['threads']} threads, {peers['prompt_tokens']}-token prefill, {peers['decode_tokens']} decode tokens.",
        "",
    ]
    rows = [
        [
            r["engine"],
            r["variant"],
            r.get("file_mb"),
            r.get("prefill_s"),
            r.get("prefill_tok_s"),
            r.get("decode_tok_s"),
            r.get("rss_above_base_mb"),
        ]
        for r in peers["rows"]
    ]
    return lines + table(
        ["engine", "variant", "file MiB", "prefill s", "prefill tok/s", "decode tok/s", "RSS above base MiB"], rows
    )


def targets(data: dict) -> list[dict]:
    """The project's targets on the 7B-shape preset: ours (8da4w) against llama.cpp Q4_0."""
    rt, peers = data.get("runtime"), data.get("peers")
    q4 = next((r for r in (peers or {}).get("rows", []) if r["variant"] == "Q4_0"), None)
    out = []
    for ours in (rt or {}).get("rows", []):
        if not (
            ours["engine"] == "executorch"
            and ours["variant"].startswith("8da4w")
            and ours.get("model") == "llava-7b-shape"
        ):
            continue
        variant = ours["variant"]
        frac = ours.get("text_fraction_of_limit")
        if frac is not None:
            out.append(
                {
                    "variant": variant,
                    "target": "decode at 600 context vs bandwidth limit (weights + KV)",
                    "value": frac,
                    "goal": f">= {BANDWIDTH_TARGET}",
                    "met": frac >= BANDWIDTH_TARGET,
                }
            )
        if q4 is None:
            continue
        for name, mine, theirs, how, x in TARGETS:
            a, b = ours.get(mine), q4.get(theirs)
            if a is None or b is None:
                continue
            if how == "speedup":  # times: theirs / ours
                value, goal, met = b / a, f">= {x}", b / a >= x
            elif how == "ge":
                value, goal, met = a / b, f">= {x}", a / b >= x
            else:
                value, goal, met = a / b, f"<= {x}", a / b <= x
            out.append({"variant": variant, "target": name, "value": round(value, 3), "goal": goal, "met": bool(met)})
    return out


def write_plot(data: dict, path: Path) -> None:
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the benchmark plot needs matplotlib: pip install -e '.[bench]' (make bench installs it)"
        ) from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for r in data.get("runtime", {}).get("rows", []):
        if r.get("text_decode_tok_s"):
            bars.append(
                (
                    f"{r.get('model', '')}\n{r['engine']} {r['variant']}",
                    r["text_decode_tok_s"],
                    r.get("text_prefill600_s"),
                    r.get("rss_above_base_mb"),
                )
            )
    for r in data.get("peers", {}).get("rows", []):
        bars.append(
            (
                f"{data['peers'].get('model', 'llava-7b-shape')}\nllama.cpp {r['variant']}",
                r["decode_tok_s"],
                r.get("prefill_s"),
                r.get("rss_above_base_mb"),
            )
        )
    for r in data.get("7b", {}).get("runtime", {}).get("rows", []):
        bars.append(
            (
                f"llava-1.5-7b\n{r['engine']} {r['variant']}",
                r.get("decode_tok_s"),
                r.get("text_prefill600_s") or r.get("prefill_s"),
                r.get("rss_above_base_mb"),
            )
        )
    fig, axes = plt.subplots(1, 3, figsize=(16, max(3, 0.45 * len(bars) + 1.5)))
    labels = [b[0] for b in bars]
    for ax, i, title in zip(
        axes,
        (1, 2, 3),
        (
            "text decode, tok/s (higher is better)",
            "600-token text prefill, s (lower is better)",
            "peak RSS above baseline, MiB (lower is better)",
        ),
    ):
        vals = [b[i] or 0 for b in bars]
        ax.barh(range(len(bars)), vals, color="#4C72B0")
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels(labels if i == 1 else [""] * len(bars), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
    fig.tight_layout()
    # Fixed metadata: the same numbers give the same bytes.
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write(folder: Path) -> dict:
    data = load(folder)
    lines = ["# Benchmark results", ""]
    if "runtime" in data or "export" in data:
        m = (data.get("export") or data.get("runtime") or {}).get("machine")
        if m:
            isa = ", ".join(m.get("isa") or []) or "not recorded"
            lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM; ISA: {isa}.", ""]
    if "export" in data:
        lines += export_section(data["export"])
        lines += profile_section(data["export"].get("profile", {}))
    if "runtime" in data:
        lines += runtime_section(data["runtime"], "Run time: same weights, image and prompt")
    if "peers" in data:
        lines += peers_section(data["peers"])
    scheme_rows = schemes(data)
    if scheme_rows:
        lines += schemes_section(scheme_rows)
    checks = targets(data)
    if checks:
        lines += ["## Targets (7B-shape preset, 8da4w vs llama.cpp Q4_0)", ""]
        lines += table(
            ["export", "target", "value", "goal", "met"],
            [[c["variant"], c["target"], c["value"], c["goal"], c["met"]] for c in checks],
        )
    if "7b" in data:
        big = data["7b"]
        lines += ["## Full-size LLaVA-1.5-7B (random bf16 weights, `make bench-7b`)", ""]
        rows = [[s, m["process_wall_s"], m["peak_rss_mb"]] for s, m in big["stages"].items()]
        lines += table(["stage", "wall s", "peak RSS MiB"], rows)
        lines += [
            f".pte: {big['pte_bytes'] / MB:.0f} MiB; "
            + ", ".join(f"{k} {v / MB:.0f} MiB" for k, v in big["method_bytes"].items()),
            "",
        ]
        if "runtime" in big:
            lines += runtime_section(big["runtime"], "Full 7B at run time")
    (folder / "results.md").write_text("\n".join(lines))
    summary = {"targets": checks, "schemes": scheme_rows, "fastest": fastest(scheme_rows)}
    (folder / "targets.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if any(k in data for k in ("runtime", "peers", "7b")):
        write_plot(data, folder / "plot.png")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument(
        "folder",
        nargs="?",
        type=Path,
        default=Path("outputs/bench"),
        help="the folder holding the JSON files; results.md, targets.json and plot.png go there",
    )
    write(ap.parse_args(argv).folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
