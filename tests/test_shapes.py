"""The shapes task's grammar: scenes, rendering and right answers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llava_pipeline.formats import shapes


def _scenes(n=300, seed=0):
    rng = random.Random(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


def test_scenes_follow_the_grammar():
    counts = set()
    for scene in _scenes():
        assert all(215 <= c <= 255 for c in scene.background)
        assert 1 <= len(scene.shapes) <= 3
        counts.add(len(scene.shapes))
        for s in scene.shapes:
            assert s.kind in shapes.KINDS and s.color in shapes.COLORS
            assert shapes.MIN_SIDE <= s.side <= shapes.MAX_SIDE
            assert s.x0 >= 8 and s.y0 >= 8 and s.x0 + s.side <= 336 - 8 and s.y0 + s.side <= 336 - 8
            assert all(abs(a - b) <= 20 for a, b in zip(s.rgb, shapes.COLORS[s.color]))
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1 :]:
                assert abs(a.cx - b.cx) >= 24
                apart_x = a.x0 + a.side + 8 <= b.x0 or b.x0 + b.side + 8 <= a.x0
                apart_y = a.y0 + a.side + 8 <= b.y0 or b.y0 + b.side + 8 <= a.y0
                assert apart_x or apart_y
    assert counts == {1, 2, 3}


def test_scenes_drawn_at_a_range_of_sizes():
    rng = random.Random(1)
    big = [shapes.sample_scene(rng, 2, (84, 100)) for _ in range(50)]
    assert {len(sc.shapes) for sc in big} == {2}
    assert all(84 <= s.side <= 100 for sc in big for s in sc.shapes)
    assert min(s.side for sc in big for s in sc.shapes) < 90 < max(s.side for sc in big for s in sc.shapes)
    # The full range is the default: the same random numbers give the same scenes.
    assert shapes.sample_scene(random.Random(2), 3, (shapes.MIN_SIDE, shapes.MAX_SIDE)) == shapes.sample_scene(
        random.Random(2), 3
    )
    for bad in ((40, 60), (90, 80), (60, 120)):
        with pytest.raises(ValueError, match=f"sides \\({bad[0]}, {bad[1]}\\) is not within 56..100"):
            shapes.sample_scene(random.Random(0), 1, bad)


def test_answers_of_a_known_scene():
    red = shapes.Shape("circle", "red", (230, 40, 40), 200, 20, 60)
    blue = shapes.Shape("square", "blue", (40, 80, 230), 20, 200, 80)
    green = shapes.Shape("triangle", "green", (40, 170, 60), 120, 120, 70)
    scene = shapes.Scene((240, 240, 240), (red, blue, green))
    got = {(i.qtype, i.question): i.answer for i in shapes.questions(scene)}
    assert got == {
        ("count", "How many shapes are there?"): "three",
        ("color", "What color is the circle?"): "red",
        ("color", "What color is the square?"): "blue",
        ("color", "What color is the triangle?"): "green",
        ("left", "What shape is on the left?"): "square",
        ("describe", "Describe the picture."): "a blue square, a green triangle and a red circle",
    }
    two = shapes.Scene((240, 240, 240), (red, blue))
    assert shapes.describe(two) == "a blue square and a red circle"
    assert shapes.describe(shapes.Scene((240, 240, 240), (red,))) == "a red circle"


def test_colour_questions_only_about_unique_kinds():
    a = shapes.Shape("circle", "red", (230, 40, 40), 20, 20, 60)
    b = shapes.Shape("circle", "blue", (40, 80, 230), 200, 20, 60)
    c = shapes.Shape("square", "yellow", (240, 210, 40), 100, 200, 60)
    items = shapes.questions(shapes.Scene((230, 230, 230), (a, b, c)))
    assert [i.question for i in items if i.qtype == "color"] == ["What color is the square?"]


def test_render_draws_each_shape_in_its_box():
    scene = shapes.sample_scene(random.Random(3), 3)
    pixels = np.asarray(shapes.render(scene)).astype(int)
    assert pixels.shape == (336, 336, 3)
    for s in scene.shapes:
        centre = pixels[s.y0 + s.side * 3 // 4, s.x0 + s.side // 2]  # inside every kind
        assert np.abs(centre - np.array(s.rgb)).max() == 0
        if s.kind != "square":  # a circle and a triangle leave the box's top-left corner empty
            assert np.abs(pixels[s.y0 + 1, s.x0 + 1] - np.array(scene.background)).max() == 0
    outside = pixels[:4, :4]
    assert (outside == np.array(scene.background)).all()


@pytest.mark.parametrize("scale", [2, 3])
def test_larger_renders_are_the_same_scene(scale):
    scene = shapes.sample_scene(random.Random(5), 2)
    small = np.asarray(shapes.render(scene)).astype(int)
    big = shapes.render(scene, scale)
    assert big.size == (336 * scale, 336 * scale)
    down = np.asarray(big.resize((336, 336))).astype(int)
    assert np.mean(np.abs(down - small)) < 3  # only the edges differ


def test_eval_items_are_seeded_and_cover_every_type():
    a, b = shapes.eval_items(30, 7), shapes.eval_items(30, 7)
    assert [(i.question, i.answer) for i in a] == [(i.question, i.answer) for i in b]
    assert [(i.question, i.answer) for i in shapes.eval_items(30, 8)] != [(i.question, i.answer) for i in a]
    assert {i.qtype for i in a} == set(shapes.QUESTION_TYPES)
    assert {len(i.scene.shapes) for i in a} == {1, 2, 3}
    assert all(i.answer == i.answer.lower() and not i.answer.endswith(".") for i in a)
