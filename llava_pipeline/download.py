"""Getting an HF-format LLaVA checkpoint into a folder.

Three sources: the built-in tiny random model (`builtin:tiny`), a Hugging Face
hub repo pinned to a revision, or a local HF-format directory. Only the hub
path touches the network, and it honours HF_HUB_OFFLINE and the local HF cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint_files import read_json
from .stage import PipelineError

# Files a LLaVA-1.5 checkpoint folder is made of (weights may be sharded).
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
REQUIRED = ("config.json", "tokenizer.model", "preprocessor_config.json")

TINY_TOKENIZER_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "llama2.model"


def check_checkpoint(folder: Path) -> dict:
    """Validate an HF-format LLaVA folder; returns its config.json as a dict."""
    for name in REQUIRED:
        if not (folder / name).is_file():
            raise PipelineError(f"{folder / name}: missing from the checkpoint")
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    if cfg.get("model_type") != "llava":
        raise PipelineError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'llava' "
            "(a LlavaForConditionalGeneration checkpoint such as llava-hf/llava-1.5-7b-hf)"
        )
    if not (folder / "model.safetensors").is_file() and not (
        folder / "model.safetensors.index.json"
    ).is_file():
        raise PipelineError(
            f"{folder}: no model.safetensors or model.safetensors.index.json (safetensors weights required)"
        )
    return cfg


def write_builtin_tiny(out: Path, seed: int) -> None:
    """The built-in tiny random LLaVA, in HF format like llava-hf/llava-1.5-7b-hf:
    weights and config, the real Llama-2 vocabulary plus <image>/<pad>, and the
    LLaVA-1.5 image processor settings (336 px shortest edge, bicubic, center crop)."""
    from transformers import CLIPImageProcessor, LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from .tiny import make_tiny_llava
    from .tokenizer import LLAVA_ADDED_TOKENS, make_hf_tokenizer, write_hf_tokenizer

    model = make_tiny_llava(seed)
    model.save_pretrained(out)
    size = model.config.vision_config.image_size
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
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json, as llava-hf ships it
    # Last: the processor's save rewrites tokenizer_config.json without `legacy`.
    write_hf_tokenizer(TINY_TOKENIZER_MODEL, out, LLAVA_ADDED_TOKENS)


def _copy_matching(src: Path, out: Path) -> None:
    for pattern in CHECKPOINT_PATTERNS:
        for p in sorted(src.glob(pattern)):
            # Hard links avoid a second copy of multi-GB weights where possible.
            try:
                os.link(p, out / p.name)
            except OSError:
                shutil.copy2(p, out / p.name)


def copy_local(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise PipelineError(f"model.source: {src} is not a directory")
    check_checkpoint(src)
    _copy_matching(src, out)


def download_hub(repo_id: str, revision: str | None, out: Path) -> None:
    """snapshot_download of the checkpoint files at a pinned revision."""
    if not revision:
        raise PipelineError(
            f"model.revision: a hub source ({repo_id}) needs a pinned commit revision"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(CHECKPOINT_PATTERNS)
        )
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise PipelineError(
            f"model.source: {repo_id}@{revision} is not in the local HF cache and {why} ({e})"
        ) from None
    except Exception as e:  # hub errors: unknown repo, bad revision, auth
        raise PipelineError(f"model.source: could not download {repo_id}@{revision}: {e}") from None
    _copy_matching(Path(snapshot), out)
