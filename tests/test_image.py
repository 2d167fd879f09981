"""llava_pipeline.formats.image vs transformers' CLIPImageProcessor with LLaVA-1.5 settings.

transformers 5.24 has no torchvision here, so CLIPImageProcessor falls back to its
Pillow backend (CLIPImageProcessorPil); that is the processor compared against.
Rescale/normalize are off so pixels compare as uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import CLIPImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.image_utils import load_image as hf_load_image

from llava_pipeline.formats.image import load_image, preprocess_to_uint8, preprocess_with_config, save_image_pt, to_rgb

REPO = Path(__file__).resolve().parents[1]
# llava-hf/llava-1.5-7b-hf's preprocessor_config.json
LLAVA_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(OPENAI_CLIP_STD),
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}


def hf_uint8(image: Image.Image, **overrides) -> np.ndarray:
    config = {**LLAVA_CONFIG, **overrides, "do_rescale": False, "do_normalize": False}
    config.pop("processor_class")
    config.pop("image_processor_type")
    out = CLIPImageProcessor(**config)(images=image, return_tensors="np")["pixel_values"][0]
    assert out.dtype == np.uint8
    return out


def assert_same(ours: torch.Tensor, theirs: np.ndarray) -> None:
    assert ours.dtype == torch.uint8 and ours.is_contiguous()
    assert tuple(ours.shape) == theirs.shape
    # Same Pillow calls in the same order: expected bit-exact (1 level allowed).
    assert np.abs(ours.numpy().astype(int) - theirs.astype(int)).max() <= 1


def test_hf_falls_back_to_pillow_processor():
    assert type(CLIPImageProcessor()).__name__ == "CLIPImageProcessorPil"


def _rng_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode, 1)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _with_alpha(rgb: np.ndarray, seed: int = 1) -> Image.Image:
    alpha = np.random.default_rng(seed).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


PHOTOS = {
    "astronaut": lambda: Image.fromarray(data.astronaut()),
    "coffee": lambda: Image.fromarray(data.coffee()),
    "chelsea_upscaled": lambda: Image.fromarray(data.chelsea()),  # 300 px short side < 336
    "rocket": lambda: Image.fromarray(data.rocket()),
    "sample_asset": lambda: load_image(REPO / "assets/images/coffee.jpg"),
}

ODD = {
    "grayscale": lambda: Image.fromarray(data.camera()),
    "rgba": lambda: _with_alpha(data.coffee()),
    "la": lambda: _gray_with_alpha_ramp(),
    "palette": lambda: Image.fromarray(data.chelsea()).quantize(64),
    "palette_transparent": lambda: _palette_with_transparency(),
    "cmyk": lambda: Image.fromarray(data.coffee()).convert("CMYK"),
    "337x500": lambda: Image.fromarray(data.astronaut()).resize((337, 500)),
    "1000x200": lambda: Image.fromarray(data.coffee()).resize((1000, 200)),
    "200x1000": lambda: _rng_image(1000, 200),
    "tiny_20x30": lambda: _rng_image(30, 20),
    "1x1": lambda: _rng_image(1, 1),
    "exact_336": lambda: _rng_image(336, 336),
    "337x337": lambda: _rng_image(337, 337),
}


def _gray_with_alpha_ramp() -> Image.Image:
    image = Image.fromarray(data.camera()).convert("LA")
    image.putalpha(Image.fromarray(np.tile(np.arange(512, dtype=np.uint8)[None, :] // 2, (512, 1))))
    return image


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(data.chelsea()).quantize(16)
    image.info["transparency"] = 3
    return image


@pytest.mark.parametrize("name", list(PHOTOS) + list(ODD))
def test_matches_clip_image_processor(name):
    image = {**PHOTOS, **ODD}[name]()
    ours = preprocess_to_uint8(image)
    assert tuple(ours.shape) == (3, 336, 336)
    assert_same(ours, hf_uint8(image))


def test_rgba_is_composited_on_white_like_hf():
    rgb = np.zeros((400, 400, 3), dtype=np.uint8)
    alpha = np.zeros((400, 400), dtype=np.uint8)
    alpha[:, 200:] = 255
    image = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    out = preprocess_to_uint8(image)
    assert out[:, :, :150].min() == 255  # transparent black shows as white, not black
    assert out[:, :, 190:].max() == 0
    assert_same(out, hf_uint8(image))


def test_normalized_values_match_hf_pixel_values():
    """uint8 -> rescale/normalize (what the exported encoder does) reproduces HF's floats."""
    image = Image.fromarray(data.astronaut())
    ours = preprocess_to_uint8(image).to(torch.float32) / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    ours = ((ours - mean) / std).numpy()
    config = {k: v for k, v in LLAVA_CONFIG.items() if k not in ("processor_class", "image_processor_type")}
    theirs = CLIPImageProcessor(**config)(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 2},
        {"size": {"shortest_edge": 200}, "crop_size": {"height": 224, "width": 240}},  # crop pads
        {"do_center_crop": False},
        {"resample": 0},
    ],
    ids=["llava", "clip224_bilinear", "crop_pads", "no_crop", "nearest"],
)
def test_preprocess_with_config_follows_checkpoint(overrides):
    image = Image.fromarray(data.coffee())
    config = {**LLAVA_CONFIG, **overrides}
    assert_same(preprocess_with_config(image, config), hf_uint8(image, **overrides))


