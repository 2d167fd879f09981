# Two commands: `make run` (set up, export the default tiny model, run it) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# Library deprecation chatter (torch, executorch, torchao) drowns the stage logs.
export PYTHONWARNINGS := ignore

QUESTION ?= Describe the picture.

.PHONY: run venv export demo lint test test-fast clean bench bench-peers bench-7b

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and alone: 2.13.0 is the CPU build; anything else pulls CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

$(BIN)/.installed-bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

export: venv
	@dvc repro --quiet

demo: venv
	@echo "Q: $(QUESTION)"
	@$(BIN)/python -m llava_pipeline.run --model_path=outputs/llava.pte \
	  --tokenizer_path=outputs/tokenizer.bin --image_path=outputs/image.pt \
	  --prompt="$(QUESTION)" --seq_len=768 --temperature=0 --max_new_tokens=64
	@$(BIN)/python -m llava_pipeline.evaluate

run: export demo

# ruff and mypy (pinned in pyproject.toml's test extra; settings in [tool.ruff] and [tool.mypy]),
# before any test runs: lint rules, formatting, types.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Two workers, one test file at a time each: most of the time goes to single-threaded
# lowering, and the shared exports (tests/conftest.py) are built once for both. One torch
# thread per worker: beside another two-thread job the reference stage took 481 s, not 68 s
# (its outputs are the same bytes with one thread or two).
TEST_FLAGS := -q -ra -n 2 --dist loadfile --no-loadscope-reorder --durations=12
test: venv lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(TEST_FLAGS)

test-fast: venv lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(TEST_FLAGS) -m "not slow"

# Benchmarks (not part of `make test`): results in outputs/bench/ (results.md, plot.png,
# JSON metrics for `dvc metrics show outputs/bench` / `dvc plots show`).
bench: $(BIN)/.installed-bench
	$(BIN)/python -m bench

# llama.cpp on the 7B-shape preset's text weights (llama-cpp-python builds from source once).
PEER_CKPT := outputs/bench/work/llava-7b-shape-fp32/outputs/download
# The library only: llama.cpp's tools, server, tests and llava/mtmd are not needed here.
PEERS_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
$(BIN)/.installed-peers: $(BIN)/.installed-bench
	CMAKE_ARGS="$(PEERS_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install --quiet -e '.[test,bench,peers]'
	touch $@

bench-peers: $(BIN)/.installed-peers
	test -f $(PEER_CKPT)/manifest.json || $(BIN)/python -m bench --models llava-7b-shape --download-only
	$(BIN)/python -m bench.peers --checkpoint $(PEER_CKPT) --out outputs/bench/peers.json
	$(BIN)/python -m bench.report outputs/bench

bench-7b: $(BIN)/.installed-bench
	$(BIN)/python -m bench.big

clean:
	rm -rf outputs
