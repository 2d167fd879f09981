"""`python -m llava_pipeline.run`: the llava_main-style CLI on ExecuTorch's MultimodalRunner.

- UTF-8: the binding raises UnicodeDecodeError from its token callback on a piece that
  is not UTF-8 on its own (a byte-fallback piece <0x80>..<0xFF>), which aborts the
  C++ generation. `Runner.generate` resumes it (see llava_pipeline/runtime/runner.py). Unit
  tests drive that logic with a fake binding that behaves as the real one was seen to;
  end to end, the tiny model never emits such a piece (its lm_head suppresses ids
  131..258), so a copy of the tokenizer with some pieces swapped makes the very tokens
  the model emits decode to the bytes of an emoji and a CJK character.
- Bad input: one `error: ...` line on stderr, exit code 2, never a traceback.
- Answers on real photographs, parity with transformers, interactive turns.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from llava_pipeline.formats import shapes
from llava_pipeline.formats import tokenizer as tok_mod
from llava_pipeline.formats.program_meta import ProgramMeta
from llava_pipeline.formats.vocabulary import Utf8Stream, Vocabulary
from llava_pipeline.runtime.runner import Generation, Runner, token_input

from .conftest import ROOT

QUESTION = "What is shown in this picture?"
EMOJI, CJK = "😀", "你"


def run_cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "llava_pipeline.run", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=cwd or ROOT,
        timeout=300,
    )


def cli_args(export: Path, image: Path | str | None = None, **flags) -> list[str]:
    values = dict(
        model_path=export / "llava.pte",
        tokenizer_path=export / "tokenizer.bin",
        image_path=image if image is not None else export / "image.pt",
        prompt=QUESTION,
        temperature=0,
    )
    values.update(flags)
    return [f"--{k}={v}" for k, v in values.items() if v is not None]


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert proc.stdout.strip() == ""
    return lines[0]


# ------------------------------------------------------------------ unit: UTF-8 buffering


def test_utf8_stream_holds_back_split_characters():
    stream = Utf8Stream()
    pieces = [b"A", b"\xf0", b"\x9f", b"\x98", b"\x80", b" ", b"\xe4", b"\xbd\xa0", b"!"]
    out = [stream.feed(p) for p in pieces] + [stream.flush()]
    assert out == ["A", "", "", "", EMOJI, " ", "", CJK, "!", ""]
    # a character that never completes becomes one U+FFFD, and nothing is lost around it
    stream = Utf8Stream()
    assert stream.feed(b"x\xe4\xbd") + stream.feed(b"y") + stream.flush() == "x\ufffdy"
    stream = Utf8Stream()
    assert stream.feed(b"\xf0\x9f") + stream.flush() == "\ufffd"


def test_generation_pieces_keep_raw_bytes():
    gen = Generation(piece_bytes=[b"a", b"\xe4", b"\xbd", b"\xa0"])
    assert gen.text == "a" + CJK
    assert "".join(gen.pieces).encode("utf-8", "surrogateescape") == b"a\xe4\xbd\xa0"


def _fake_vocab() -> tuple[Vocabulary, dict[str, int]]:
    pieces = [b"<unk>", b"<s>", b"</s>"] + [bytes([b]) for b in range(256)]
    words = ["Hello", " ", " and", "!", "WRONG", "e"]
    pieces += [w.encode() for w in words]
    ids = {w: 259 + i for i, w in enumerate(words)}
    vocab = Vocabulary(pieces=pieces, bos=1, eos=2, byte_fallback=frozenset(range(3, 259)))
    return vocab, ids


def _byte_ids(text: str) -> list[int]:
    return [3 + b for b in text.encode("utf-8")]


class FakeBinding:
    """Behaves as ExecuTorch 1.5.1's MultimodalRunner binding was observed to:

    - a token's text reaches the callback as a str, decoded strictly as UTF-8 before
      the call: a lone byte raises UnicodeDecodeError out of generate(), mid-loop;
    - prefill moves the position at once; the decode loop's tokens move it only when
      generate() completes; the last sampled token is never fed;
    - the next token depends on everything in the cache, so a replay that feeds a
      wrong id or position changes what follows.
    """

    def __init__(self, vocab: Vocabulary, script: list[int], wrong: int, eos=(2,), context=64):
        self.vocab, self.script, self.wrong, self.eos, self.context = vocab, script, wrong, eos, context
        self.cache: dict[int, int] = {}
        self.pos = 0
        self.prompt: list[int] | None = None
        self.calls = 0

    def _feed(self, tokens, at):
        for i, t in enumerate(tokens):
            self.cache[at + i] = t

    def _prefill(self, inputs):
        for inp in inputs:
            tokens = inp.get_tokens()
            self._feed(tokens, self.pos)
            self.pos += len(tokens)
        if self.prompt is None:
            self.prompt = [self.cache[i] for i in range(self.pos)]

    def _next(self, upto):
        history = [self.cache[i] for i in range(upto)]
        said = history[len(self.prompt) :]
        ok = history[: len(self.prompt)] == self.prompt and said == self.script[: len(said)]
        return self.script[len(said)] if ok and len(said) < len(self.script) else self.wrong

    def prefill(self, inputs):
        self._prefill(inputs)

    def generate(self, inputs, config, token_callback, stats_callback):
        self.calls += 1
        self._prefill(inputs)
        cur = self._next(self.pos)
        token_callback(self.vocab.piece(cur).decode("utf-8"))  # the binding's strict conversion
        limit = min(config.seq_len if config.seq_len > 0 else self.context, self.context) - self.pos
        if config.max_new_tokens > 0:
            limit = min(limit, config.max_new_tokens)
        if limit <= 0:
            raise RuntimeError("Generation failed")
        pos = self.pos
        while pos < self.pos + limit - 1 and cur not in self.eos:
            self._feed([cur], pos)
            pos += 1
            cur = self._next(pos)
            token_callback(self.vocab.piece(cur).decode("utf-8"))
        generated, prompt_tokens = pos - self.pos, self.pos
        self.pos = pos

        class Stats:
            def to_json_string(self):
                return f'{{"prompt_tokens": {prompt_tokens}, "generated_tokens": {generated}}}'

        stats_callback(Stats())

    def reset(self):
        self.cache, self.pos, self.prompt = {}, 0, None


def _fake_runner(script: list[int], context=64):
    vocab, words = _fake_vocab()
    meta = ProgramMeta(frozenset(), context, context, len(vocab._pieces), None, (2,), (336, 336), 576)
    binding = FakeBinding(vocab, script, wrong=words["WRONG"], context=context)
    return Runner(None, None, binding=binding, vocab=vocab, meta=meta), binding, words


PROMPT = [1, 259, 260]


def _script(words):
    return [words["Hello"], words[" "]] + _byte_ids(EMOJI) + [words[" and"]] + _byte_ids(CJK) + [words["!"], 2]


def test_fake_binding_aborts_like_the_real_one():
    """The premise: without the workaround the fake, like the binding, raises mid-answer."""
    runner, binding, words = _fake_runner([])
    binding.script = _script(words)
    from executorch.extension.llm.runner import GenerationConfig

    got = []
    with pytest.raises(UnicodeDecodeError) as info:
        binding.generate([token_input(PROMPT)], GenerationConfig(max_new_tokens=-1), got.append, lambda s: None)
    assert got == ["Hello", " "] and info.value.object == b"\xf0"
    assert binding.pos == len(PROMPT)  # the position stayed after the prefill


def test_resumes_after_byte_pieces_and_stops_at_eos():
    runner, binding, words = _fake_runner([])
    script = binding.script = _script(words)
    chunks: list[str] = []
    gen = runner.generate([token_input(PROMPT)], max_new_tokens=-1, on_text=chunks.append)
    assert gen.text == f"Hello {EMOJI} and{CJK}!"
    assert chunks == ["Hello", " ", EMOJI, " and", CJK, "!"]  # whole characters only, no U+FFFD
    assert gen.stop == "eos" and gen.eos_id == 2 and gen.pending_id is None
    assert gen.resyncs == 7 and gen.tokens == len(script)
    # the cache holds the prompt and every answer token but the EOS, at the right positions
    assert [binding.cache[i] for i in range(binding.pos)] == PROMPT + script[:-1]
    assert runner.pos == binding.pos == len(PROMPT) + len(script) - 1


def test_first_token_a_lone_byte():
    runner, binding, words = _fake_runner([])
    binding.script = _byte_ids(CJK) + [words["!"], 2]
    gen = runner.generate([token_input(PROMPT)], max_new_tokens=-1)
    assert gen.text == CJK + "!" and gen.stop == "eos" and gen.resyncs == 3


@pytest.mark.parametrize("limit", [1, 3, 4, 6, 7])
def test_max_new_tokens_counts_across_resumes(limit):
    runner, binding, words = _fake_runner([])
    script = binding.script = _script(words)
    gen = runner.generate([token_input(PROMPT)], max_new_tokens=limit)
    assert gen.tokens == limit and gen.stop == "max_new_tokens"
    assert gen.pending_id == script[limit - 1]  # shown, not fed
    assert runner.pos == binding.pos == len(PROMPT) + limit - 1
    assert gen.text == b"".join(binding.vocab.piece(t) for t in script[:limit]).decode("utf-8", "replace")


@pytest.mark.parametrize("seq_len", [5, 6, 8, 10])
def test_seq_len_counts_across_resumes(seq_len):
    runner, binding, words = _fake_runner([])
    script = binding.script = _script(words)
    gen = runner.generate([token_input(PROMPT)], max_new_tokens=-1, seq_len=seq_len)
    n = seq_len - len(PROMPT)
    assert gen.tokens == n and gen.stop == "seq_len" and gen.pending_id == script[n - 1]
    assert runner.pos == binding.pos == seq_len - 1


def test_an_error_in_the_callers_callback_is_not_taken_for_a_piece():
    runner, binding, words = _fake_runner([])
    binding.script = _script(words)

    def broken(text):
        raise BrokenPipeError("stdout closed")

    with pytest.raises(BrokenPipeError):
        runner.generate([token_input(PROMPT)], max_new_tokens=-1, on_text=broken)
    assert binding.calls == 1 and runner.pos is None


def test_vocabulary_prefers_ordinary_pieces():
    vocab, words = _fake_vocab()
    assert vocab.id_of(b"e") == words["e"]  # not the byte-fallback <0x65>
    assert vocab.id_of(b"\xe4") == 3 + 0xE4 and vocab.id_of(b"nothing") is None


# ------------------------------------------------------------------ bad input, no export needed


@pytest.fixture
def dummy(tmp_path) -> dict[str, Path]:
    files = {"pte": tmp_path / "model.pte", "tok": tmp_path / "tokenizer.bin", "img": tmp_path / "image.pt"}
    for path in files.values():
        path.write_bytes(b"not what it claims to be\n" * 10)
    return files


def _dummy_args(dummy, **flags) -> list[str]:
    values = dict(model_path=dummy["pte"], tokenizer_path=dummy["tok"], image_path=dummy["img"], prompt=QUESTION)
    values.update(flags)
    return [f"--{k}={v}" for k, v in values.items() if v is not None]


@pytest.mark.parametrize(
    "flags, words",
    [
        (dict(temperature=1.5), ["--temperature", "1.5", "[0, 1]"]),
        (dict(temperature=-0.1), ["--temperature", "-0.1"]),
        (dict(temperature="nan"), ["--temperature"]),
        (dict(seq_len="abc"), ["--seq_len", "invalid int value"]),
        (dict(seq_len=0), ["--seq_len", "positive"]),
        (dict(prompt=None), ["--prompt", "required"]),
        (dict(model_path="missing.pte"), ["--model_path", "missing.pte", "not found"]),
        (dict(tokenizer_path="missing.bin"), ["--tokenizer_path", "not found"]),
        (dict(image_path="missing.jpg"), ["--image_path", "missing.jpg", "not found"]),
        (dict(model_path="CORRUPT"), ["--model_path", "not a loadable ExecuTorch program"]),
    ],
)
def test_bad_flags_one_line(dummy, flags, words):
    if flags.get("model_path") == "CORRUPT":
        flags = dict(flags, model_path=dummy["pte"])
    assert_one_line_error(run_cli(*_dummy_args(dummy, **flags)), *words)


def test_unknown_flag_and_raw_interactive_one_line(dummy):
    assert_one_line_error(run_cli(*_dummy_args(dummy), "--top_p=0.9"), "unrecognized arguments")
    assert_one_line_error(run_cli(*_dummy_args(dummy), "--raw", "--interactive"), "--raw", "--interactive")


# ------------------------------------------------------------------ bad input on a real export


def _truncated(src: Path, dst: Path, fraction: float) -> Path:
    blob = src.read_bytes()
    dst.write_bytes(blob[: int(len(blob) * fraction)])
    return dst


def _tokenizer_with(src: Path, dst: Path, keep: int) -> Path:
    """A copy of an llama2c tokenizer.bin cut to its first `keep` ids."""
    blob = src.read_bytes()
    off = 16
    for _ in range(keep):
        off += 8 + struct.unpack_from("<I", blob, off + 4)[0]
    dst.write_bytes(struct.pack("<I", keep) + blob[4:off])
    return dst


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photographs (scikit-image) in the forms people have them."""
    d = tmp_path_factory.mktemp("photos")
    out = {}
    Image.fromarray(data.chelsea()).save(d / "chelsea.jpg", quality=92)
    out["jpeg"] = d / "chelsea.jpg"
    Image.fromarray(data.coffee()).save(d / "coffee.png")
    out["png"] = d / "coffee.png"
    # The other forms on a shapes scene, which the trained model answers by looking: three
    # kinds whose left-to-right order (by x) differs from their top-to-bottom order (by y), so
    # the scene turned 90 degrees counter-clockwise (top to the left) has another description.
    scene = next(
        sc
        for sc in (shapes.sample_scene(random.Random(seed), 3) for seed in range(1000))
        if len({s.kind for s in sc.shapes}) == 3
        and [s.kind for s in sorted(sc.shapes, key=lambda s: s.cx)]
        != [s.kind for s in sorted(sc.shapes, key=lambda s: s.y0 + s.side / 2)]
    )
    picture = shapes.render(scene)
    picture.convert("L").save(d / "scene_gray.png")
    picture.convert("L").convert("RGB").save(d / "scene_gray_rgb.png")
    out["gray"], out["gray_rgb"] = d / "scene_gray.png", d / "scene_gray_rgb.png"
    h, w = picture.height, picture.width
    alpha = np.tile(np.linspace(120, 255, w, dtype=np.uint8), (h, 1))
    rgba = Image.fromarray(np.dstack([np.asarray(picture), alpha]))
    assert rgba.mode == "RGBA"
    rgba.save(d / "scene_rgba.png")
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    white.save(d / "scene_on_white.png")
    out["rgba"], out["rgba_white"] = d / "scene_rgba.png", d / "scene_on_white.png"
    # EXIF orientation 6: the stored pixels are the picture turned 90 degrees counter-clockwise;
    # viewers (and the HF processor via load_image) turn it back.
    stored = picture.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(d / "scene_exif6.jpg", quality=95, exif=exif)
    with Image.open(d / "scene_exif6.jpg") as f:
        f.load()
        from PIL import ImageOps

        ImageOps.exif_transpose(f).save(d / "scene_upright.png")
        f.convert("RGB").save(d / "scene_as_stored.png")
    out["exif"], out["exif_upright"], out["exif_stored"] = (
        d / "scene_exif6.jpg",
        d / "scene_upright.png",
        d / "scene_as_stored.png",
    )
    (d / "notes.jpg").write_text("this is not a picture\n")
    out["not_image"] = d / "notes.jpg"
    out["truncated"] = _truncated(out["jpeg"], d / "chelsea_truncated.jpg", 0.6)
    return out


