"""ExecuTorch's `llava_main` (examples/models/llava/main.cpp) as a Python stand-in, for tests and
for checking an export the way that runner and the demo apps use it.

- `llava_main_pixels`: the planar uint8 `[C, H, W]` it hands the MultimodalRunner for an image
  file (stb decoding keeps the file's channels; the longest edge resized to 336);
- `PRESET`: the system text it sends before the image; the user's `--prompt` follows the image;
- `padded_like_encoder`: the 336x336 RGB picture the exported encoder makes of such an input
  (runner_image.RunnerImage), computed with Pillow instead of the graph's arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_pipeline.formats.image import to_rgb

PRESET = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: "
)  # main.cpp's kPresetPrompt
# Pillow's filter standing in for stb's `stbir_resize_uint8` (stb picks Mitchell to shrink and
# Catmull-Rom to enlarge; Pillow has no Mitchell, and its BICUBIC is Catmull-Rom).
STB_STAND_IN = Image.Resampling.BICUBIC
_STB_MODES = ("L", "LA", "RGB", "RGBA")  # stb's 1..4 channels


def padded_like_encoder(chw: np.ndarray | torch.Tensor, size: int, fill: tuple[int, ...]) -> np.ndarray:
    """What `RunnerImage` makes of a uint8 `[C, H, W]`, computed with Pillow: uint8 `[3, size, size]`."""
    data = np.asarray(chw, dtype=np.uint8)
    c, h, w = data.shape
    hwc = data.transpose(1, 2, 0)
    picture = Image.fromarray(hwc[:, :, 0] if c == 1 else hwc)  # mode L, LA, RGB or RGBA
    canvas = Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(to_rgb(picture), ((size - w) // 2, (size - h) // 2))
    return np.ascontiguousarray(np.asarray(canvas).transpose(2, 0, 1))


def llava_main_pixels(path: str | Path, size: int = 336) -> np.ndarray:
    """The uint8 `[C, H, W]` llava_main hands the runner for an image file: the file's own
    channels (Pillow's mode L, LA, RGB or RGBA; palette and other modes go to RGB or RGBA
    as stb decodes them), the longest edge resized to `size` with `STB_STAND_IN`, the other
    to `int(edge * size / longest)`. No EXIF rotation: stb ignores it."""
    with Image.open(path) as opened:
        opened.load()
        picture: Image.Image = opened
        if picture.mode not in _STB_MODES:
            has_alpha = "A" in picture.getbands() or picture.info.get("transparency") is not None
            picture = picture.convert("RGBA" if has_alpha else "RGB")
        w, h = picture.size
        if w > h:
            new = (size, int(h * size / w))
        else:
            new = (int(w * size / h), size)
        resized = picture.resize(new, STB_STAND_IN)
    hwc = np.asarray(resized, dtype=np.uint8)
    hwc = hwc[:, :, None] if hwc.ndim == 2 else hwc
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))
