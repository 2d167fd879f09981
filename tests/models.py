"""Our `LlavaModel` from an in-memory HF model, by the pipeline's own path: saved as a checkpoint,
named by source_transform's writer (`write_transformed`), read back by `load_transformed`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llava_pipeline.export import model_io
from llava_pipeline.model.model import LlavaModel


def plain_model(hf, max_seq_len: int, image_mean=None, image_std=None) -> LlavaModel:
    """The untransformed model holding `hf`'s weights (fp32 stays fp32); `image_mean`/`image_std`
    go into the checkpoint's preprocessor_config.json, as a hub checkpoint carries them."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "transformed"
        hf.save_pretrained(ckpt)
        pre = {k: v for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
        if pre:
            (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
        out.mkdir()
        model_io.write_transformed(ckpt, max_seq_len, out, transforms=())
        return model_io.load_transformed(out)