@pytest.mark.slow
def test_bad_model_files_one_line(export_8da4w, tmp_path):
    pte = export_8da4w / "llava.pte"
    cases = {
        "truncated": (_truncated(pte, tmp_path / "half.pte", 0.5), "not a loadable ExecuTorch program"),
        "text": (tmp_path / "model.txt", "not a loadable ExecuTorch program"),
    }
    cases["text"][0].write_text("hello\n")
    for path, words in cases.values():
        assert_one_line_error(run_cli(*cli_args(export_8da4w, model_path=path)), "--model_path", str(path), words)


@pytest.mark.slow
def test_tokenizer_with_another_vocab_one_line(export_8da4w, tmp_path):
    small = _tokenizer_with(export_8da4w / "tokenizer.bin", tmp_path / "tokenizer32000.bin", 32000)
    line = assert_one_line_error(run_cli(*cli_args(export_8da4w, tokenizer_path=small)), "--tokenizer_path")
    assert "32000" in line and "32064" in line
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff" * 4096)
    assert_one_line_error(
        run_cli(*cli_args(export_8da4w, tokenizer_path=garbage)), "--tokenizer_path", "not an llama2c tokenizer.bin"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, words",
    [("not_image", ["cannot read", "UnidentifiedImageError"]), ("truncated", ["cannot read", "truncated"])],
)
def test_unreadable_image_one_line(export_8da4w, photos, kind, words):
    proc = run_cli(*cli_args(export_8da4w, photos[kind]))
    assert_one_line_error(proc, "--image_path", str(photos[kind]), *words)


