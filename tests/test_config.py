"""Configuration: params.yaml vs conf/, schema, overrides and validation messages."""

from pathlib import Path

import pytest
import yaml

from llava_pipeline.base import config, params
from llava_pipeline.export.quantize import check_group_size

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def test_params_yaml_is_what_conf_composes_to():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == params.compose(CONF)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_preset_composes_and_validates(preset):
    data = params.compose(CONF, [f"model={preset}"])
    cfg = config.validate(config.from_dict(data))
    assert cfg.model.name == preset


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize("target", sorted(p.stem for p in (CONF / "target").glob("*.yaml")))
def test_every_target_applies_over_every_model_preset(target, model):
    """A target preset sets the export's schemes whatever the model; its group size fits the
    model's layers (LLaVA-1.5's widths: 4096 / 11008 / 1024 / 4096; the tiny: 128 / 384)."""
    data = params.compose(CONF, [f"model={model}", f"target={target}"])
    cfg = config.validate(config.from_dict(data))
    chosen = yaml.safe_load((CONF / "target" / f"{target}.yaml").read_text())
    assert cfg.model.name == model
    for section in ("quant", "export"):
        for key, value in chosen.get(section, {}).items():
            assert data[section][key] == value, (section, key)
    widths = (128, 384) if model.startswith("tiny") else (4096, 11008)
    check_group_size({f"w{n}": n for n in widths}, cfg.quant)


def test_presets_set_their_group_size():
    assert params.compose(CONF, ["model=tiny"])["quant"]["group_size"] == 32
    big = params.compose(CONF, ["model=llava-1.5-7b"])
    assert big["quant"]["group_size"] == 128
    assert big["model"]["source"] == "llava-hf/llava-1.5-7b-hf"
    assert big["model"]["revision"]


def _base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_override_on_top_of_params_types_values():
    data = config.apply_overrides(_base(), ["quant.group_size=64", "quant.scheme=none"])
    cfg = config.validate(config.from_dict(data))
    assert cfg.quant.group_size == 64 and cfg.quant.scheme == "none"
    assert cfg.model.source == "builtin:tiny"


def test_group_override_merges_preset():
    data = config.apply_overrides(_base(), ["model=llava-1.5-7b"], conf_dir=CONF)
    assert data["model"]["name"] == "llava-1.5-7b" and data["quant"]["group_size"] == 128


@pytest.mark.parametrize(
    "override, needle",
    [
        ("quant.groupsize=32", "quant.groupsize"),
        ("nosuch.key=1", "nosuch"),
        ("quant.group_size=[1", "malformed override"),
        ("model=nosuch", "model: unknown option 'nosuch'"),
    ],
)
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(config.ConfigError, match=None) as e:
        config.validate(config.from_dict(config.apply_overrides(_base(), [override], CONF)))
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("quant.scheme=int3", "quant.scheme: unknown scheme 'int3' (allowed: none, 8da4w, 8da8w)"),
        ("quant.group_size=-32", "quant.group_size: must be 0 (per output channel) or a positive group size"),
        ("quant.scheme=8da8w", "quant.group_size=32: quant.scheme=8da8w has int8 weights per output channel"),
        ("quant.group_size=abc", "quant.group_size: expected an integer"),
        ("quant.embedding_bits=4", "quant.embedding_bits"),
        ("model.source=builtin:huge", "model.source: unknown built-in model"),
        ("export.max_seq_len=1", "export.max_seq_len"),
        ("export.kv_cache=fp16", "export.kv_cache: got 'fp16' (allowed: fp32, int8)"),
        ("quant.qparams=gptq", "quant.qparams: got 'gptq' (allowed: hqq, affine)"),
        ("emit.verify_steps=0", "emit.verify_steps: must be at least 1"),
        ("model.vision_layers=1", "model.vision_layers: must be at least 2"),
        ("model.text_layers=0", "model.text_layers: must be at least 1"),
        ("model.text_layers=4", "model.text_layers: builtin:tiny is a trained checkpoint whose depth is fixed"),
        ("evaluate.set=nosuch", "evaluate.set: 'nosuch' is neither shapes nor photos nor a folder"),
        ("evaluate.scenes=0", "evaluate.scenes: must be at least 1"),
        ("evaluate.reference_dtype=fp16", "evaluate.reference_dtype: got 'fp16' (allowed: float32, bfloat16)"),
        ("evaluate.min_top1=1.5", "evaluate.min_top1: must be between 0 and 1, got 1.5"),
        ("evaluate.min_accuracy=high", "evaluate.min_accuracy: expected a number"),
        ("evaluate.max_kl=-1", "evaluate.max_kl: must be >= 0 or null"),
    ],
)
def test_invalid_values_are_rejected_with_allowed_values(override, needle):
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.from_dict(config.apply_overrides(_base(), [override])))
    assert needle in str(e.value)


