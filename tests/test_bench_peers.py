"""The pure-Python side of the llama.cpp peer benchmark (no llama.cpp build needed).

LLaVA -> LlamaForCausalLM extraction on a tiny random model, in both key layouts
(transformers v4 names as save_pretrained writes them, v5 state-dict names in shards),
and the one-line errors for bad input.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.peers import PeersError, text_model, timing
from llava_pipeline.model.tiny import tiny_llava_config

ROOT = Path(__file__).resolve().parent.parent
SP_MODEL = ROOT / "assets" / "tokenizer" / "llama2.model"


def _tiny_llava(dtype=torch.float32):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config()).to(dtype).eval()
    return model


def _text_reference(model) -> dict[str, torch.Tensor]:
    lm = model.model.language_model
    ref = {f"model.{k}": v for k, v in lm.state_dict().items()}
    ref["lm_head.weight"] = model.lm_head.weight
    return ref


def _add_tokenizer(ckpt: Path) -> None:
    if SP_MODEL.is_file():
        shutil.copyfile(SP_MODEL, ckpt / "tokenizer.model")
    else:  # only the bytes are copied: any file will do for the extraction
        (ckpt / "tokenizer.model").write_bytes(b"sentencepiece stand-in")


def _check_extracted(out: Path, ref: dict[str, torch.Tensor], dtype) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (32064, 64, 2)
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == dtype, k
        assert torch.equal(got[k], v.detach()), k
    assert (out / "tokenizer.model").read_bytes() == (
        SP_MODEL.read_bytes() if SP_MODEL.is_file() else b"sentencepiece stand-in"
    )
    llama = LlamaForCausalLM.from_pretrained(str(out), dtype=dtype)
    ids = torch.tensor([[1, 5, 900, 31999]])
    with torch.no_grad():
        logits = llama(ids).logits
    assert logits.shape == (1, 4, 32064)


def test_text_key_both_layouts():
    assert (
        text_model.text_key("language_model.model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    )
    assert (
        text_model.text_key("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    )
    assert text_model.text_key("language_model.model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert text_model.text_key("model.language_model.norm.weight") == "model.norm.weight"
    assert text_model.text_key("language_model.lm_head.weight") == "lm_head.weight"
    assert text_model.text_key("lm_head.weight") == "lm_head.weight"
    for name in (
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.post_layernorm.bias",
        "multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias",
    ):
        assert text_model.text_key(name) is None


def test_extract_save_pretrained_checkpoint(tmp_path):
    """transformers' own save_pretrained folder (v4 key names on disk), fp32."""
    model = _tiny_llava(torch.float32)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    _add_tokenizer(ckpt)
    cfg = text_model.write_text_model(ckpt, tmp_path / "text")
    assert cfg["num_hidden_layers"] == 2
    _check_extracted(tmp_path / "text", _text_reference(model), torch.float32)


def test_extract_sharded_v5_names_bf16(tmp_path):
    """State-dict (v5) names, bf16, split over two shards with an index, vision first."""
    from safetensors.torch import save_file

    model = _tiny_llava(torch.bfloat16)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tiny_llava_config().save_pretrained(ckpt)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(ckpt / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _add_tokenizer(ckpt)
    text_model.write_text_model(ckpt, tmp_path / "text")
    _check_extracted(tmp_path / "text", _text_reference(model), torch.bfloat16)


def test_missing_text_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_llava()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    _add_tokenizer(ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd[next(k for k in sd if k.endswith("layers.1.mlp.down_proj.weight"))]
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(PeersError, match="layers.1.mlp.down_proj"):
        text_model.write_text_model(ckpt, tmp_path / "text")


def test_prompt_ids_are_fixed():
    a = timing.prompt_ids(600, seed=0)
    assert a == timing.prompt_ids(600, seed=0) and len(a) == 600 and a[0] == 1
    assert all(3 <= t < 32000 for t in a[1:])
    assert a != timing.prompt_ids(600, seed=1)


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "bench.peers", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_cli_missing_checkpoint(tmp_path):
    proc = _cli("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "p.json"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert not (tmp_path / "p.json").exists()


def test_cli_not_llava(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    proc = _cli("--checkpoint", str(ckpt), "--out", str(tmp_path / "p.json"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(ckpt / "config.json") in lines[0] and "llava" in lines[0]


def test_cli_no_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tiny_llava_config().save_pretrained(ckpt)
    proc = _cli("--checkpoint", str(ckpt), "--out", str(tmp_path / "p.json"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "model.safetensors" in proc.stderr
