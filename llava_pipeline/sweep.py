"""The quantization sweep behind the README's table: `python -m llava_pipeline.sweep`.

Queues one DVC experiment per variant (`dvc exp run --queue -n sweep-<variant> -S ...`), runs the queue
one experiment at a time (`dvc queue start -j 1`: two at once on 2 cores would distort every
timing), then prints a markdown table. Quality comes from `dvc exp show --json` (each experiment
carries its metrics/quality.json); the decode speed from the experiment's log (`dvc queue logs`:
the evaluate stage's summary line), since timings are kept out of the experiments (dvc.yaml).
`--table-only` prints the table of the experiments already run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

VARIANTS = (
    ("default: 8da4w, group 32, hqq", ()),
    ("group 64", ("quant.group_size=64",)),
    ("group 128", ("quant.group_size=128",)),
    ("int4 per channel", ("quant.group_size=0",)),
    ("8da8w (int8 per channel)", ("quant.scheme=8da8w", "quant.group_size=0")),
    ("affine qparams", ("quant.qparams=affine",)),
    ("vision 8da8w", ("quant.vision=8da8w",)),
    ("int8 KV cache", ("export.kv_cache=int8",)),
    ("fp32 (quant.scheme=none)", ("quant.scheme=none", "quant.embedding_bits=none")),
)
TYPES = ("count", "color", "left", "describe")


def _dvc(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def exp_name(label: str) -> str:
    return "sweep-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]


def queue_and_run(poll_s: float = 10.0) -> None:
    names = [exp_name(label) for label, _ in VARIANTS]
    _dvc("exp", "remove", *names, check=False)  # a previous sweep's experiments
    for name, (_, sets) in zip(names, VARIANTS):
        _dvc("exp", "run", "--queue", "-n", name, *[a for s in sets for a in ("-S", s)])
    _dvc("queue", "start", "-j", "1")
    while True:
        status = _dvc("queue", "status")
        states = [line.split()[-1] for line in status.splitlines() if any(n in line for n in names)]
        if states and all(s in ("Success", "Failed") for s in states):
            return
        time.sleep(poll_s)


def _experiments(shown: list) -> dict[str, dict]:
    out = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name"):
                    out[rev["name"]] = rev["data"]
    return out


def table() -> str:
    exps = _experiments(json.loads(_dvc("exp", "show", "--json", "--no-pager")))
    head = ["variant", *TYPES, "agreement", "top-1", "KL", ".pte MiB", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _ in VARIANTS:
        data = exps.get(exp_name(label))
        quality = (data or {}).get("metrics", {}).get("metrics/quality.json", {}).get("data")
        if not quality:
            lines.append(f"| {label} | " + " | ".join(["failed"] * (len(head) - 1)) + " |")
            continue
        acc = quality.get("accuracy", {})
        logs = _dvc("queue", "logs", exp_name(label), check=False)
        decode = re.findall(r"decode (\d+) tok/s", logs)
        cells = [f"{acc.get(t, 0):.3f}" for t in TYPES] + [
            f"{quality['agreement']:.3f}",
            f"{quality['top1']:.3f}",
            f"{quality['kl']:.5f}",
            f"{sum(quality['size_mb'].values()):.2f}",
            decode[-1] if decode else "-",
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.table_only:
        queue_and_run()
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
