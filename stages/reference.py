"""Stage: the transformers reference answers of the eval set (llava_pipeline.pipeline.reference).

outputs/reference/reference.json  per question: greedy answer ids and text, log-probs
outputs/reference/pixels.pt       the eval images as the uint8 pixels the .pte gets

Depends on download only, so a quantization sweep never recomputes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llava_pipeline.base import files
from llava_pipeline.formats import image
from llava_pipeline.model import checkpoint_files
from llava_pipeline.pipeline import evalset, reference, stage

# The config this stage reads, recorded in its manifest: dvc.yaml's params for it. Not the
# floors (evaluate.min_*), which only the evaluate stage applies.
SECTIONS = (
    "evaluate.set",
    "evaluate.scenes",
    "evaluate.seed",
    "evaluate.max_new_tokens",
    "evaluate.reference_dtype",
    "evaluate.top_k",
)


def body(ctx: stage.StageContext) -> None:
    e = ctx.cfg.evaluate
    ckpt = ctx.read("checkpoint", stage.upstream("download", ctx.outputs))
    if e.set == "photos":
        for name in evalset.PHOTOS:
            ctx.read(f"photo {name}", evalset.PHOTO_DIR / name)
    elif e.set != "shapes":
        ctx.read("eval_set", Path(e.set))
    items, images = evalset.load(e.set, e.scenes, e.seed)
    pre = checkpoint_files.preprocessor_config(ckpt)
    pixels = {name: image.preprocess_with_config(picture, pre) for name, picture in images.items()}
    records = reference.compute(
        ckpt,
        items,
        pixels,
        e.reference_dtype,
        e.max_new_tokens,
        e.top_k,
        progress=lambda xs: ctx.progress(xs, "reference answers"),
    )
    torch.save(pixels, ctx.out / "pixels.pt")
    files.write_json(ctx.out / "reference.json", {"dtype": e.reference_dtype, "records": records})
    ctx.extra["questions"] = len(records)


def main(argv: list[str] | None = None) -> int:
    return stage.run("reference", body, sections=SECTIONS, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
