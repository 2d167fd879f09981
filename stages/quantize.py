"""Stage 3: 8da4w decoder linears and 8-bit token embedding (quant.*)."""

from __future__ import annotations

import gc
import sys

from llava_pipeline.export import model_io, quantize
from llava_pipeline.pipeline import stage


def body(ctx: stage.StageContext) -> None:
    src = ctx.read("model", stage.upstream("source_transform", ctx.outputs))
    # source_transform's weights.json names the checkpoint's own files: they are read here.
    ctx.read("checkpoint", stage.upstream("download", ctx.outputs))
    args = model_io.load_args(src)
    # Cheap check before loading any weights: the group size must divide every decoder linear.
    quantize.check_group_size(model_io.decoder_in_features(args), ctx.cfg.quant)

    # Unit by unit (one decoder layer at a time): no fp32 copy of the whole model.
    def on_unit(unit, m):
        ctx.status(f"quantizing {unit}")
        quantize.quantize_unit(unit, m, ctx.cfg.quant)

    model = model_io.load_transformed(src, on_unit=on_unit)
    ctx.status("")
    state = model.state_dict()
    del model  # the state dict alone holds the weights: save_quantized frees each one it packs
    gc.collect()  # the quantized modules sit in reference cycles: free them now, not later
    model_io.save_quantized(state, ctx.out)
    model_io.write_args(args, ctx.out, model_io.load_transforms(src))


# The config this stage reads, recorded in its manifest: dvc.yaml's params for it.
SECTIONS = ("quant",)


def main(argv: list[str] | None = None) -> int:
    return stage.run("quantize", body, sections=SECTIONS, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
