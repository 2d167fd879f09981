"""Random-weight LLaVA-1.5 checkpoints of any size, written tensor by tensor.

`builtin:llava-7b-shape` (LLaVA-1.5-7B's widths, few layers) and the full-size
stand-in for the real 7B export (`python -m llava_pipeline.model.synthetic --out DIR`)
are produced here in HF format (config.json, sharded safetensors with an index,
tokenizer, image processor), so that the pipeline reads them exactly as it reads
llava-hf/llava-1.5-7b-hf. Nothing is ever materialized as a whole model: each
tensor is drawn from its own generator (seeded by the model seed and the tensor's
name, so the bytes do not depend on shard size or order), cast to the storage
dtype and written; peak memory is one shard. The init rules are the tiny model's
(llava_pipeline.model.tiny): unit-gain linears, so activations keep their scale at any
width and depth.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

from llava_pipeline.model.checkpoint_files import SHARD_BYTES, ShardWriter
from llava_pipeline.model.processor_files import write_processor_files
from llava_pipeline.model.tiny import init_, shape_lm_head, tiny_llava_config

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf config.json).
FULL_TEXT_LAYERS = 32
FULL_VISION_LAYERS = 24
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llava_7b_config(text_layers: int = FULL_TEXT_LAYERS, vision_layers: int = FULL_VISION_LAYERS):
    """LLaVA-1.5-7B's architecture with the given depths (the real one by default)."""
    from transformers import LlavaConfig

    cfg = tiny_llava_config().to_dict()
    cfg["vision_config"].update(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        projection_dim=768,
    )
    cfg["text_config"].update(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=text_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=cfg["vision_config"],
        text_config=cfg["text_config"],
        **{
            k: cfg[k]
            for k in (
                "image_token_index",
                "pad_token_id",
                "projector_hidden_act",
                "vision_feature_layer",
                "vision_feature_select_strategy",
                "image_seq_length",
                "tie_word_embeddings",
            )
        },
    )


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def parameter_shapes(config) -> dict[str, torch.Size]:
    """HF state-dict names and shapes of LlavaForConditionalGeneration(config), no storage."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = LlavaForConditionalGeneration(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def random_tensor(name: str, shape, seed: int, shapes: dict) -> torch.Tensor:
    """One parameter, fp32, the same bytes whatever else is generated."""
    t = torch.empty(shape, dtype=torch.float32)
    init_(name, t, _generator(seed, name))
    if name.endswith("lm_head.weight"):
        embed_name = next(k for k in shapes if k.endswith("embed_tokens.weight"))
        shape_lm_head(t, random_tensor(embed_name, shapes[embed_name], seed, shapes))
    return t


def write_weights(out: Path, config, seed: int, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES) -> None:
    """Sharded safetensors + model.safetensors.index.json, one shard in memory at a time."""
    shapes = parameter_shapes(config)
    writer = ShardWriter(out, shard_bytes)
    for name in sorted(shapes):
        writer.add(name, random_tensor(name, shapes[name], seed, shapes).to(dtype))
    writer.close()


def write_checkpoint(
    out: Path, config, seed: int, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES
) -> None:
    """A complete HF-format LLaVA-1.5 folder: weights, config, tokenizer, image processor."""
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = {v: k for k, v in DTYPES.items()}[dtype]
    config.save_pretrained(out)
    write_weights(out, config, seed, dtype, shard_bytes)
    write_processor_files(out, config)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
    ap.add_argument("--text-layers", type=int, default=FULL_TEXT_LAYERS)
    ap.add_argument("--vision-layers", type=int, default=FULL_VISION_LAYERS)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out}: already exists", file=sys.stderr)
        return 2
    if args.text_layers < 1 or args.vision_layers < 2:
        print("error: --text-layers must be >= 1 and --vision-layers >= 2", file=sys.stderr)
        return 2
    partial = args.out.with_name(args.out.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    write_checkpoint(partial, llava_7b_config(args.text_layers, args.vision_layers), args.seed, DTYPES[args.dtype])
    partial.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
