"""Benchmarks: export cost, run-time speed and memory beside transformers and llama.cpp.

`make bench` (python -m bench), `make bench-peers` (python -m bench.peers), `make bench-7b`
(python -m bench.big), run from the project root. Results go to outputs/bench/ as JSON (DVC
metrics), a markdown table and a plot. Scripts on top of the library: nothing in
llava_pipeline/ or stages/ imports them. What they measured: docs/bench.md.
"""

from pathlib import Path

# The checkout these scripts belong to: its conf/ and assets/, and the import root of their
# child processes.
ROOT = Path(__file__).resolve().parents[1]
