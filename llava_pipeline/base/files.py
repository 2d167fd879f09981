"""File helpers every layer uses: sha256 of a file, JSON read (errors name the file) and write."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llava_pipeline.base.errors import PipelineError

# The checkout's assets/ (vocabulary, built-in model, photographs): the package runs from its
# checkout (pip install -e), two folders up from this file.
ASSETS = Path(__file__).resolve().parents[2] / "assets"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, missing: str = "missing (run the upstream stage first: dvc repro)") -> dict:
    """A JSON file's content; PipelineError naming the file if absent or malformed."""
    if not path.is_file():
        raise PipelineError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e})") from None
