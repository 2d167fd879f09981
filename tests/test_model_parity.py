"""Our LLaVA modules (plain and with the ExecuTorch custom-op transforms) against the HF modules
they replace, on the tiny random-weight preset; plus config parsing and checkpoint loading."""

import copy
import json
import shutil

import pytest
import torch
from transformers import CLIPImageProcessorPil
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llava_pipeline.base.errors import PipelineError
from llava_pipeline.model.convert import renamed
from llava_pipeline.model.model import apply_rotary
from llava_pipeline.model.model_args import ModelArgs, model_args_from_hf_config
from llava_pipeline.model.source_transforms import apply_source_transforms, check_custom_ops
from llava_pipeline.model.tiny import make_tiny_llava, tiny_llava_config

from .models import load_checkpoint, plain_model

MAX_SEQ_LEN = 768
# Logits have std ~9 in the tiny model, so fp32 reordering shows up as ~1e-5 absolute.
LOGITS_ATOL = 5e-5
TRANSFORM_SETS = [[], ["custom_kv_cache"], ["custom_sdpa"], ["custom_kv_cache", "custom_sdpa"]]


@pytest.fixture(scope="module")
def hf():
    return make_tiny_llava(0)


@pytest.fixture(scope="module")
def plain(hf):
    return plain_model(hf, MAX_SEQ_LEN)


def ours(plain, transforms):
    return apply_source_transforms(copy.deepcopy(plain), transforms)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def image():
    return torch.randint(0, 256, (1, 3, 336, 336), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def hf_pixels(image):
    # transformers' own CLIP preprocessing of the same pixels (no resize/crop: already 336x336)
    proc = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
    return proc(images=image[0], return_tensors="pt")["pixel_values"]


def ids(n, seed):
    return torch.randint(300, 32000, (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- modules


@torch.no_grad()
def test_vision_encoder_matches_hf(hf, plain, image):
    ref = hf.model.get_image_features(pixel_values=hf_pixels(image)).pooler_output[0]
    out = plain.vision_encoder(image)
    assert out.shape == (1, 576, 64)
    close(out[0], ref)


@torch.no_grad()
def test_vision_encoder_rejects_float_input(plain, image):
    with pytest.raises(ValueError, match="uint8"):
        plain.vision_encoder(image.float())


@torch.no_grad()
def test_projector_matches_hf(hf, plain):
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(0))
    close(plain.vision_encoder.projector(x), hf.model.multi_modal_projector(x))


@torch.no_grad()
def test_rmsnorm_matches_hf(hf, plain):
    x = 3 * torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    close(plain.text_decoder.norm(x), hf.model.language_model.norm(x))
    close(plain.text_decoder.layers[1].ffn_norm(x), hf.model.language_model.layers[1].post_attention_layernorm(x))


@torch.no_grad()
def test_rotary_matches_hf(hf, plain):
    pos = torch.tensor([0, 1, 7, 300, MAX_SEQ_LEN - 1])
    x = torch.randn(1, 5, 4, 16, generator=torch.Generator().manual_seed(0))  # [B, S, H, D]
    cos_ref, sin_ref = hf.model.language_model.rotary_emb(x, pos[None])
    cos, sin = plain.text_decoder.rope(pos)
    close(cos, cos_ref[0], atol=1e-6)
    close(sin, sin_ref[0], atol=1e-6)
    q_ref, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos_ref, sin_ref)
    close(apply_rotary(x, cos, sin), q_ref.transpose(1, 2), atol=1e-6)


def chunked(fn, x, starts):
    """Run fn(chunk, input_pos) over x [1, T, D] split at `starts`; concat outputs on dim 1."""
    bounds = list(starts) + [x.shape[1]]
    return torch.cat([fn(x[:, a:b], torch.tensor([a])) for a, b in zip(bounds, bounds[1:])], dim=1)


@pytest.mark.parametrize("transforms", TRANSFORM_SETS, ids=lambda t: "+".join(t) or "plain")
@torch.no_grad()
def test_attention_matches_hf(hf, plain, transforms):
    model = ours(plain, transforms)
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1))
    lm = hf.model.language_model
    ref, _ = lm.layers[0].self_attn(
        x, position_embeddings=lm.rotary_emb(x, torch.arange(40)[None]), attention_mask=None
    )
    layer = model.text_decoder.layers[0]

    def step(chunk, input_pos):
        cos, sin = model.text_decoder.rope(input_pos + torch.arange(chunk.shape[1]))
        return layer.attention(chunk, input_pos, cos, sin)

    # prefill chunks at 0, 9, 30, then single-token decode steps
    close(chunked(step, x, [0, 9, 30, *range(31, 40)]), ref)


