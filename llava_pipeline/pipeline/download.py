"""Getting an HF-format LLaVA checkpoint into a folder.

Three sources: a built-in model (`builtin:tiny`, `builtin:tiny-random`, `builtin:llava-7b-shape`), a Hugging Face
hub repo pinned to a revision, or a local HF-format directory. Only the hub
path touches the network, and it honours HF_HUB_OFFLINE and the local HF cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llava_pipeline.base.errors import PipelineError
from llava_pipeline.model.checkpoint_files import INDEX_FILE, read_json, safetensors_files
from llava_pipeline.model.processor_files import ASSETS, write_processor_files

# Files a LLaVA-1.5 checkpoint folder is made of (weights may be sharded).
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    INDEX_FILE,
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

# builtin:tiny: the committed checkpoint trained on the shapes task (its README.md is the model card).
BUILTIN_TINY = ASSETS / "models" / "tiny"


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
    try:
        safetensors_files(folder)
    except FileNotFoundError as e:
        raise PipelineError(f"{e} (safetensors weights required)") from None
    return cfg


def write_builtin(
    out: Path, source: str, seed: int, text_layers: int | None = None, vision_layers: int | None = None
) -> None:
    """A built-in LLaVA in HF format, like llava-hf/llava-1.5-7b-hf.

    builtin:tiny: the small checkpoint trained on the shapes task, committed in
    assets/models/tiny (scripts/train_builtin.py made it; `seed` and the depths do not apply).
    builtin:tiny-random: seeded random weights of tiny widths, fp32 (llava_pipeline.model.tiny), whose
    greedy answers run on without EOS: for tests of the runner's long-generation mechanics.
    builtin:llava-7b-shape: random weights with LLaVA-1.5-7B's widths, bf16 shards
    (llava_pipeline.model.synthetic); default depth 2 text + 3 vision layers (of which 2 run)."""
    if source == "builtin:tiny":
        copy_local(BUILTIN_TINY, out, link=False)
    elif source == "builtin:tiny-random":
        # torch and transformers load only for the sources that build weights (seconds).
        from transformers import CLIPVisionConfig, LlamaConfig

        from llava_pipeline.model.tiny import make_tiny_llava, tiny_llava_config

        config = tiny_llava_config()
        text_config, vision_config = config.text_config, config.vision_config
        assert isinstance(text_config, LlamaConfig) and isinstance(vision_config, CLIPVisionConfig)
        if text_layers is not None:
            text_config.num_hidden_layers = text_layers
        if vision_layers is not None:
            vision_config.num_hidden_layers = vision_layers
        model = make_tiny_llava(seed, config)
        model.save_pretrained(out)
        write_processor_files(out, model.config)
    elif source == "builtin:llava-7b-shape":
        import torch  # as above: only this source builds weights

        from llava_pipeline.model.synthetic import llava_7b_config, write_checkpoint

        write_checkpoint(out, llava_7b_config(text_layers or 2, vision_layers or 3), seed, torch.bfloat16)
    else:
        raise PipelineError(f"model.source: unknown built-in model {source!r}")


def _copy_matching(src: Path, out: Path, link: bool = True) -> None:
    for pattern in CHECKPOINT_PATTERNS:
        for p in sorted(src.glob(pattern)):
            # Hard links avoid a second copy of multi-GB weights where possible.
            try:
                if not link:
                    raise OSError
                os.link(p, out / p.name)
            except OSError:
                shutil.copyfile(p, out / p.name)


def copy_local(src: Path, out: Path, link: bool = True) -> None:
    """The checkpoint files of folder `src` into `out`: hard links where possible
    (`link=False`: copies, so DVC's cache never shares an inode with the source)."""
    if not src.is_dir():
        raise PipelineError(f"model.source: {src} is not a directory")
    check_checkpoint(src)
    _copy_matching(src, out, link)


def download_hub(repo_id: str, revision: str | None, out: Path) -> None:
    """snapshot_download of the checkpoint files at a pinned revision."""
    if not revision:
        raise PipelineError(f"model.revision: a hub source ({repo_id}) needs a pinned commit revision")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=list(CHECKPOINT_PATTERNS))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise PipelineError(
            f"model.source: {repo_id}@{revision} is not in the local HF cache and {why} ({e})"
        ) from None
    except Exception as e:  # hub errors: unknown repo, bad revision, auth
        raise PipelineError(f"model.source: could not download {repo_id}@{revision}: {e}") from None
    _copy_matching(Path(snapshot), out)
