"""The image contract of ExecuTorch's own runners, and the in-graph step that meets it.

ExecuTorch's `llava_main` (examples/models/llava/main.cpp) and the demo apps hand the
MultimodalRunner the picture as they decoded it: `stbi_load(path, ..., 0)` keeps the
file's own channel count (1 gray, 2 gray + alpha, 3 RGB, 4 RGBA), the longest edge is
resized to 336 and the other to `int(edge * 336 / longest)`, nothing is cropped or
padded, and the runner's prefiller wraps the planar uint8 data as `[1, C, H, W]`.

So the exported `vision_encoder` takes uint8 `[1, C, H, W]` with C in 1..4 and H, W in
1..image_size, and `RunnerImage` turns it into the `[1, 3, S, S]` picture the tower reads:

- channels to RGB as transformers' `convert_to_rgb` does it: gray is repeated, and an alpha
  band is composited onto white (`round((v * a + 255 * (255 - a)) / 255)`, what Pillow's
  `alpha_composite` gives);
- padded to S x S, centred (top `(S - H) // 2`, left `(S - W) // 2`), with LLaVA-1.5's pad
  colour: `int(mean * 255)` per channel of the CLIP mean, as its `expand2square` pads.

An RGB S x S input comes out exactly as it went in, so the rest of the graph sees what the
fixed-size encoder saw. llava_main.py stands in for llava_main's side of the contract (its
loading and resizing) and computes the padded picture with Pillow, independently of this graph.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_CHANNELS = 4


def pad_color(mean) -> tuple[int, ...]:
    """LLaVA-1.5's pad colour: `tuple(int(x * 255) for x in image_processor.image_mean)`."""
    return tuple(int(float(m) * 255) for m in mean)


def check_image(image: torch.Tensor, size: int | None) -> None:
    """Raise ValueError (one line) unless `image` is what the encoder accepts: uint8
    `[1, C, H, W]` (or `[C, H, W]`) with C in 1..4 and H, W in 1..size (sides unchecked
    when `size` is None)."""
    shape = tuple(image.shape)
    dims = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if image.dtype != torch.uint8 or len(dims) != 3:
        raise ValueError(f"image: expected uint8 [1, C, H, W], got {image.dtype} {list(shape)}")
    c, h, w = dims
    if not 1 <= c <= MAX_CHANNELS:
        raise ValueError(f"image: {c} channels; the encoder takes 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA)")
    if size is not None and not (1 <= h <= size and 1 <= w <= size):
        raise ValueError(
            f"image: {h}x{w} pixels; the encoder takes 1..{size} on each side (resize the longest edge to {size} first)"
        )


class RunnerImage(nn.Module):
    """uint8 `[1, C, H, W]` (C 1..4, H, W <= size) -> float32 `[1, 3, size, size]`, values 0..255.

    Written for torch.export with C, H and W dynamic: no branch on a size. The channel
    choice is an index_select whose indices are computed from C, and the padding is one
    constant pad of the picture minus the pad colour, so that its output size is `size`
    whatever H and W are."""

    fill: torch.Tensor  # a buffer (register_buffer): typed here for the checker

    def __init__(self, size: int, fill: tuple[int, ...]):
        super().__init__()
        if len(fill) != 3:
            raise ValueError(f"image_mean: RunnerImage pads RGB, got {len(fill)} channels")
        self.size, self.fill_color = size, tuple(fill)
        self.register_buffer("fill", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Refill the pad-colour buffer (needed after `to_empty`)."""
        self.fill.copy_(torch.tensor(self.fill_color, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        _, c, h, w = image.shape
        # Channels 0..C-1 are the picture's; C..C+3 are opaque alpha, for pictures without one.
        padded = torch.cat([image, torch.full((1, MAX_CHANNELS, h, w), 255, dtype=torch.uint8)], dim=1)
        n = torch.arange(c)[-1:] + 1  # C as a tensor of one element
        rgb = torch.arange(3) * (n >= 3).long()  # 0, 1, 2 for colour; 0, 0, 0 for gray
        alpha = n - 1 + n % 2  # C - 1 with an alpha band (C = 2, 4), else C (an opaque filler)
        picked = padded.index_select(1, torch.cat([rgb, alpha])).float()
        color, a = picked[:, :3], picked[:, 3:]
        color = torch.round((color * a + 255.0 * (255.0 - a)) / 255.0)
        top, left = (self.size - h) // 2, (self.size - w) // 2
        edges = (left, self.size - w - left, top, self.size - h - top)
        return nn.functional.pad(color - self.fill, edges) + self.fill
