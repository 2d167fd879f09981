"""Arithmetic of the run-time benchmark: medians, rates, decode context, bandwidth limits.

A decode step must stream every weight of the text decoder once (the token embedding is
gathered one row per token, so it is left out) and read the KV cache of all earlier
positions, so ``bandwidth_limit_tok_s = bandwidth / (weight_bytes_per_token +
kv_bytes_per_token)`` and ``fraction_of_limit = decode_tok_s / bandwidth_limit_tok_s``
(``text_*`` the same for the 600-position text decode). ``kv_bytes_per_token`` is at the
mean context of the measured decode steps (a step at position p reads p + 1 positions).
Where weights + KV fit in the last-level cache (``weights_fit_in_cache``, e.g. the tiny
model) DRAM does not limit decode and the fraction can exceed 1.

The bandwidth the limits use (``machine_bandwidth``) is the highest read rate reached in
the run: the best probe, or a decode that streams its weights from DRAM faster than that,
so that no row's fraction exceeds 1 on DRAM-bound weights.
"""

from __future__ import annotations

import statistics
from typing import Sequence


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
    for prefix, ctx_key, rate_key in (
        ("", "decode_mean_context", "decode_tok_s"),
        ("text_", "text_decode_mean_context", "text_decode_tok_s"),
    ):
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


def merge_processes(runs: list[dict]) -> dict:
    """One result from the same case run in several processes: each number is the median
    over them (None if a run had none), anything else is the first run's; ``processes``
    says how many."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(runs) > 1:
            numbers = [v for v in values if v is not None]
            if len(numbers) < len(values):
                out[key] = None
            elif all(isinstance(v, int) for v in numbers):  # counts stay counts
                out[key] = statistics.median_low(numbers)
            else:
                out[key] = round(median(numbers), 5)
    out["processes"] = len(runs)
    return out
