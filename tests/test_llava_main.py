"""The export in ExecuTorch's own runner path, driven exactly as `llava_main` drives it.

examples/models/llava/main.cpp: the file decoded with its own channel count, the longest edge
resized to 336 (the other `int(edge * 336 / longest)`), planar uint8; the MultimodalRunner gets
[text(preset system prompt ending "USER: "), image, text(--prompt)] with `echo = true`.
Here: the same call sequence through the Python binding, Pillow standing in for stb
(llava_pipeline/runtime/llava_main.py: `llava_main_pixels`, BICUBIC for stbir_resize_uint8). The greedy
answer of an fp32 export must be transformers' own greedy answer, token for token, on the
pixels the encoder pads to (Pillow computes them independently of the graph); the 8da4w export
reports its agreement with it.

Exports of other presets (the 7B-shape one, too heavy for `make test`): set
LLAVA_MAIN_EXPORTS to a colon-separated list of `outputs/` folders of finished exports.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_pipeline.formats import runner_image, shapes
from llava_pipeline.formats.vocabulary import Vocabulary
from llava_pipeline.runtime import llava_main
from llava_pipeline.runtime.llava_main import PRESET
from llava_pipeline.runtime.runner import image_input, load_runtime_kernels

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Describe the picture. ASSISTANT:"
NEW_TOKENS = 24  # llava_main runs to EOS or the context's end; capped here to bound the time
# Exact-answer agreement of the 8da4w export with fp32 transformers over these pictures: the
# shapes scenes are answered decisively, the photographs (outside the training task) less so.
AGREEMENT_8DA4W_FLOOR = 0.5


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Image files of several aspect ratios, odd sizes and every channel count stb decodes."""
    d = tmp_path_factory.mktemp("llava_main_pictures")
    scene = shapes.render(shapes.sample_scene(random.Random(42), 3))
    files = {
        "photo_landscape.jpg": Image.open(ROOT / "assets/images/coffee.jpg"),  # 600x400 -> 336x224
        "photo_portrait.png": Image.open(ROOT / "assets/images/chelsea.jpg").transpose(Image.Transpose.ROTATE_90),
        "scene_336x251.png": scene.resize((336, 251), Image.Resampling.BICUBIC),  # odd height
        "scene_1x336.png": scene.resize((1, 336), Image.Resampling.BICUBIC),  # one pixel wide
        "scene_gray.png": scene.convert("L"),  # stb: 1 channel
        "scene_gray_alpha.png": Image.merge("LA", (scene.convert("L"), Image.new("L", scene.size, 200))),
        "scene_rgba_672.png": Image.fromarray(
            np.dstack(
                [  # 4 channels, alpha from 100 to 255
                    np.asarray(scene.resize((672, 672), Image.Resampling.BICUBIC)),
                    np.tile(np.linspace(100, 255, 672).astype(np.uint8), (672, 1)),
                ]
            )
        ),
        "scene.png": scene,
    }
    for name, picture in files.items():
        picture.save(d / name)
    return {name: d / name for name in files}


class Export:
    """One finished export, and what its checks read once: the runner's tokenizer, the image's
    positions in the cache, and transformers' model and image processor of its checkpoint."""

    def __init__(self, outputs: Path):
        from transformers import AutoImageProcessor, LlavaForConditionalGeneration

        from llava_pipeline.formats.program_meta import read_program_meta

        self.outputs = outputs
        self.vocab = Vocabulary(outputs / "tokenizer.bin")
        self.image_tokens = read_program_meta(outputs / "llava.pte").image_tokens
        ckpt = outputs / "download"
        self.model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        self.processor = AutoImageProcessor.from_pretrained(ckpt)
        self.side = self.processor.crop_size["height"]

    def llava_main_generate(self, chw: np.ndarray, prompt: str = PROMPT) -> tuple[list[bytes], dict]:
        """main.cpp's call sequence through the binding (a fresh runner, as each llava_main run
        has); the answer's pieces (EOS left out) and the runner's Stats."""
        from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_text_input

        load_runtime_kernels()
        runner = MultimodalRunner(str(self.outputs / "llava.pte"), str(self.outputs / "tokenizer.bin"))
        inputs = [make_text_input(PRESET), image_input(torch.from_numpy(chw)), make_text_input(prompt)]
        pieces, stats = [], {}
        config = GenerationConfig(echo=True, temperature=0.0, max_new_tokens=NEW_TOKENS)
        runner.generate(
            inputs,
            config,
            lambda p: pieces.append(p.encode("utf-8")),
            lambda s: stats.update(json.loads(s.to_json_string())),
        )
        # With echo the runner shows the last text input first (not the preset, not the image),
        # then one piece per sampled token, the EOS included.
        echo = prompt.encode("utf-8")
        assert echo in pieces, pieces[:3]
        answer = pieces[len(pieces) - pieces[::-1].index(echo) :]
        if answer and answer[-1] == self.vocab.piece(self.vocab.eos):
            answer = answer[:-1]
        return answer, stats

    def hf_generate(self, chw: np.ndarray, n_bos: int, prompt: str = PROMPT) -> list[int]:
        """transformers' greedy answer (ids, up to EOS) on the same ids and the padded pixels."""
        canvas = llava_main.padded_like_encoder(chw, self.side, runner_image.pad_color(self.processor.image_mean))
        pixel_values = self.processor(
            Image.fromarray(canvas.transpose(1, 2, 0)), do_resize=False, do_center_crop=False, return_tensors="pt"
        )["pixel_values"]
        cfg = self.model.config
        ids = (
            self.vocab.encode(PRESET, n_bos, 0)
            + [cfg.image_token_id] * self.image_tokens
            + self.vocab.encode(prompt, 0, 0)
        )
        seq = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=seq,
                pixel_values=pixel_values,
                attention_mask=torch.ones_like(seq),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        new = out[0, len(ids) :].tolist()
        eos = cfg.text_config.eos_token_id
        return new[: new.index(eos)] if eos in new else new

    def answers(self, pictures: dict[str, Path]) -> dict[str, tuple[list[bytes], list[bytes]]]:
        """Per picture: (the runner's answer, transformers' answer), as pieces."""
        base = len(self.vocab.encode(PRESET, 0, 0)) + self.image_tokens + len(self.vocab.encode(PROMPT, 0, 0))
        out = {}
        for name, path in pictures.items():
            chw = llava_main.llava_main_pixels(path, self.side)
            got, stats = self.llava_main_generate(chw)
            n_bos = int(stats["prompt_tokens"]) - base  # how many BOS the runner put before the preset text
            assert n_bos in (0, 1), (name, stats)
            out[name] = (got, [self.vocab.piece(i) for i in self.hf_generate(chw, n_bos)])
        return out


