"""Where the text decoder's time goes: ExecuTorch's ETDump over a 600-position prefill and
single-token decode steps of a .pte's `text_decoder`, aggregated per operator / delegate.

`python -m bench.profile outputs/llava.pte [--steps 16] [--out profile.json]`
prints a table per phase (prefill, decode): total ms, calls, share of the phase, for
XNNPACK delegate calls and each operator that runs outside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from llava_pipeline.runtime.runner import load_runtime_kernels


def profile(pte: Path, prefill: int = 600, steps: int = 16, threads: int = 2) -> dict:
    import torch

    load_runtime_kernels()
    from executorch.extension.pybindings import portable_lib as pl

    try:
        pl._unsafe_reset_threadpool(threads)
    except Exception:  # older bindings: keep the default pool
        pass
    module = pl._load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    meta = module.method_meta("text_decoder")
    width = meta.input_tensor_meta(0).sizes()[-1]
    g = torch.Generator().manual_seed(0)
    module.run_method("text_decoder", (torch.randn(1, prefill, width, generator=g), torch.tensor([0])))
    for i in range(steps):
        module.run_method("text_decoder", (torch.randn(1, 1, width, generator=g), torch.tensor([prefill + i])))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(path))
        from executorch.devtools import Inspector

        inspector = Inspector(etdump_path=str(path))
        blocks = [b for b in inspector.event_blocks if any(e.name for e in b.events)]
    # One "Execute" block; each event's raw timings are per call, in call order: the first
    # is the prefill, the rest are decode steps. DELEGATE_CALL / OPERATOR_CALL wrap each
    # XNNPACK delegate call / portable operator; the named events inside say which.
    events = [e for b in blocks if b.name == "Execute" for e in b.events if e.perf_data]
    phases = {}
    for phase, pick in (("prefill", lambda raw: raw[:1]), ("decode", lambda raw: raw[1:])):
        agg: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for e in events:
            raw = pick(list(e.perf_data.raw))
            if not raw:
                continue
            name = e.name
            if e.is_delegated_op:
                name = f"xnnpack: {name.split(' #')[0]}"
            agg[name][0] += sum(raw) / len(raw)
            agg[name][1] += 1
        wrappers = ("DELEGATE_CALL", "OPERATOR_CALL", "Method::execute")
        total = sum(agg[w][0] for w in wrappers[:2] if w in agg)
        phases[phase] = {
            "calls": 1 if phase == "prefill" else steps,
            "ms_per_call": round(total, 3),
            "xnnpack_delegate_calls": agg.get("DELEGATE_CALL", [0, 0])[1],
            "xnnpack_share": round(agg.get("DELEGATE_CALL", [0.0])[0] / total, 4) if total else 0.0,
            "events": sorted(
                (
                    {
                        "name": k,
                        "ms_per_call": round(v[0], 4),
                        "count_per_call": v[1],
                        "share": round(v[0] / total, 4) if total else 0.0,
                    }
                    for k, v in agg.items()
                    if k not in wrappers
                ),
                key=lambda r: -r["ms_per_call"],
            ),
        }
    return phases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte", type=Path)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=600)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = profile(args.pte, args.prefill, args.steps)
    for phase, data in result.items():
        print(
            f"{phase}: {data['ms_per_call']} ms per call, {data['xnnpack_delegate_calls']} XNNPACK delegate "
            f"calls ({100 * data['xnnpack_share']:.1f}% of the time), the rest portable/custom operators:"
        )
        for e in data["events"][:12]:
            print(f"  {e['ms_per_call']:9.3f} ms  x{e['count_per_call']:<3} {100 * e['share']:5.1f}%  {e['name']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
