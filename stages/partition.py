"""Stage 4: export the three methods and lower each to XNNPACK with its own partitioners."""

from __future__ import annotations

import dataclasses
import sys

from llava_pipeline.base import files
from llava_pipeline.export import export, model_io
from llava_pipeline.pipeline import stage


def body(ctx: stage.StageContext) -> None:
    qdir = ctx.read("quantized_model", stage.upstream("quantize", ctx.outputs))
    model, args, quant = model_io.load_quantized(qdir)
    programs = export.export_methods(model, args)
    del model
    constants = model_io.constant_methods(args)
    dynamic_quant = export.dynamic_quant_methods(quant)
    edge = export.lower(programs, dynamic_quant=dynamic_quant, constants=constants)
    summary = export.delegation_summary(edge)
    export.check_delegation(summary, dynamic_quant=dynamic_quant)
    export.save_edge(edge, ctx.out)
    files.write_json(ctx.out / "constant_methods.json", constants)
    ctx.extra["quant"] = dataclasses.asdict(quant)
    ctx.extra["delegation"] = summary


# The config this stage reads, recorded in its manifest: dvc.yaml's params for it.
SECTIONS = ()


def main(argv: list[str] | None = None) -> int:
    return stage.run("partition", body, sections=SECTIONS, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