@pytest.mark.slow
def test_prompt_and_seq_len_limits_one_line(export_8da4w):
    long_prompt = " ".join(["Describe every single detail of the picture"] * 30)
    line = assert_one_line_error(run_cli(*cli_args(export_8da4w, prompt=long_prompt)), "--prompt", "576 image")
    assert "768" in line
    line = assert_one_line_error(run_cli(*cli_args(export_8da4w, seq_len=500)), "--seq_len", "500", "too small")
    assert "595 positions" in line  # 19 text tokens + 576 image positions
    assert_one_line_error(run_cli(*cli_args(export_8da4w, seq_len=595)), "--seq_len", "use at least 596")
    assert_one_line_error(
        run_cli(*cli_args(export_8da4w, seq_len=100000)), "--seq_len", "above the model's maximum of 768"
    )
    assert_one_line_error(run_cli(*cli_args(export_8da4w, prompt="two <image> here")), "--prompt", "<image>")


# ------------------------------------------------------------------ answers


def _answer(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]


@pytest.mark.slow
def test_flag_forms_and_stats(export_random):
    eq = run_cli(*cli_args(export_random, max_new_tokens=12))
    spaced = run_cli(
        "--model_path",
        str(export_random / "llava.pte"),
        "--tokenizer_path",
        str(export_random / "tokenizer.bin"),
        "--image_path",
        str(export_random / "image.pt"),
        "--prompt",
        QUESTION,
        "--seq_len",
        "768",
        "--temperature",
        "0",
        "--max_new_tokens",
        "12",
    )
    assert _answer(eq) == _answer(spaced) and _answer(eq).strip()
    stats = spaced.stderr.strip().splitlines()
    assert all(line.startswith("[stats] ") for line in stats), spaced.stderr
    text = "\n".join(stats)
    for words in (
        "image encode:",
        "576 embeddings",
        "prefill:",
        "19 text tokens",
        "decode:",
        "tok/s",
        "11 tokens after the first",
        "--max_new_tokens",
        "context 606/768",
        "peak RSS:",
        "MiB",
    ):
        assert words in text, text


