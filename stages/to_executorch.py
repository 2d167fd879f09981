"""Stage 5: memory planning and serialization to a .pte with the runner's constant methods."""

from __future__ import annotations

import sys

from llava_pipeline.base import files
from llava_pipeline.export import export
from llava_pipeline.pipeline import stage


def body(ctx: stage.StageContext) -> None:
    pdir = ctx.read("edge_programs", stage.upstream("partition", ctx.outputs))
    constants = files.read_json(pdir / "constant_methods.json")
    edge = export.load_edge(pdir, constants)
    export.write_executorch(edge, ctx.out / "model.pte")
    ctx.extra["constant_methods"] = constants
    ctx.extra["xnnpack_workspace_sharing"] = export.WORKSPACE_SHARING


# The config this stage reads, recorded in its manifest: dvc.yaml's params for it.
SECTIONS = ()


def main(argv: list[str] | None = None) -> int:
    return stage.run("to_executorch", body, sections=SECTIONS, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
