"""Image loading and LLaVA-1.5 preprocessing up to uint8, matching HF's CLIPImageProcessor.

The exported vision encoder takes a uint8 CHW image of the checkpoint's crop size
and does rescale/normalize itself; ExecuTorch's runner does not resize. So the
host side does what ``CLIPImageProcessor`` does before rescaling: convert to RGB,
resize the shortest edge with Pillow (bicubic for LLaVA-1.5), center-crop. The
same Pillow calls in the same order give the same pixels (tests/test_image.py
compares with transformers' processor, which falls back to its Pillow backend
``CLIPImageProcessorPil`` here because torchvision is not importable).
"""

from __future__ import annotations

from math import ceil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``, as transformers' ``convert_to_rgb`` makes it.

    An image with an alpha band or a transparency key is composited onto white;
    anything else goes through ``Image.convert("RGB")`` (grayscale, palette, CMYK).
    Exception: 16-bit and 32-bit integer images are scaled to 8 bits
    (round(v * 255 / 65535)), where HF's conversion would clip every value above
    255 to white. (``transformers.image_utils.load_image`` differs from both: it
    drops alpha with a plain ``convert("RGB")``; this follows the processor.)
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as an RGB ``PIL.Image`` with its EXIF orientation applied.

    Reads the whole file (no lazy handle left open). Modes are converted by
    ``to_rgb``.
    """
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    return to_rgb(image)


def _shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    # transformers.image_transforms.get_resize_output_image_size with
    # default_to_square=False: the long side is truncated, not rounded.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HWC center crop, zero-padding an image smaller than the crop as HF does."""
    height, width = pixels.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = ceil((new_h - height) / 2), ceil((new_w - width) / 2)
    canvas = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : top + crop_h, max(0, left) : left + crop_w]


def preprocess_to_uint8(
    image: Image.Image,
    size: int = 336,
    *,
    crop_size: tuple[int, int] | None = None,
    resample: int = Image.Resampling.BICUBIC,
    do_resize: bool = True,
    do_center_crop: bool = True,
) -> torch.Tensor:
    """Contiguous uint8 CHW tensor ``[3, H, W]`` of ``image``, as CLIPImageProcessor has it before rescale.

    Converts with ``to_rgb``, resizes the shortest edge to ``size`` with Pillow's
    ``resample`` filter (3 = bicubic), then center-crops to ``crop_size``
    (height, width; default ``size`` x ``size``).
    """
    rgb = to_rgb(image)
    if do_resize:
        height, width = _shortest_edge_size(rgb.height, rgb.width, size)
        rgb = rgb.resize((width, height), resample=resample)
    pixels = np.asarray(rgb, dtype=np.uint8)
    if do_center_crop:
        crop_h, crop_w = crop_size if crop_size is not None else (size, size)
        pixels = _center_crop(pixels, crop_h, crop_w)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def preprocess_with_config(image: Image.Image, preprocessor_config: dict) -> torch.Tensor:
    """``preprocess_to_uint8`` with sizes and filter from a checkpoint's preprocessor_config.json.

    Reads ``do_resize``, ``size`` (``{"shortest_edge": n}``), ``resample``,
    ``do_center_crop`` and ``crop_size`` (``{"height", "width"}`` or an int), with
    CLIPImageProcessor's defaults for missing keys. Raises ValueError for settings
    it does not implement: another size form, ``do_convert_rgb`` false, or padding.
    """
    cfg = preprocessor_config
    size = cfg.get("size", {"shortest_edge": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if set(size) != {"shortest_edge"}:
        raise ValueError(f"only size={{'shortest_edge': n}} is supported, got {size}")
    crop = cfg.get("crop_size", {"height": 224, "width": 224})
    crop_hw = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
    if cfg.get("do_convert_rgb", True) is False or cfg.get("do_pad"):
        raise ValueError("do_convert_rgb=false and do_pad are not supported")
    return preprocess_to_uint8(
        image,
        int(size["shortest_edge"]),
        crop_size=(int(crop_hw[0]), int(crop_hw[1])),
        resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        do_resize=bool(cfg.get("do_resize", True)),
        do_center_crop=bool(cfg.get("do_center_crop", True)),
    )


def save_image_pt(tensor: torch.Tensor, path: str | Path) -> None:
    """Save a uint8 CHW image tensor with ``torch.save`` (contiguous, own storage).

    Raises ValueError unless ``tensor`` is uint8 with shape ``[3, H, W]``. Save
    straight to the final name: torch.save puts the file name inside the archive.
    """
    if tensor.dtype != torch.uint8 or tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] tensor, got {tensor.dtype} {tuple(tensor.shape)}")
    torch.save(tensor.contiguous().clone(), path)


class ImageFileError(ValueError):
    """An image.pt or picture file the model cannot take (the message names the file)."""


def load_pixels(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] for a model of image size ``size`` (height, width) from image.pt (as
    ``save_image_pt`` writes it, 1xCHW taken too) or an ordinary image file, preprocessed as
    LLaVA-1.5's HF processor does (``preprocess_to_uint8``). ImageFileError naming the fault."""
    path = Path(path)
    height, width = size
    if path.suffix == ".pt":
        try:
            pixels = torch.load(path, weights_only=True)
        except Exception as e:
            raise ImageFileError(f"{path} is not a torch tensor file ({e})") from None
        if not (isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.dim() in (3, 4)):
            raise ImageFileError(f"{path} must hold a uint8 CHW tensor")
        pixels = pixels.reshape(pixels.shape[-3:])
        if tuple(pixels.shape) != (3, height, width):
            raise ImageFileError(f"{path} is {tuple(pixels.shape)}, the model takes (3, {height}, {width})")
        return pixels
    try:
        picture = load_image(path)
    except Exception as e:  # PIL: unidentified, truncated, decompression bomb, ...
        raise ImageFileError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None
    if height != width:
        raise ImageFileError(f"the model takes {height}x{width} images; pass an image.pt")
    return preprocess_to_uint8(picture, height)