@pytest.mark.slow
def test_answers_about_pictures_in_every_form(export_fp32, photos):
    """The trained model (fp32) through the CLI on JPEG, PNG, grayscale, RGBA and EXIF-rotated
    files: each form gets the answer its upright RGB equivalent gets."""
    answers = {}
    for kind in ("jpeg", "png", "gray", "gray_rgb", "rgba", "rgba_white", "exif", "exif_upright", "exif_stored"):
        answers[kind] = _answer(
            run_cli(*cli_args(export_fp32, photos[kind], prompt=shapes.DESCRIBE_Q, max_new_tokens=24))
        )
        assert answers[kind].strip(), kind
    assert answers["gray"] == answers["gray_rgb"]  # grayscale is replicated to RGB
    assert answers["rgba"] == answers["rgba_white"]  # alpha composited on white, as HF does
    assert answers["exif"] == answers["exif_upright"]  # EXIF orientation applied
    assert answers["exif"] != answers["exif_stored"]  # the answer depends on the picture


# ------------------------------------------------------------------ parity with transformers (fp32)


def _hf_greedy(export: Path, picture_path: Path, question: str, n: int, extra_ids: list[int] | None = None):
    """transformers' greedy ids after "USER: <image>\\n{q} ASSISTANT:" (+ extra_ids), and the prompt ids."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.image_utils import load_image

    model = LlavaForConditionalGeneration.from_pretrained(export / "download", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(export / "download")
    prompt = tok_mod.LLAVA_PROMPT_TEMPLATE.format(question=question)
    inputs = processor(images=load_image(str(picture_path)), text=prompt, return_tensors="pt")
    ids = inputs["input_ids"]
    if extra_ids:
        ids = torch.cat([ids, torch.tensor([extra_ids])], dim=1)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs["pixel_values"],
            max_new_tokens=n,
            do_sample=False,
        )
    return out[0, ids.shape[1] :].tolist(), inputs["input_ids"][0].tolist()


def _vocab(export: Path) -> Vocabulary:
    return Vocabulary(export / "tokenizer.bin")


def _text(vocab: Vocabulary, ids: list[int]) -> str:
    """The ids decoded piece by piece, as the runner decodes them, then as UTF-8."""
    return b"".join(vocab.piece(i) for i in ids).decode("utf-8", errors="replace")


N_PARITY = 40


@pytest.fixture(scope="module")
def hf_reference(export_random, photos):
    """transformers' greedy answer on the random-weight model: N_PARITY tokens, no EOS."""
    hf_new, prompt_ids = _hf_greedy(export_random, photos["jpeg"], QUESTION, N_PARITY)
    assert len(hf_new) == N_PARITY
    return hf_new, prompt_ids


