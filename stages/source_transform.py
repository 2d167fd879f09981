"""Stage 2: this project's LLaVA model from the checkpoint, with a static KV
cache sized by export.max_seq_len and ExecuTorch's custom SDPA / cache ops."""

from __future__ import annotations

import sys

from llava_pipeline.export import model_io
from llava_pipeline.pipeline import stage


def body(ctx: stage.StageContext) -> None:
    ckpt = ctx.read("checkpoint", stage.upstream("download", ctx.outputs))
    transforms = model_io.KV_CACHE_TRANSFORMS[ctx.cfg.export.kv_cache]
    model_io.write_transformed(ckpt, ctx.cfg.export.max_seq_len, ctx.out, transforms=transforms)
    ctx.extra["source_transforms"] = list(transforms)


# The config this stage reads, recorded in its manifest: dvc.yaml's params for it.
SECTIONS = ("export",)


def main(argv: list[str] | None = None) -> int:
    return stage.run("source_transform", body, sections=SECTIONS, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