def test_preprocess_with_config_rejects_unsupported():
    image = _rng_image(10, 10)
    with pytest.raises(ValueError, match="shortest_edge"):
        preprocess_with_config(image, {**LLAVA_CONFIG, "size": {"height": 336, "width": 336}})
    with pytest.raises(ValueError, match="do_convert_rgb"):
        preprocess_with_config(image, {**LLAVA_CONFIG, "do_convert_rgb": False})


def test_load_image_applies_exif_orientation(tmp_path):
    upright = data.astronaut()[:, 100:400]  # 512 x 300, portrait
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 300 x 512 as the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())

    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (300, 512)
    assert np.abs(np.asarray(loaded, dtype=int) - upright).mean() < 4  # JPEG noise only
    assert_same(preprocess_to_uint8(loaded), hf_uint8(hf_load_image(str(path))))


def test_load_image_modes(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(data.camera()).save(gray)
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(data.camera()[..., None], 3, axis=2))

    sixteen = tmp_path / "gray16.png"
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(sixteen)
    assert Image.open(sixteen).mode == "I;16"
    # scaled to 8 bits (HF's plain convert("RGB") would clip all but 0 to 255)
    assert np.asarray(load_image(sixteen))[0, :, 0].tolist() == [0, 1, 128, 255]

    rgba = tmp_path / "rgba.png"
    _with_alpha(data.coffee()).save(rgba)
    assert_same(preprocess_to_uint8(load_image(rgba)), hf_uint8(Image.open(rgba)))

    palette = tmp_path / "palette.gif"
    Image.fromarray(data.chelsea()).quantize(32).save(palette)
    loaded = load_image(palette)
    assert loaded.mode == "RGB" and loaded.size == (451, 300)


def test_to_rgb_keeps_rgb_untouched():
    image = _rng_image(5, 7)
    assert to_rgb(image) is image


def test_save_image_pt_round_trip(tmp_path):
    tensor = preprocess_to_uint8(Image.fromarray(data.coffee()))
    path = tmp_path / "image.pt"
    save_image_pt(tensor, path)
    first = path.read_bytes()
    loaded = torch.load(path, weights_only=True)
    assert loaded.dtype == torch.uint8 and tuple(loaded.shape) == (3, 336, 336) and loaded.is_contiguous()
    assert torch.equal(loaded, tensor)
    save_image_pt(tensor, path)
    assert path.read_bytes() == first  # deterministic
    # a view saves only its own pixels
    save_image_pt(torch.zeros(3, 8, 8, dtype=torch.uint8)[:, :4, :4], tmp_path / "view.pt")
    assert tuple(torch.load(tmp_path / "view.pt", weights_only=True).shape) == (3, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        save_image_pt(tensor.float(), path)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        save_image_pt(tensor[None], path)