@pytest.mark.slow
def test_fp32_cli_equals_transformers_on_a_jpeg(export_random, photos, hf_reference):
    hf_new, _ = hf_reference
    proc = run_cli(*cli_args(export_random, photos["jpeg"], max_new_tokens=N_PARITY))
    assert _answer(proc) == _text(_vocab(export_random), hf_new)


def _swapped_tokenizer(src: Path, dst: Path, swaps: dict[int, int]) -> Path:
    """A copy of tokenizer.bin with the pieces of each (a, b) pair exchanged: same vocabulary
    size, same pieces, only which id decodes to which piece changes."""
    blob = src.read_bytes()
    n = struct.unpack_from("<I", blob, 0)[0]
    off, entries = 16, []
    for _ in range(n):
        length = struct.unpack_from("<I", blob, off + 4)[0]
        entries.append([blob[off : off + 4], blob[off + 8 : off + 8 + length]])
        off += 8 + length
    for a, b in swaps.items():
        entries[a][1], entries[b][1] = entries[b][1], entries[a][1]
    dst.write_bytes(blob[:16] + b"".join(s + struct.pack("<I", len(p)) + p for s, p in entries))
    return dst


def _byte_fallback_tokenizer(export: Path, tmp_path: Path, answer: list[int], prompt_ids: list[int]):
    """Make the answer's own tokens decode to the bytes of EMOJI (from its first token on)
    and CJK (a few tokens later), by swapping their pieces with the byte-fallback pieces."""
    wanted = list(EMOJI.encode()) + [None] + list(CJK.encode())  # None: keep that token as it is
    swaps: dict[int, int] = {}
    for token, byte in zip(answer, wanted):
        if byte is None:
            continue
        assert token not in prompt_ids and token not in swaps and token >= 259, token
        swaps[token] = 3 + byte  # <0xXX> is id 3 + XX in the Llama-2 vocabulary
    assert _vocab(export).piece(3 + 0xF0) == b"\xf0"
    return _swapped_tokenizer(export / "tokenizer.bin", tmp_path / "tokenizer_swapped.bin", swaps)


