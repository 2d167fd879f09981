"""Time one decoder linear per weight scheme, lowered to XNNPACK alone: which scheme is fastest on
this CPU, before a whole export.

    python -m scripts.bench_schemes [--in 4096 --out 11008 --prefill 600 --repeats 5]

For each scheme of quant.scheme / quant.group_size (see llava_pipeline/export/quantize.py) it quantizes
one Linear(in, out) with torchao as the quantize stage does, lowers it with the text decoder's
partitioners, and times the ExecuTorch method at M = `--prefill` tokens (prefill) and M = 1
(decode): the median of `--repeats` runs after one warm-up, on the threads torch uses. The 7B's
MLP up-projection (4096 -> 11008) is the default shape. Prints a markdown table with the CPU and
the ISA flags XNNPACK dispatches on: speeds differ between machines, compare within one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from llava_pipeline.base.config import QParams, QuantConfig, QuantScheme
from llava_pipeline.base.machine import machine
from llava_pipeline.export import export
from llava_pipeline.export.quantize import weight_config

SCHEMES = (  # label, quant.scheme, quant.group_size
    ("int4, group 32 (8da4w)", "8da4w", 32),
    ("int4, group 128 (8da4w)", "8da4w", 128),
    ("int4, per channel (8da4w, group_size=0)", "8da4w", 0),
    ("int8, per channel (8da8w)", "8da8w", 0),
    ("fp32 (none)", "none", 0),
)


def lowered_linear(scheme: str, group_size: int, k: int, n: int, max_m: int, m: int = 8):
    """One seeded Linear(k, n) quantized as the quantize stage does it (affine scales) and lowered
    with the text decoder's partitioners, M dynamic up to `max_m`: (the fp32 linear, the eager
    quantized one, the lowered program manager). tests/test_schemes.py checks these programs."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(k, n, bias=False)).eval()
    model = copy.deepcopy(fp32)
    if scheme != "none":
        quant = QuantConfig(scheme=QuantScheme(scheme), group_size=group_size, qparams=QParams.affine)
        quantize_(model, weight_config(quant))
    x = torch.randn(1, m, k)
    ep = torch.export.export(model, (x,), dynamic_shapes=({1: torch.export.Dim("m", min=1, max=max_m)},))
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=export.partitioners("text_decoder", scheme != "none"),
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    return fp32, model, edge


def loaded(buf: bytes):
    """The program's forward method, and what must stay alive while it runs (it reads from
    `buf`, and needs its program)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(buf)
    return program.load_method("forward"), (buf, program)


def median_ms(method, x: torch.Tensor, repeats: int) -> float:
    method.execute([x])  # warm-up: XNNPACK packs the weights on first use
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        method.execute([x])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="k", type=int, default=4096)
    ap.add_argument("--out", dest="n", type=int, default=11008)
    ap.add_argument("--prefill", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    m = machine()
    print(
        f"Linear({args.k} -> {args.n}), ExecuTorch + XNNPACK, {torch.get_num_threads()} threads; "
        f"{m['cpu']}, ISA: {', '.join(m['isa']) or 'not recorded'}\n"
    )
    print(f"| weights | prefill M={args.prefill} ms | decode M=1 ms | .pte MiB |")
    print("|---|---|---|---|")
    for label, scheme, group in SCHEMES:
        buf = lowered_linear(scheme, group, args.k, args.n, args.prefill)[2].to_executorch().buffer
        method, _keep = loaded(buf)
        size = len(buf)
        pre = median_ms(method, torch.randn(1, args.prefill, args.k), args.repeats)
        dec = median_ms(method, torch.randn(1, 1, args.k), args.repeats * 10)
        print(f"| {label} | {pre:.0f} | {dec:.2f} | {size / 2**20:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
