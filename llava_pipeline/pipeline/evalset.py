"""What an export is scored on: images, questions and (where known) right answers.

Three kinds, chosen by `evaluate.set`:

- ``shapes``: `evaluate.scenes` seeded scenes of the built-in model's task
  (llava_pipeline.formats.shapes), one question of each type per scene, with right answers;
- ``photos``: the photographs shipped in assets/images/ x a few general questions, no
  right answers (the export is scored against the transformers reference only);
- a folder: its ``questions.jsonl`` has one JSON object per line, ``{"image": "cat.jpg",
  "question": "What animal is this?"}`` with optional ``"answer"`` (the exact right answer)
  and ``"type"`` (a question type, for per-type accuracy; default ``"question"``); images
  are read relative to the folder.

`load` returns the items and the images as Pillow RGB pictures; the stages turn each image
into the uint8 pixels both the reference and the .pte get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from llava_pipeline.base.errors import PipelineError
from llava_pipeline.base.files import ASSETS
from llava_pipeline.formats import image as image_mod
from llava_pipeline.formats import shapes

PHOTO_DIR = ASSETS / "images"
PHOTOS = ("coffee.jpg", "chelsea.jpg", "astronaut.jpg")
PHOTO_QUESTIONS = ("What is shown in this picture?", "Describe the picture.", "What colors do you see?")


@dataclass(frozen=True)
class EvalItem:
    image: str  # key into the images dict
    qtype: str
    question: str
    answer: str | None  # the right answer, if known


def load(set_name: str, scenes: int = 40, seed: int = 0) -> tuple[list[EvalItem], dict[str, Image.Image]]:
    """The eval set `set_name` (see the module docstring); images keyed by name, in item order."""
    if set_name == "shapes":
        return _shapes(scenes, seed)
    if set_name == "photos":
        images = {name: image_mod.load_image(PHOTO_DIR / name) for name in PHOTOS}
        items = [EvalItem(name, "question", q, None) for name in PHOTOS for q in PHOTO_QUESTIONS]
        return items, images
    return _folder(Path(set_name))


def _shapes(scenes: int, seed: int):
    items: list[EvalItem] = []
    images: dict[str, Image.Image] = {}
    names: dict[int, str] = {}
    for item in shapes.eval_items(scenes, seed):
        key = names.get(id(item.scene))
        if key is None:
            key = names[id(item.scene)] = f"scene{len(names):03d}"
            images[key] = shapes.render(item.scene)
        items.append(EvalItem(key, item.qtype, item.question, item.answer))
    return items, images


def _folder(folder: Path):
    path = folder / "questions.jsonl"
    if not path.is_file():
        raise PipelineError(f"{path}: not found (evaluate.set names a folder without questions.jsonl)")
    items: list[EvalItem] = []
    images: dict[str, Image.Image] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, question = str(row["image"]), str(row["question"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PipelineError(f'{path}:{n}: expected {{"image": ..., "question": ...}} ({e})') from None
        if name not in images:
            try:
                images[name] = image_mod.load_image(folder / name)
            except Exception as e:
                raise PipelineError(f"{path}:{n}: cannot read image {folder / name} ({e})") from None
        answer = row.get("answer")
        items.append(
            EvalItem(name, str(row.get("type", "question")), question, None if answer is None else str(answer))
        )
    if not items:
        raise PipelineError(f"{path}: no questions")
    return items, images