@pytest.mark.slow
def test_binding_raises_on_a_lone_byte_piece(export_random, photos, hf_reference, tmp_path):
    """The problem being worked around, on the real binding: the callback's str conversion
    raises UnicodeDecodeError out of generate(), carrying the bytes, and the runner stays usable."""
    from executorch.extension.llm.runner import GenerationConfig

    from llava_pipeline.formats.image import load_pixels
    from llava_pipeline.runtime.runner import image_input, native_output_captured

    hf_new, prompt_ids = hf_reference
    tokenizer = _byte_fallback_tokenizer(export_random, tmp_path, hf_new, prompt_ids)
    vocab = Vocabulary(tokenizer)
    seg = tok_mod.runner_prompt_segments(QUESTION)
    inputs = [
        token_input(vocab.encode(seg.before_image, 1, 0)),
        image_input(load_pixels(photos["jpeg"], (336, 336))),
        token_input(vocab.encode(seg.after_image, 0, 0)),
    ]
    got: list[str] = []
    with native_output_captured():
        runner = Runner(export_random / "llava.pte", tokenizer)
        with pytest.raises(UnicodeDecodeError) as info:
            runner._runner.generate(
                inputs, GenerationConfig(temperature=0, max_new_tokens=8, echo=False), got.append, None
            )
        assert got == [] and info.value.object == b"\xf0"
        runner._runner.prefill([token_input([1, 15043])])  # still usable
        runner.reset()