@torch.no_grad()
def test_decoder_layer_matches_hf(hf, plain):
    model = ours(plain, ["custom_kv_cache", "custom_sdpa"])
    x = torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(2))
    lm = hf.model.language_model
    ref = lm.layers[1](x, position_embeddings=lm.rotary_emb(x, torch.arange(24)[None]), attention_mask=None)
    layer = model.text_decoder.layers[1]

    def step(chunk, input_pos):
        cos, sin = model.text_decoder.rope(input_pos + torch.arange(chunk.shape[1]))
        return layer(chunk, input_pos, cos, sin)

    close(chunked(step, x, [0, 5, 20, 21, 22, 23]), ref)


def prefill_embeds(hf, image, n_before=6, n_after=5):
    """text (bos + n_before-1 ids) | 576 image features | text: HF embeddings, and chunk starts."""
    emb = hf.get_input_embeddings()
    before = emb(torch.cat([torch.tensor([[1]]), ids(n_before - 1, 10)], dim=1))
    img = hf.model.get_image_features(pixel_values=hf_pixels(image)).pooler_output[0][None]
    after = emb(ids(n_after, 11))
    return torch.cat([before, img, after], dim=1), [0, n_before, n_before + img.shape[1]]


@pytest.mark.parametrize("transforms", TRANSFORM_SETS, ids=lambda t: "+".join(t) or "plain")
@torch.no_grad()
def test_decoder_logits_match_hf_chunked_prefill_and_decode(hf, plain, image, transforms):
    model = ours(plain, transforms)
    prefill, starts = prefill_embeds(hf, image)
    decode = hf.get_input_embeddings()(ids(10, 12))
    x = torch.cat([prefill, decode], dim=1)
    ref = hf(inputs_embeds=x).logits[0]  # [T, V], one full causal pass
    bounds = starts + list(range(prefill.shape[1], x.shape[1] + 1))
    for a, b in zip(bounds, bounds[1:]):
        logits = model.text_decoder(x[:, a:b], torch.tensor([a]))
        assert logits.shape == (1, 32064) and logits.dtype == torch.float32
        close(logits[0], ref[b - 1], atol=LOGITS_ATOL)


def greedy(model, image, prompt_before, prompt_after, steps):
    """The runner's loop: text chunk, image chunk, text chunk, then one token at a time."""
    pos, tokens = 0, []
    for embeds in (
        model.token_embedding(prompt_before),
        model.vision_encoder(image),
        model.token_embedding(prompt_after),
    ):
        logits = model.text_decoder(embeds, torch.tensor([pos]))
        pos += embeds.shape[1]
    for _ in range(steps):
        tokens.append(int(logits.argmax(-1)))
        logits = model.text_decoder(model.token_embedding(torch.tensor([[tokens[-1]]])), torch.tensor([pos]))
        pos += 1
    return tokens


@pytest.mark.parametrize("transforms", [[], ["custom_kv_cache", "custom_sdpa"]], ids=["plain", "custom"])
@torch.no_grad()
def test_greedy_matches_hf_generate(hf, plain, image, transforms):
    model = ours(plain, transforms)
    before = torch.cat([torch.tensor([[1]]), ids(5, 20)], dim=1)
    after = ids(4, 21)
    input_ids = torch.cat([before, torch.full((1, 576), 32000), after], dim=1)
    ref = hf.generate(
        input_ids=input_ids, pixel_values=hf_pixels(image), max_new_tokens=40, do_sample=False, pad_token_id=32001
    )[0, input_ids.shape[1] :].tolist()
    assert len(set(ref)) >= 10, "tiny model degenerate: token comparison would prove little"
    assert greedy(model, image, before, after, 40) == ref


@pytest.mark.parametrize("n_kv_heads", [1, 4])
@torch.no_grad()
def test_kv_head_variants_match_hf(image, n_kv_heads):
    cfg = tiny_llava_config()
    cfg.text_config.num_key_value_heads = n_kv_heads  # 1: multi-query, 4: plain multi-head
    hf = make_tiny_llava(1, config=cfg)
    assert hf.model.language_model.layers[0].self_attn.k_proj.out_features == 16 * n_kv_heads
    base = plain_model(hf, MAX_SEQ_LEN)
    prefill, starts = prefill_embeds(hf, image)
    ref = hf(inputs_embeds=prefill).logits[0]
    for transforms in ([], ["custom_kv_cache", "custom_sdpa"]):
        model = ours(base, transforms)
        bounds = starts + [prefill.shape[1]]
        for a, b in zip(bounds, bounds[1:]):
            close(model.text_decoder(prefill[:, a:b], torch.tensor([a]))[0], ref[b - 1], atol=LOGITS_ATOL)


