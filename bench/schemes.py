"""The weight schemes side by side: every quantized ExecuTorch export of the 7B-shape preset in
one bench run, beside llama.cpp's nearest quantization on the same text weights (~4-bit: Q4_0,
~8-bit: Q8_0), and the fastest of each size class on the CPU the run was on."""

from __future__ import annotations

from .markdown import table

# The ~4-bit and ~8-bit export schemes, each against llama.cpp's nearest quantization.
PEER_OF = {"4-bit": "Q4_0", "8-bit": "Q8_0"}
ANSWER_TOKENS = 128  # the workload "fastest" is judged on: a 600-token prefill, then this many tokens
SCHEME_GOALS = (1.25, 1.0)  # decode at least 1.25x the peer's tok/s, prefill at least as fast


def size_class(variant: str) -> str | None:
    if variant.startswith("8da8w"):
        return "8-bit"
    if variant.startswith("8da4w"):
        return "4-bit"
    return None


def schemes(data: dict) -> list[dict]:
    """One row per quantized ExecuTorch export of the 7B-shape preset timed in this run: its
    text decoder's 600-token prefill and decode at context 600, beside llama.cpp's nearest
    quantization (Q4_0 for the ~4-bit class, Q8_0 for the ~8-bit one) on the same weights."""
    rt, peers = data.get("runtime") or {}, data.get("peers") or {}
    peer = {r["variant"]: r for r in peers.get("rows", [])}
    out = []
    for r in rt.get("rows", []):
        cls = size_class(r["variant"])
        if r["engine"] != "executorch" or r.get("model") != "llava-7b-shape" or cls is None:
            continue
        prefill, decode = r.get("text_prefill600_s"), r.get("text_decode_tok_s")
        if prefill is None or decode is None:
            continue
        row = {
            "class": cls,
            "variant": r["variant"],
            "prefill_s": prefill,
            "decode_tok_s": decode,
            "answer_s": round(prefill + ANSWER_TOKENS / decode, 3),
            "text_rss_mb": r.get("text_rss_above_base_mb"),
            "fraction_of_limit": r.get("text_fraction_of_limit"),
        }
        p = peer.get(PEER_OF[cls])
        if p is not None and p.get("prefill_s") and p.get("decode_tok_s"):
            row["peer"] = PEER_OF[cls]
            row["prefill_vs_peer"] = round(p["prefill_s"] / prefill, 3)
            row["decode_vs_peer"] = round(decode / p["decode_tok_s"], 3)
            row["meets"] = row["decode_vs_peer"] >= SCHEME_GOALS[0] and row["prefill_vs_peer"] >= SCHEME_GOALS[1]
        out.append(row)
    return out


def fastest(rows: list[dict]) -> dict[str, str]:
    """Per size class, the export that answers the workload (ANSWER_TOKENS after a 600-token
    prefill) soonest."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["class"] not in best or r["answer_s"] < best[r["class"]]["answer_s"]:
            best[r["class"]] = r
    return {cls: r["variant"] for cls, r in sorted(best.items())}


def schemes_section(rows: list[dict]) -> list[str]:
    lines = [
        "## Export schemes on this CPU (7B-shape preset)",
        "",
        f"Each quantized export's text decoder (this `make bench` run) beside llama.cpp's nearest "
        f"quantization (~4-bit: {PEER_OF['4-bit']}, ~8-bit: {PEER_OF['8-bit']}; the latest `make bench-peers` "
        f"on this machine). Goal: decode at least {SCHEME_GOALS[0]}x the "
        f'peer\'s tok/s and prefill at least {SCHEME_GOALS[1]}x as fast. "answer s": a 600-token prefill '
        f'plus {ANSWER_TOKENS} decoded tokens, what "fastest" is judged on.',
        "",
    ]
    lines += table(
        [
            "class",
            "export",
            "text prefill 600 s",
            "decode tok/s",
            "answer s",
            "fraction of limit",
            "text RSS MiB",
            "peer",
            "prefill vs peer",
            "decode vs peer",
            "goal met",
        ],
        [
            [
                r["class"],
                r["variant"],
                r["prefill_s"],
                r["decode_tok_s"],
                r["answer_s"],
                r.get("fraction_of_limit"),
                r.get("text_rss_mb"),
                r.get("peer"),
                r.get("prefill_vs_peer"),
                r.get("decode_vs_peer"),
                r.get("meets"),
            ]
            for r in rows
        ],
    )
    best = fastest(rows)
    lines += [
        "Fastest here: " + "; ".join(f"{cls} class: {variant}" for cls, variant in best.items()) + ".",
        "",
    ]
    return lines
