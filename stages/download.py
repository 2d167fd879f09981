"""Stage 1: put an HF-format LLaVA checkpoint in outputs/download/."""

from __future__ import annotations

import sys
from pathlib import Path

from llava_pipeline.base.config import source_kind
from llava_pipeline.model.processor_files import TINY_TOKENIZER_MODEL
from llava_pipeline.pipeline import download, stage


def body(ctx: stage.StageContext) -> None:
    m = ctx.cfg.model
    kind = source_kind(m.source)
    if kind == "builtin":
        ctx.read("tokenizer_model", TINY_TOKENIZER_MODEL)
        if m.source == "builtin:tiny":
            ctx.read("builtin_checkpoint", download.BUILTIN_TINY)
        download.write_builtin(ctx.out, m.source, m.seed, m.text_layers, m.vision_layers)
    elif kind == "local":
        download.copy_local(Path(m.source), ctx.out)
    else:
        download.download_hub(m.source, m.revision, ctx.out)
    download.check_checkpoint(ctx.out)
    ctx.extra["source_kind"] = kind


# The config this stage reads, recorded in its manifest: dvc.yaml's params for it.
SECTIONS = ("model",)


def main(argv: list[str] | None = None) -> int:
    return stage.run("download", body, sections=SECTIONS, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
