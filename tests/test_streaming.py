"""Large-model paths on small models: the synthetic checkpoint writer, the streamed
source transform (sharded, dtype kept) and the unit-by-unit load + quantize."""

import json

import pytest
import torch

from llava_pipeline.base.config import QuantConfig
from llava_pipeline.base.errors import PipelineError
from llava_pipeline.export import model_io, quantize
from llava_pipeline.model import synthetic
from llava_pipeline.model.convert import renamed
from llava_pipeline.model.model import load_units
from llava_pipeline.model.tiny import tiny_llava_config

MAX_SEQ_LEN = 640


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny-width synthetic checkpoint in bf16, cut into ~0.5 MB shards."""
    out = tmp_path_factory.mktemp("synthetic") / "ckpt"
    synthetic.write_checkpoint(out, tiny_llava_config(), seed=3, dtype=torch.bfloat16, shard_bytes=1 << 19)
    return out


def test_synthetic_checkpoint_is_sharded_hf_format(ckpt):
    from transformers import LlavaForConditionalGeneration

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((ckpt / s).is_file() for s in shards)
    hf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    shapes = synthetic.parameter_shapes(tiny_llava_config())
    state = hf.state_dict()
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    want = synthetic.random_tensor(name, shapes[name], 3, shapes).to(torch.bfloat16).float()
    assert torch.equal(state[name], want)
    assert (ckpt / "tokenizer.model").is_file() and (ckpt / "preprocessor_config.json").is_file()


def test_synthetic_bytes_do_not_depend_on_sharding(tmp_path):
    cfg = tiny_llava_config()
    (tmp_path / "a").mkdir()
    synthetic.write_weights(tmp_path / "a", cfg, 0, torch.float32, shard_bytes=1 << 30)
    (tmp_path / "b").mkdir()
    synthetic.write_weights(tmp_path / "b", cfg, 0, torch.float32, shard_bytes=1 << 20)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model-00001.safetensors")
    b = {}
    for f in sorted((tmp_path / "b").glob("model-*.safetensors")):
        b.update(load_file(f))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c_dir = tmp_path / "c"
    c_dir.mkdir()
    synthetic.write_weights(c_dir, cfg, 1, torch.float32, shard_bytes=1 << 30)
    c = load_file(c_dir / "model-00001.safetensors")
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_7b_config_has_the_real_widths():
    cfg = synthetic.llava_7b_config()
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_hidden_layers) == (4096, 11008, 32, 32)
    assert (t.vocab_size, v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (32064, 1024, 24, 336, 14)
    n = sum(s.numel() for s in synthetic.parameter_shapes(cfg).values())
    assert 7.0e9 < n < 7.1e9  # LLaVA-1.5-7B: 7.06 B parameters


@pytest.fixture(scope="module")
def transformed(ckpt):
    """source_transform's folder beside the checkpoint's, as in outputs/."""
    out = ckpt.parent / "source_transform"
    out.mkdir()
    model_io.write_transformed(ckpt, MAX_SEQ_LEN, out)
    return out


def test_transform_copies_no_weight_and_keeps_dtype_and_matches_transformers(ckpt, transformed):
    assert not list(transformed.glob("*.safetensors"))  # names only: the weights stay where they are
    files = model_io.weight_files(transformed)
    shards = {path for path, _ in files.values()}
    assert len(shards) > 2 and all(p.parent.resolve() == ckpt.resolve() for p in shards)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(index[key] == path.name for path, key in files.values())  # each names its real shard
    assert all(
        ref["file"].startswith("../ckpt/")
        for ref in json.loads((transformed / "weights.json").read_text())["weights"].values()
    )
    from safetensors import safe_open

    path, key = files["text_decoder.output.weight"]
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor(key).dtype == torch.bfloat16
    from transformers import LlavaForConditionalGeneration

    # transformers' own loader, all of it in memory, against the unit-by-unit loader
    hf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    got = model_io.load_transformed(transformed)
    weights = {k: p for k, p in got.named_parameters()}
    ref = dict(renamed(got.args, hf.state_dict().items(), {k: p.shape for k, p in weights.items()}))
    assert ref.keys() == weights.keys()
    for k in ref:
        assert torch.equal(ref[k], weights[k]), k
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert (list(got.args.vision.image_mean), list(got.args.vision.image_std)) == (pre["image_mean"], pre["image_std"])


def test_unit_by_unit_quantize_equals_whole_model(transformed):
    quant = QuantConfig(scheme="8da4w", group_size=32, embedding_bits=8)
    seen = []

    def hook(unit, model):
        seen.append(unit)
        quantize.quantize_unit(unit, model, quant)

    streamed = model_io.load_transformed(transformed, on_unit=hook)
    whole = model_io.load_transformed(transformed)  # all of it loaded first, then quantized
    for unit in load_units(whole):
        quantize.quantize_unit(unit, whole, quant)
    assert seen[:2] == ["vision_encoder", "token_embedding"] and seen[-1] == "text_decoder.output"
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if hasattr(x, "qdata"):
            assert torch.equal(x.qdata, y.qdata) and torch.equal(x.scale, y.scale), k
        else:
            assert torch.equal(x, y), k
    assert hasattr(streamed.text_decoder.output.weight, "qdata")
    assert hasattr(streamed.text_decoder.layers[0].feed_forward.w2.weight, "qdata")


@pytest.mark.parametrize("shape", [(4, 6), (3, 5), (1,)])
def test_int4_values_pack_two_per_byte_and_back(shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = model_io._pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() + 1) // 2
    assert torch.equal(model_io._unpack_int4(packed, list(shape)), q)


@pytest.mark.parametrize("scheme, group_size, packs", [("8da4w", 32, True), ("8da8w", 0, False)])
def test_quantized_file_packs_int4_and_reads_back_equal(transformed, tmp_path, scheme, group_size, packs):
    """model.pt stores 4-bit weights two values per byte and reads back the same tensors, type,
    attributes and all; int8 weights are stored as they are."""
    quant = QuantConfig(scheme=scheme, group_size=group_size, embedding_bits=8)
    model = model_io.load_transformed(transformed, on_unit=lambda unit, m: quantize.quantize_unit(unit, m, quant))
    state = model.state_dict()
    out = tmp_path / "q"
    out.mkdir()
    model_io.save_quantized(dict(state), out)  # it empties the dict it is given
    torch.save(state, tmp_path / "unpacked.pt")
    packed = torch.load(out / model_io.INT4_FILE, weights_only=True)["layout"]
    linears = {k for k, v in state.items() if hasattr(v, "qdata") and k.startswith("text_decoder.")}
    assert linears and (set(packed) == linears if packs else not packed)
    back = model_io.read_quantized_state(out)
    assert back.keys() == state.keys()
    for k, v in state.items():
        w = back[k]
        assert type(w) is type(v), k
        if hasattr(v, "qdata"):
            assert torch.equal(w.qdata, v.qdata) and torch.equal(w.scale, v.scale), k
            assert torch.equal(w.zero_point, v.zero_point) and w.block_size == v.block_size, k
            assert (w.target_dtype, w.dtype, w.activation_quantization) == (
                v.target_dtype,
                v.dtype,
                v.activation_quantization,
            )
        else:
            assert torch.equal(w, v), k
    int4_bytes = sum(state[k].qdata.numel() for k in packed)
    files = (out / model_io.QUANTIZED_FILE).stat().st_size + (out / model_io.INT4_FILE).stat().st_size
    saved = (tmp_path / "unpacked.pt").stat().st_size - files
    assert 0.9 * int4_bytes / 2 <= saved <= 1.1 * int4_bytes / 2 + 65536


def test_int4_values_out_of_range_are_refused_not_wrapped(transformed, tmp_path):
    quant = QuantConfig(scheme="8da4w", group_size=32, embedding_bits=8)
    model = model_io.load_transformed(transformed, on_unit=lambda unit, m: quantize.quantize_unit(unit, m, quant))
    state = model.state_dict()
    key = "text_decoder.layers.0.attention.wq.weight"
    state[key].qdata[0, 0] = 8  # not an int4 value
    with pytest.raises(PipelineError, match=key):
        model_io.save_quantized(dict(state), tmp_path)


def test_missing_shard_is_named(ckpt, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    out = tmp_path / "source_transform"
    out.mkdir()
    model_io.write_transformed(copy, MAX_SEQ_LEN, out)
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(PipelineError, match=victim.name):
        model_io.load_transformed(out)
