"""Verify an exported LLaVA .pte: the runner's contract, and numerics against the eager models.

    python -m llava_pipeline.verify outputs/llava.pte [--tokenizer_path T] [--outputs DIR]
                                    [--steps 40] [--no-fp32]

Prints the table of checks (see the package's docstring), then one verdict line. Exit status:
0 every row passes, 1 some row fails, 2 nothing could be verified (missing or unloadable .pte,
missing manifest or model): one line on stderr, no traceback. No module of the package imports
this one.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from llava_pipeline.base.errors import PipelineError
from llava_pipeline.verify.verifier import verify


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_pipeline.verify", description=__doc__.split("\n")[0])
    p.add_argument("pte", type=Path, help="the exported program (outputs/llava.pte)")
    p.add_argument("--tokenizer_path", type=Path, help="default: tokenizer.bin beside the .pte")
    p.add_argument("--outputs", type=Path, help="the pipeline's outputs folder (default: the .pte's folder)")
    p.add_argument("--steps", type=int, default=40, help="teacher-forced decode steps after the prefill")
    p.add_argument("--no-fp32", action="store_true", help="skip the (informational) fp32 comparison")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table; 0 if every row passes, 1 if one fails, 2 if nothing could be verified."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.disable(logging.WARNING)  # torch/torchao import chatter
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    try:
        report = verify(args.pte, args.tokenizer_path, args.outputs, args.steps, not args.no_fp32)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        logging.disable(logging.NOTSET)
    print(report.table())
    failed = report.failed
    verdict = "OK" if not failed else f"FAILED: {', '.join(f'{r.method} {r.metric}' for r in failed)}"
    print(f"\n{args.pte}: {verdict} ({time.perf_counter() - t0:.1f} s)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
