"""Benchmarks: export cost, run-time speed and memory beside transformers and llama.cpp.

`make bench` (python -m llava_pipeline.bench), `make bench-peers`, `make bench-7b`.
Results go to outputs/bench/ as JSON (DVC metrics), a markdown table and a plot.
"""