def test_depth_only_for_builtin_sources(tmp_path):
    data = config.apply_overrides(_base(), [f"model.source={tmp_path}", "model.text_layers=4"])
    with pytest.raises(config.ConfigError, match="model.text_layers: only a built-in source"):
        config.validate(config.from_dict(data))


def test_7b_shape_preset_composes():
    data = params.compose(CONF, ["model=llava-7b-shape"])
    cfg = config.validate(config.from_dict(data))
    assert (cfg.model.source, cfg.model.text_layers, cfg.model.vision_layers) == ("builtin:llava-7b-shape", 2, 3)
    assert cfg.quant.group_size == 128


@pytest.mark.parametrize("overrides", [["quant.group_size=0"], ["quant.scheme=8da8w", "quant.group_size=0"]])
def test_per_channel_schemes_validate(overrides):
    cfg = config.validate(config.from_dict(config.apply_overrides(_base(), overrides)))
    assert cfg.quant.group_size == 0
    # Per-channel weights fit every layer, whatever its in_features.
    check_group_size({"text_decoder.layers.0.attention.wq": 100}, cfg.quant)


def test_embedding_bits_accepts_none():
    cfg = config.validate(config.from_dict(config.apply_overrides(_base(), ["quant.embedding_bits=none"])))
    assert cfg.quant.embedding_bits == "none"


def test_group_size_not_dividing_a_layer_names_the_layer():
    q = config.QuantConfig(scheme="8da4w", group_size=48, embedding_bits=8)
    with pytest.raises(config.ConfigError) as e:
        check_group_size({"text_decoder.layers.0.mlp.down_proj": 96, "text_decoder.lm_head": 64}, q)
    assert "text_decoder.lm_head" in str(e.value) and "48" in str(e.value)
    # No check without quantization.
    check_group_size({"x": 7}, config.QuantConfig(scheme="none", group_size=48))


def test_group_size_must_suit_xnnpack():
    q = config.QuantConfig(scheme="8da4w", group_size=16, embedding_bits=8)
    with pytest.raises(config.ConfigError, match="quant.group_size=16: XNNPACK's 4-bit kernels need a multiple of 32"):
        check_group_size({"text_decoder.lm_head": 128}, q)
    check_group_size({"text_decoder.lm_head": 128}, config.QuantConfig(scheme="8da4w", group_size=64))


def test_missing_params_file(tmp_path):
    with pytest.raises(config.ConfigError, match="params.yaml: parameters file not found"):
        config.load(tmp_path / "params.yaml")


def test_evaluate_set_folder_needs_questions(tmp_path):
    data = config.apply_overrides(_base(), [f"evaluate.set={tmp_path}"])
    with pytest.raises(config.ConfigError, match="questions.jsonl not found"):
        config.validate(config.from_dict(data))
    (tmp_path / "questions.jsonl").write_text('{"image": "a.png", "question": "q"}\n')
    assert config.validate(config.from_dict(data)).evaluate.set == str(tmp_path)


def test_presets_choose_their_eval_set():
    assert params.compose(CONF, ["model=tiny"])["evaluate"]["set"] == "shapes"
    big = params.compose(CONF, ["model=llava-1.5-7b"])["evaluate"]
    assert (big["set"], big["reference_dtype"]) == ("photos", "bfloat16")


def test_dvc_composes_a_target_as_exp_run_s_does(tmp_path):
    """`dvc exp run -S target=x86-avx512` recomposes params.yaml with DVC's own Hydra call: the
    target's choices land in it over the model preset's."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "config", "", ["target=x86-avx512"])
    data = yaml.safe_load(out.read_text())
    assert data == params.compose(CONF, ["target=x86-avx512"])
    assert (data["quant"]["group_size"], data["quant"]["vision"], data["model"]["name"]) == (128, "8da8w", "tiny")