def _answers(outputs: Path, pictures: dict[str, Path]) -> dict[str, tuple[list[bytes], list[bytes]]]:
    return Export(outputs).answers(pictures)


def _check_fp32(answers):
    for name, (got, want) in answers.items():
        assert want, f"{name}: transformers gave an empty answer"
        assert got == want, f"{name}: runner {b''.join(got)!r} != transformers {b''.join(want)!r}"


def _agreement(answers) -> float:
    return sum(got == want for got, want in answers.values()) / len(answers)


def test_stand_in_shapes_are_what_llava_main_makes(pictures):
    shapes_seen = {name: llava_main.llava_main_pixels(path).shape for name, path in pictures.items()}
    assert shapes_seen == {
        "photo_landscape.jpg": (3, 224, 336),
        "photo_portrait.png": (3, 336, 223),
        "scene_336x251.png": (3, 251, 336),
        "scene_1x336.png": (3, 336, 1),
        "scene_gray.png": (1, 336, 336),
        "scene_gray_alpha.png": (2, 336, 336),
        "scene_rgba_672.png": (4, 336, 336),
        "scene.png": (3, 336, 336),
    }


def test_fp32_export_answers_like_transformers(export_fp32, pictures):
    _check_fp32(_answers(export_fp32, pictures))


def test_8da4w_export_agreement(export_8da4w, pictures, record_property):
    answers = _answers(export_8da4w, pictures)
    agree = _agreement(answers)
    record_property("llava_main_exact_answer_agreement_8da4w", agree)
    print(json.dumps({"agreement": agree, **{k: g == w for k, (g, w) in answers.items()}}))
    assert agree >= AGREEMENT_8DA4W_FLOOR


@pytest.mark.parametrize("shape", [(3, 400, 336), (3, 337, 1), (1, 400, 100)])
def test_oversized_image_fails_inside_the_runner(export_fp32, shape):
    """What an app meets that skips the resize: the binding's generate() fails (the encoder's
    bounds hold), with nothing more specific than "Generation failed"."""
    from executorch.extension.llm.runner import GenerationConfig, MultimodalInput, MultimodalRunner, make_text_input
    from executorch.extension.llm.runner import Image as RunnerImageInput

    load_runtime_kernels()
    runner = MultimodalRunner(str(export_fp32 / "llava.pte"), str(export_fp32 / "tokenizer.bin"))
    c, h, w = shape
    picture = MultimodalInput(RunnerImageInput([0] * (c * h * w), w, h, c))
    with pytest.raises(RuntimeError, match="Generation failed"):
        runner.generate(
            [make_text_input(PRESET), picture, make_text_input(PROMPT)],
            GenerationConfig(echo=True, temperature=0.0, max_new_tokens=4),
            lambda p: None,
            lambda s: None,
        )


def test_oversized_image_is_refused_before_the_runner():
    with pytest.raises(ValueError, match="337x336 pixels"):
        image_input(torch.zeros(3, 337, 336, dtype=torch.uint8), 336)


@pytest.mark.skipif(not os.environ.get("LLAVA_MAIN_EXPORTS"), reason="LLAVA_MAIN_EXPORTS not set")
def test_other_exports(pictures, record_property):
    """Each listed export: fp32 (manifest scheme none) token for token, else agreement reported."""
    for folder in os.environ["LLAVA_MAIN_EXPORTS"].split(":"):
        outputs = Path(folder)
        scheme = json.loads((outputs / "quantize" / "manifest.json").read_text())["config"]["quant"]["scheme"]
        answers = _answers(outputs, pictures)
        record_property(f"agreement {outputs}", _agreement(answers))
        print(
            json.dumps(
                {
                    "export": str(outputs),
                    "scheme": scheme,
                    "agreement": _agreement(answers),
                    **{
                        k: [b"".join(g).decode(errors="replace"), b"".join(w).decode(errors="replace")]
                        for k, (g, w) in answers.items()
                    },
                }
            )
        )
        if scheme == "none":
            _check_fp32(answers)
