"""The tokenizer and image-processor files of an HF-format LLaVA-1.5 folder, for the
checkpoints this project makes itself (download's built-in random model, synthetic's
checkpoints, scripts/train_builtin.py): the real Llama-2 vocabulary from assets/."""

from __future__ import annotations

from pathlib import Path

from llava_pipeline.base.files import ASSETS
from llava_pipeline.formats.tokenizer import LLAVA_ADDED_TOKENS, make_hf_tokenizer, write_hf_tokenizer

TINY_TOKENIZER_MODEL = ASSETS / "tokenizer" / "llama2.model"


def write_processor_files(out: Path, config) -> None:
    """Tokenizer and image processor files of an HF LLaVA-1.5 folder: the real Llama-2
    vocabulary plus <image>/<pad>, and the LLaVA-1.5 image processor settings (336 px
    shortest edge, bicubic, center crop)."""
    from transformers import CLIPImageProcessor, LlavaProcessor  # heavy: loaded when a folder is written
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_hf_tokenizer(TINY_TOKENIZER_MODEL, LLAVA_ADDED_TOKENS),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json, as llava-hf ships it
    # Last: the processor's save rewrites tokenizer_config.json without `legacy`.
    write_hf_tokenizer(TINY_TOKENIZER_MODEL, out, LLAVA_ADDED_TOKENS)
