"""Ask an exported LLaVA about a picture, with ExecuTorch's MultimodalRunner.

    python -m llava_pipeline.run --model_path=outputs/llava.pte \\
        --tokenizer_path=outputs/tokenizer.bin --image_path=outputs/image.pt \\
        --prompt="What is shown in this picture?" --seq_len=768 --temperature=0

Flags follow ExecuTorch's llava_main. `--image_path` takes the pipeline's
`image.pt` (uint8 CHW at the model's size) or an ordinary image file, which is
preprocessed as LLaVA-1.5's HF processor does (336 px shortest edge, bicubic,
center crop). The prompt is put in the LLaVA-1.5 chat format unless `--raw`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from . import image as image_mod
from . import tokenizer as tok_mod


class UsageError(Exception):
    """Bad input: reported in one line, exit code 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_pipeline.run", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True, type=Path)
    p.add_argument("--tokenizer_path", required=True, type=Path)
    p.add_argument("--image_path", required=True, type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--seq_len", type=int, default=768, help="total tokens: prompt + image + answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; at most 1")
    p.add_argument("--raw", action="store_true", help="send the prompt as is (must contain <image>)")
    return p.parse_args(argv)


def load_pixels(path: Path, size: int) -> torch.Tensor:
    """uint8 [3, size, size] from image.pt or an image file."""
    if not path.is_file():
        raise UsageError(f"--image_path: {path} not found")
    if path.suffix == ".pt":
        try:
            pixels = torch.load(path, weights_only=True)
        except Exception as e:
            raise UsageError(f"--image_path: {path} is not a torch tensor file ({e})") from None
        if not (isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.dim() in (3, 4)):
            raise UsageError(f"--image_path: {path} must hold a uint8 CHW tensor")
        pixels = pixels.reshape(pixels.shape[-3:])
        if tuple(pixels.shape) != (3, size, size):
            raise UsageError(f"--image_path: {path} is {tuple(pixels.shape)}, the model takes (3, {size}, {size})")
        return pixels
    try:
        picture = image_mod.load_image(path)
    except Exception as e:
        raise UsageError(f"--image_path: cannot read {path} as an image ({e})") from None
    return image_mod.preprocess_to_uint8(picture, size)


def _program_meta(model_path: Path) -> dict:
    """Constant methods and the vision input size, read from the .pte."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from .runner import load_kernels

    load_kernels()
    try:
        module = _load_for_executorch(str(model_path))
    except Exception as e:
        raise UsageError(f"--model_path: {model_path} is not a loadable ExecuTorch program ({e})") from None
    names = set(module.method_names())
    missing = {"vision_encoder", "token_embedding", "text_decoder", "get_max_seq_len"} - names
    if missing:
        raise UsageError(f"--model_path: {model_path} lacks method(s) {sorted(missing)}")
    meta = {n: module.run_method(n, ())[0] for n in ("get_max_seq_len", "get_vocab_size") if n in names}
    meta["image_size"] = module.method_meta("vision_encoder").input_tensor_meta(0).sizes()[-1]
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .runner import Runner, image_input, native_output_captured, text_input

    if not 0.0 <= args.temperature <= 1.0:
        raise UsageError(f"--temperature: {args.temperature} is outside [0, 1]")
    for flag, path in (("--model_path", args.model_path), ("--tokenizer_path", args.tokenizer_path)):
        if not path.is_file():
            raise UsageError(f"{flag}: {path} not found")
    meta = _program_meta(args.model_path)
    if args.seq_len > meta["get_max_seq_len"]:
        raise UsageError(f"--seq_len: {args.seq_len} is above the model's maximum {meta['get_max_seq_len']}")
    pixels = load_pixels(args.image_path, meta["image_size"])
    try:
        segments = (
            tok_mod.split_prompt(args.prompt) if args.raw else tok_mod.runner_prompt_segments(args.prompt)
        )
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from None

    inputs = [text_input(segments.before_image), image_input(pixels), text_input(segments.after_image)]
    t0 = time.perf_counter()
    # The native runner logs its tokenizer probing and metadata, and prints every
    # token itself: keep that off the terminal, stream through our callback instead.
    with native_output_captured() as native:
        try:
            runner = Runner(args.model_path, args.tokenizer_path)
            gen = runner.generate(
                inputs,
                max_new_tokens=-1,
                temperature=args.temperature,
                num_bos=1,
                seq_len=args.seq_len,
                on_piece=lambda s: print(s, end="", flush=True),
            )
        except RuntimeError as e:
            failure = e
        else:
            failure = None
    if failure is not None:
        log = [line for line in native[0].splitlines() if "rror" in line]
        raise UsageError(f"generation failed: {failure}; {log[-1] if log else ''}".rstrip("; "))
    wall = time.perf_counter() - t0
    print()
    s = gen.stats
    prefill_s = (s["prompt_eval_end_ms"] - s["inference_start_ms"]) / 1000
    decode_s = (s["inference_end_ms"] - s["prompt_eval_end_ms"]) / 1000
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"[prompt tokens {s['prompt_tokens']}, prefill {prefill_s:.3f} s; "
        f"{s['generated_tokens']} tokens in {decode_s:.3f} s "
        f"({s['generated_tokens'] / max(decode_s, 1e-9):.1f} tok/s); wall {wall:.2f} s; peak RSS {rss_mb:.0f} MB]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