@pytest.mark.slow
def test_fp32_cli_prints_emoji_and_cjk_split_over_byte_pieces(export_random, photos, hf_reference, tmp_path):
    """End to end through the real binding: the first answer token and three later ones are
    lone bytes; the CLI prints exactly the text transformers' ids decode to."""
    hf_new, prompt_ids = hf_reference
    tokenizer = _byte_fallback_tokenizer(export_random, tmp_path, hf_new, prompt_ids)
    expected = _text(Vocabulary(tokenizer), hf_new)
    assert expected.startswith(EMOJI) and CJK in expected and "\ufffd" not in expected
    proc = run_cli(*cli_args(export_random, photos["jpeg"], tokenizer_path=tokenizer, max_new_tokens=N_PARITY))
    assert _answer(proc) == expected
    assert "resumed 7x" in proc.stderr


# ------------------------------------------------------------------ interactive


@pytest.mark.slow
def test_interactive_second_turn_equals_transformers(export_random, photos, hf_reference):
    """Two turns; the second answer is what transformers gives on the whole conversation
    "USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:" (A1 cut at 8 tokens)."""
    hf_new, _ = hf_reference
    vocab = _vocab(export_random)
    q2 = "What colour is the cat?"
    proc = run_cli(*cli_args(export_random, photos["jpeg"], max_new_tokens=8), "--interactive", stdin=f"{q2}\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    turn2 = [vocab.eos] + vocab.encode(f"USER: {q2} ASSISTANT:", 0, 0)
    hf2, _ = _hf_greedy(export_random, photos["jpeg"], QUESTION, 8, extra_ids=hf_new[:8] + turn2)
    a1, a2 = _text(vocab, hf_new[:8]), _text(vocab, hf2)
    assert proc.stdout == f"{a1}\n{a2}\n"
    assert a2.strip() and "context full" not in proc.stderr
    assert proc.stderr.count("[stats] decode:") == 2


@pytest.mark.slow
def test_interactive_turns_from_stdin_until_context_full(export_random):
    args = cli_args(export_random, prompt=None, max_new_tokens=8, seq_len=640)
    stdin = f"{QUESTION}\n\nShow <image> again\nIs there a cup?\nAnything else?\nAnd now?\n"
    proc = run_cli(*args, "--interactive", stdin=stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = proc.stdout.split("\n")
    # positions: turn 1 595 + 7; turn 2 15 + 7 (-> 624); turn 3 15, then only 1 answer token fits
    # in 640: the context is full and the 4th question is never asked
    assert len(answers) == 3 + 1 and all(a.strip() for a in answers[:3]) and answers[3] == ""
    assert "context 624/640" in proc.stderr and "context 639/640" in proc.stderr
    assert "error: prompt must contain <image> exactly once, found 2" in proc.stderr  # that line is skipped
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("context full:") and "of --seq_len 640" in last


@pytest.mark.slow
def test_interactive_first_answer_fills_the_context(export_random):
    proc = run_cli(*cli_args(export_random, seq_len=610), "--interactive", stdin="Another question?\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 1 and "--seq_len reached" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("context full: 609 of --seq_len 610")
