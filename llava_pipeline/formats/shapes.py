"""The built-in model's visual task: scenes of 1-3 coloured shapes, four questions with exact answers.

A scene is a 336x336 RGB picture on a uniform light background (each channel 215-255) with 1 to 3
filled, non-overlapping shapes drawn with Pillow's ImageDraw:

- kinds: circle, square (axis-aligned), triangle (base along the bottom of its box, apex at the
  top centre); colours red, green, blue, yellow, each channel jittered by up to +-20;
- each shape's box is a square of side 56-100 px, at least 8 px from the edges and from every
  other box; the boxes' horizontal centres are at least 24 px apart.

Questions and answers (exact text, answers lower case with no final period):

- "How many shapes are there?" -> "one" | "two" | "three"
- "What color is the {shape}?" (only when exactly one shape of that kind is present) -> the colour
- "What shape is on the left?" -> the kind of the shape with the smallest centre x
- "Describe the picture." -> the shapes from left to right: "a red circle",
  "a red circle and a blue square", "a red circle, a blue square and a green triangle"

`render(scene, scale)` draws the same scene on a (336*scale)-pixel square: LLaVA's processor
scales it back down, and the answers stay the same. Everything is seeded: `sample_scene(rng)`
takes a `random.Random`, `eval_items(n, seed)` is a fixed list for a given (n, seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

from PIL import Image, ImageDraw

SIZE = 336
KINDS = ("circle", "square", "triangle")
COLORS = {"red": (230, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40)}
JITTER = 20
MIN_SIDE, MAX_SIDE = 56, 100
MARGIN = 8  # from the edges and between boxes
MIN_DX = 24  # between horizontal centres
NUMBERS = ("one", "two", "three")
QUESTION_TYPES = ("count", "color", "left", "describe")
COUNT_Q = "How many shapes are there?"
LEFT_Q = "What shape is on the left?"
DESCRIBE_Q = "Describe the picture."


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    rgb: tuple[int, int, int]
    x0: int  # box left, top and side in 336-px coordinates
    y0: int
    side: int

    @property
    def cx(self) -> float:
        return self.x0 + self.side / 2


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]  # in drawing order

    def left_to_right(self) -> list[Shape]:
        return sorted(self.shapes, key=lambda s: s.cx)


@dataclass(frozen=True)
class Item:
    """One question about one scene, with its right answer."""

    scene: Scene
    qtype: str
    question: str
    answer: str


def _clip(v: int) -> int:
    return max(0, min(255, v))


def _rgb(values: Iterable[int]) -> tuple[int, int, int]:
    r, g, b = values
    return r, g, b


def _fits(box: tuple[int, int, int], placed: list[Shape]) -> bool:
    x0, y0, side = box
    for s in placed:
        apart = (
            x0 >= s.x0 + s.side + MARGIN
            or s.x0 >= x0 + side + MARGIN
            or y0 >= s.y0 + s.side + MARGIN
            or s.y0 >= y0 + side + MARGIN
        )
        if not apart or abs((x0 + side / 2) - s.cx) < MIN_DX:
            return False
    return True


def sample_scene(rng: random.Random, n_shapes: int | None = None, sides: tuple[int, int] | None = None) -> Scene:
    """A random scene of the grammar above (`n_shapes` 1-3, random if None; box sides drawn from
    `sides`, a sub-range of MIN_SIDE..MAX_SIDE, or from all of it if None)."""
    lo, hi = sides or (MIN_SIDE, MAX_SIDE)
    if not MIN_SIDE <= lo <= hi <= MAX_SIDE:
        raise ValueError(f"sides {sides} is not within {MIN_SIDE}..{MAX_SIDE}")
    while True:
        n = n_shapes or rng.randint(1, 3)
        background = _rgb(rng.randint(215, 255) for _ in range(3))
        placed: list[Shape] = []
        for _ in range(200):  # rejection sampling of boxes; restart the scene if it gets stuck
            side = rng.randint(lo, hi)
            box = (rng.randint(MARGIN, SIZE - MARGIN - side), rng.randint(MARGIN, SIZE - MARGIN - side), side)
            if _fits(box, placed):
                color = rng.choice(sorted(COLORS))
                rgb = _rgb(_clip(c + rng.randint(-JITTER, JITTER)) for c in COLORS[color])
                placed.append(Shape(rng.choice(KINDS), color, rgb, *box))
                if len(placed) == n:
                    return Scene(background, tuple(placed))


def render(scene: Scene, scale: int = 1) -> Image.Image:
    """The scene as an RGB picture of side 336*scale."""
    img = Image.new("RGB", (SIZE * scale, SIZE * scale), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0 = s.x0 * scale, s.y0 * scale
        x1, y1 = x0 + s.side * scale - 1, y0 + s.side * scale - 1
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=s.rgb)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=s.rgb)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=s.rgb)
    return img


def describe(scene: Scene) -> str:
    parts = [f"a {s.color} {s.kind}" for s in scene.left_to_right()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def color_question(kind: str) -> str:
    return f"What color is the {kind}?"


def unique_kinds(scene: Scene) -> list[str]:
    """Kinds present exactly once: the ones a colour question may ask about."""
    kinds = [s.kind for s in scene.shapes]
    return [k for k in KINDS if kinds.count(k) == 1]


def questions(scene: Scene) -> list[Item]:
    """Every question the grammar allows about `scene` (one colour question per unique kind)."""
    items = [Item(scene, "count", COUNT_Q, NUMBERS[len(scene.shapes) - 1])]
    for kind in unique_kinds(scene):
        color = next(s.color for s in scene.shapes if s.kind == kind)
        items.append(Item(scene, "color", color_question(kind), color))
    items.append(Item(scene, "left", LEFT_Q, scene.left_to_right()[0].kind))
    items.append(Item(scene, "describe", DESCRIBE_Q, describe(scene)))
    return items


def one_per_type(scene: Scene, rng: random.Random) -> list[Item]:
    """One item per question type (the colour one about a random unique kind, if any)."""
    by_type: dict[str, list[Item]] = {}
    for item in questions(scene):
        by_type.setdefault(item.qtype, []).append(item)
    return [rng.choice(by_type[t]) for t in QUESTION_TYPES if t in by_type]


def eval_items(n_scenes: int, seed: int) -> list[Item]:
    """A fixed eval set: `n_scenes` seeded scenes, one item per question type each.

    Every scene with a colour question gets one; scenes with no unique kind (possible only
    with 2-3 shapes, all of repeated kinds) get three items. The shape count cycles 1, 2, 3."""
    rng = random.Random(seed)
    items: list[Item] = []
    for i in range(n_scenes):
        items.extend(one_per_type(sample_scene(rng, i % 3 + 1), rng))
    return items
