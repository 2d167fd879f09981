"""Stage 6: the user-facing artifacts at fixed paths.

outputs/llava.pte      the program (from to_executorch)
outputs/tokenizer.bin  llama2c tokenizer covering the model's whole vocabulary
outputs/image.pt       uint8 CHW sample image at the model's input size
outputs/emit/manifest.json
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from llava_pipeline.base import errors
from llava_pipeline.formats import image, tokenizer
from llava_pipeline.model import checkpoint_files
from llava_pipeline.pipeline import stage
from llava_pipeline.verify import verify

ARTIFACTS = ("llava.pte", "tokenizer.bin", "image.pt")


def body(ctx: stage.StageContext) -> None:
    pte = ctx.read("program", stage.upstream("to_executorch", ctx.outputs) / "model.pte")
    ckpt = ctx.read("checkpoint", stage.upstream("download", ctx.outputs))
    picture = ctx.read("image", Path(ctx.cfg.emit.image))

    try:  # a hard link: no second copy of a multi-GB program
        os.link(pte, ctx.out / "llava.pte")
    except OSError:
        shutil.copyfile(pte, ctx.out / "llava.pte")
    vocab = checkpoint_files.tokenizer_spec(ckpt)
    tokenizer.write_tokenizer_bin(
        ckpt / "tokenizer.model", ctx.out / "tokenizer.bin", vocab.vocab_size, vocab.added_tokens
    )
    pixels = image.preprocess_with_config(image.load_image(picture), checkpoint_files.preprocessor_config(ckpt))
    image.save_image_pt(pixels, ctx.out / "image.pt")
    ctx.extra["image_shape"] = list(pixels.shape)
    ctx.extra["vocab_size"] = vocab.vocab_size


def publish(ctx: stage.StageContext, folder: Path) -> None:
    # A program that fails verification against the eager model it was lowered
    # from never becomes outputs/llava.pte.
    report = verify(folder / "llava.pte", None, ctx.outputs, steps=ctx.cfg.emit.verify_steps, compare_fp32=False)
    if not report.ok:
        shutil.rmtree(folder)
        rows = ", ".join(f"{r.method} {r.metric} = {r.value} (threshold {r.threshold})" for r in report.failed)
        raise errors.PipelineError(f"llava.pte failed verification ({rows}); see python -m llava_pipeline.verify")
    # Each artifact is complete in outputs/emit/ before it is renamed into place.
    for name in ARTIFACTS:
        os.replace(folder / name, ctx.outputs / name)
    ctx.wrote = [ctx.outputs / name for name in ARTIFACTS]


# The config this stage reads, recorded in its manifest: dvc.yaml's params for it.
SECTIONS = ("emit",)


def main(argv: list[str] | None = None) -> int:
    return stage.run("emit", body, sections=SECTIONS, argv=argv, publish=publish)


if __name__ == "__main__":
    sys.exit(main())
