"""Our `LlavaModel` from a checkpoint or an in-memory HF model, by the pipeline's own path:
source_transform's writer (`write_transformed`), then the quantize stage's loader
(`load_transformed`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llava_pipeline.export import model_io
from llava_pipeline.model.model import LlavaModel


def load_checkpoint(
    ckpt: Path,
    work: Path,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int = 768,
    transforms: tuple[str, ...] = model_io.SOURCE_TRANSFORMS,
) -> LlavaModel:
    """An HF checkpoint folder as the stages read it; source_transform's folder goes into
    `work`/transformed."""
    out = work / "transformed"
    out.mkdir()
    model_io.write_transformed(ckpt, max_seq_len, out, transforms=transforms)
    return model_io.load_transformed(out, dtype=dtype)


def plain_model(hf, max_seq_len: int) -> LlavaModel:
    """The untransformed model holding `hf`'s weights (fp32 stays fp32), through a checkpoint
    saved by `save_pretrained`."""
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "ckpt")
        return load_checkpoint(Path(tmp) / "ckpt", Path(tmp), max_seq_len=max_seq_len, transforms=())