def test_default_tiny_is_gqa(plain):
    attn = plain.text_decoder.layers[0].attention
    assert (attn.n_heads, attn.n_kv_heads) == (4, 2)


# ----------------------------------------------------------------------------- source transforms


def test_check_custom_ops(plain):
    with pytest.raises(RuntimeError, match="custom_kv_cache"):
        check_custom_ops(plain)
    half = ours(plain, ["custom_sdpa"])
    check_custom_ops(half, ["custom_sdpa"])
    with pytest.raises(RuntimeError, match="KVCache"):
        check_custom_ops(half)
    check_custom_ops(ours(plain, ["custom_kv_cache", "custom_sdpa"]))
    with pytest.raises(ValueError, match="unknown source transform"):
        apply_source_transforms(plain, ["custom_sdpaa"])


def test_transform_keeps_cache_contents(plain):
    model = copy.deepcopy(plain)
    model.text_decoder(torch.randn(1, 3, 64), torch.tensor([0]))
    cache = model.text_decoder.layers[0].attention.kv_cache.k_cache
    apply_source_transforms(model, ["custom_kv_cache"])
    assert model.text_decoder.layers[0].attention.kv_cache.k_cache is cache
    assert cache[0, :3].abs().sum() > 0


# ----------------------------------------------------------------------------- config


def llava_7b_config():
    """llava-hf/llava-1.5-7b-hf's config.json: text_config leans on LlamaConfig defaults."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }


def test_7b_config_defaults_resolved():
    a = model_args_from_hf_config(llava_7b_config(), 768)
    t, v = a.text, a.vision
    text_shape = (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim)
    assert text_shape == (4096, 11008, 32, 32, 32, 128)
    text_rest = (t.vocab_size, t.rope_theta, t.rms_norm_eps, t.bos_token_id, t.eos_token_ids)
    assert text_rest == (32064, 10000.0, 1e-5, 1, (2,))
    assert (v.hidden_size, v.num_layers, v.num_layers_used, v.num_heads, v.layer_norm_eps) == (1024, 24, 23, 16, 1e-5)
    assert v.num_image_tokens == 576 and a.image_token_index == 32000 and a.projector_bias


def test_model_args_json_round_trip():
    a = model_args_from_hf_config(llava_7b_config(), 768, image_mean=[0.5, 0.5, 0.5])
    assert ModelArgs.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert a.vision.image_mean == (0.5, 0.5, 0.5)


def _edit(path, value):
    cfg = llava_7b_config()
    *parents, last = path.split(".")
    d = cfg
    for p in parents:
        d = d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return cfg


@pytest.mark.parametrize(
    "path,value,match",
    [
        ("model_type", "llava_next", "model_type"),
        ("text_config.model_type", "mistral", "text_config.model_type"),
        ("vision_feature_layer", [-2, -5], "vision_feature_layer"),
        ("vision_feature_layer", 30, "vision_feature_layer"),
        ("vision_feature_select_strategy", "cls", "vision_feature_select_strategy"),
        ("text_config", KeyError, "text_config"),
        ("vision_config", KeyError, "vision_config"),
        ("text_config.rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
        ("text_config.rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type"),
        ("text_config.hidden_act", "gelu", "text_config.hidden_act"),
        ("text_config.attention_bias", True, "attention_bias"),
        ("projector_hidden_act", "relu", "projector_hidden_act"),
        ("text_config.max_position_embeddings", 512, "max_position_embeddings"),
        # values transformers lets through that this model cannot read as one number
        ("vision_config.image_size", [336, 336], "vision_config.image_size"),
        ("vision_config.patch_size", [14, 14], "vision_config.patch_size"),
        ("text_config.rope_theta", None, "text_config.rope_theta"),
        ("text_config.rope_parameters", {"rope_type": "default", "rope_theta": None}, "rope_theta"),
        ("text_config.bos_token_id", None, "text_config.bos_token_id"),
        ("image_token_id", None, "image_token_index"),
    ],
)
def test_unsupported_config_raises_naming_key(path, value, match):
    with pytest.raises(ValueError, match=match):
        model_args_from_hf_config(_edit(path, value), 768)


# ----------------------------------------------------------------------------- checkpoints

# transformers 5 module names -> the hub (transformers 4) spelling of llava-1.5-7b-hf.
HUB_STYLE = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def hub_style(state_dict):
    out = {}
    for k, v in state_dict.items():
        new = next(k.replace(a, b, 1) for a, b in HUB_STYLE if k.startswith(a))
        out[new] = v
    return out


@pytest.fixture(scope="module")
def args(plain):
    return plain.args


@pytest.fixture(scope="module")
def rename(plain):
    """convert.renamed, the source_transform stage's renamer, over a whole state dict."""
    shapes = {k: p.shape for k, p in plain.named_parameters()}
    return lambda state, args: dict(renamed(args, state.items(), shapes))


