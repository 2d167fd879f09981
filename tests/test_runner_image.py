"""The vision encoder's input contract (llava_pipeline/formats/runner_image.py), without a model export:
the in-graph channel mapping and padding against Pillow, eagerly, after torch.export, and in
the ExecuTorch runtime; and llava_main's loading stand-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN

from llava_pipeline.formats import runner_image as ri
from llava_pipeline.runtime import llava_main

SIZE = 336
FILL = ri.pad_color(OPENAI_CLIP_MEAN)
# C, H, W: every channel count stb gives, odd sizes, a single row and column, full size.
SHAPES = [
    (3, 336, 336),
    (4, 336, 336),
    (1, 336, 336),
    (2, 336, 336),
    (3, 251, 336),
    (3, 336, 251),
    (1, 1, 336),
    (4, 336, 1),
    (2, 17, 5),
    (3, 1, 1),
    (4, 189, 336),
]


def _picture(c, h, w, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g)
    if c in (2, 4):  # alpha: mostly opaque, some fully transparent, the rest in between
        a = x[-1]
        a[a > 128] = 255
        a[a < 16] = 0
    return x


def test_pad_colour_is_llavas():
    # LLaVA-1.5's expand2square: tuple(int(x * 255) for x in image_processor.image_mean)
    assert FILL == (122, 116, 104)


@pytest.mark.parametrize("shape", SHAPES)
def test_canvas_equals_pillow(shape):
    x = _picture(*shape)
    got = ri.RunnerImage(SIZE, FILL)(x.unsqueeze(0))
    assert got.shape == (1, 3, SIZE, SIZE) and got.dtype == torch.float32
    want = llava_main.padded_like_encoder(x, SIZE, FILL)
    assert torch.equal(got[0], torch.from_numpy(want).float())


def test_rgb_full_size_passes_through_unchanged():
    x = _picture(3, SIZE, SIZE, seed=3)
    assert torch.equal(ri.RunnerImage(SIZE, FILL)(x.unsqueeze(0))[0], x.float())


def test_padding_is_centred_with_the_pad_colour():
    x = torch.zeros(3, 251, 336, dtype=torch.uint8)
    out = ri.RunnerImage(SIZE, FILL)(x.unsqueeze(0))[0]
    top = (SIZE - 251) // 2  # 42 rows above, 43 below
    assert out[:, top : top + 251].eq(0).all()
    for rows in (out[:, :top], out[:, top + 251 :]):
        assert torch.equal(rows, torch.tensor(FILL).float().view(3, 1, 1).expand_as(rows))
    assert out[:, top + 251 :].shape[1] == 43


def test_check_image_names_the_fault():
    ri.check_image(torch.zeros(1, 3, 1, 336, dtype=torch.uint8), SIZE)
    with pytest.raises(ValueError, match="337x336 pixels"):
        ri.check_image(torch.zeros(1, 3, 337, 336, dtype=torch.uint8), SIZE)
    with pytest.raises(ValueError, match="5 channels"):
        ri.check_image(torch.zeros(5, 10, 10, dtype=torch.uint8), SIZE)
    with pytest.raises(ValueError, match="uint8"):
        ri.check_image(torch.zeros(1, 3, 10, 10), SIZE)


def test_exported_and_lowered_canvas_is_exact(tmp_path):
    """The same module through torch.export (C, H, W dynamic) and ExecuTorch's runtime with the
    XNNPACK partitioner, as the vision encoder is exported."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from torch.export import Dim, export

    module = ri.RunnerImage(SIZE, FILL)
    dims = {1: Dim("c", min=1, max=4), 2: Dim("h", min=1, max=SIZE), 3: Dim("w", min=1, max=SIZE)}
    ep = export(module, (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8),), dynamic_shapes=(dims,), strict=False)
    pte = tmp_path / "canvas.pte"
    pte.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    method = Runtime.get().load_program(str(pte)).load_method("forward")
    for shape in SHAPES:
        x = _picture(*shape, seed=1).unsqueeze(0)
        (out,) = method.execute([x])
        assert torch.equal(out, module(x)), shape


def test_llava_main_stand_in_keeps_channels_and_resizes_the_longest_edge(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "gray.png": ("L", (500, 375)),
        "rgba.png": ("RGBA", (200, 640)),
        "rgb.jpg": ("RGB", (640, 427)),
        "la.png": ("LA", (90, 90)),
        "pal.png": ("P", (300, 200)),
    }
    for name, (mode, size) in cases.items():
        bands = len(Image.new(mode, (1, 1)).getbands())
        arr = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
        img = Image.fromarray(arr[:, :, 0] if bands == 1 else arr).convert(mode)
        img.save(tmp_path / name)
    expect = {
        "gray.png": (1, 252, 336),
        "rgba.png": (4, 336, 105),
        "rgb.jpg": (3, 224, 336),
        "la.png": (2, 336, 336),
        "pal.png": (3, 224, 336),
    }
    for name, shape in expect.items():
        chw = llava_main.llava_main_pixels(tmp_path / name)
        assert chw.shape == shape and chw.dtype == np.uint8, name