def test_key_mapping_both_styles(hf, args, plain, rename):
    sd5 = hf.state_dict()
    assert any(k.startswith("model.language_model.") for k in sd5)
    new = rename(sd5, args)
    hub = hub_style(sd5)
    hub["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    hub["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    old = rename(hub, args)
    # early transformers 5 kept CLIPVisionModel's inner vision_model level
    mid = {k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1): v for k, v in sd5.items()}
    mid = rename(mid, args)
    assert new.keys() == old.keys() == mid.keys() == dict(plain.named_parameters()).keys()
    assert all(new[k] is old[k] and new[k] is mid[k] for k in new)
    # dropped on purpose: the last vision layer (feature layer -2) and post_layernorm
    assert "model.vision_tower.encoder.layers.2.mlp.fc1.weight" in sd5
    assert not any(k.startswith("vision_encoder.layers.2.") for k in new)
    assert (
        new["text_decoder.layers.1.attention.wk.weight"] is sd5["model.language_model.layers.1.self_attn.k_proj.weight"]
    )
    assert new["text_decoder.output.weight"] is sd5["lm_head.weight"]


def test_missing_and_unknown_keys(hf, args, rename):
    sd = hub_style(hf.state_dict())
    del sd["language_model.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        rename(sd, args)
    sd = dict(hf.state_dict())
    sd["model.language_model.layers.2.mlp.up_proj.weight"] = torch.zeros(1)  # a layer we don't have
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj"):
        rename(sd, args)


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    hf.save_pretrained(d)
    return d


def _same_weights(loaded, hf):
    """`loaded` holds exactly the in-memory HF model's weights, under our names."""
    got = dict(loaded.named_parameters())
    ref = dict(renamed(loaded.args, hf.state_dict().items(), {k: p.shape for k, p in got.items()}))
    assert got.keys() == ref.keys()
    for k, p in got.items():
        assert torch.equal(p, ref[k]), k


def test_load_checkpoint_matches_in_memory(saved, hf, plain, tmp_path):
    loaded = load_checkpoint(saved, tmp_path)
    assert loaded.args == plain.args
    _same_weights(loaded, hf)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(b.abs().sum() == 0 for n, b in loaded.named_buffers() if n.endswith("_cache"))


def test_load_checkpoint_bf16_and_preprocessor_mean(saved, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved, d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    m = load_checkpoint(d, tmp_path, dtype=torch.bfloat16, max_seq_len=640)
    assert m.text_decoder.output.weight.dtype == torch.bfloat16
    assert m.vision_encoder.mean.flatten().tolist() == [0.5] * 3
    assert m.vision_encoder.std.flatten().tolist() == [0.25] * 3


def test_load_sharded_checkpoint(hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    hf.save_pretrained(ckpt, max_shard_size="2MB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (ckpt / "model.safetensors").exists()
    _same_weights(load_checkpoint(ckpt, tmp_path), hf)


def test_hub_style_safetensors_checkpoint(hf, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file({k: v.contiguous() for k, v in hub_style(hf.state_dict()).items()}, ckpt / "model.safetensors")
    _same_weights(load_checkpoint(ckpt, tmp_path), hf)


def test_truncated_safetensors_names_file(saved, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(PipelineError, match="model.safetensors"):
        load_checkpoint(d, tmp_path)


def test_missing_shard_names_file(hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    hf.save_pretrained(ckpt, max_shard_size="2MB")
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(PipelineError, match=shard.name):
        load_checkpoint(ckpt, tmp_path)


# ----------------------------------------------------------------------------- tiny preset


def test_tiny_is_deterministic_and_leaves_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    a, b = make_tiny_llava(0), make_tiny_llava(0)
    assert torch.equal(torch.random.get_rng_state(), state)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    c = make_tiny_llava(1)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_geometry(hf, args):
    assert args.vision.num_image_tokens == 576 and args.vision.image_size == 336
    assert (args.text.vocab_size, args.image_token_index) == (32064, 32000)
    assert hf.config.pad_token_id == 32001 and hf.config.vision_feature_layer == -2
    linears = [m for m in hf.model.language_model.modules() if isinstance(m, torch.nn.Linear)] + [hf.lm_head]
    assert all(m.in_features % 32 == 0 for m in linears)
    # suppressed rows (byte-fallback <0x80>..<0xFF>, unk/bos/eos, ids >= 32000) can't win argmax
    norms = hf.lm_head.weight.norm(dim=1)
    assert norms[131:259].max() < 0.1 and norms[:3].max() < 0.1 and norms[32000:].max() < 0.1
    assert norms[3:131].min() > 1
