"""Typed pipeline configuration: the schema, loading, overrides and validation.

`params.yaml` (what DVC tracks) is the composed form of the Hydra groups in `conf/`. A stage
run by hand reads `params.yaml` and applies command-line overrides on top
(`python -m stages.quantize quant.group_size=32`). The dataclasses below are OmegaConf
structured configs: OmegaConf checks keys, types and the enum fields' allowed values, Hydra
parses the overrides, and `validate` adds the checks that span keys. Every error is a
ConfigError whose one line names the key. All of it is cheap, so it runs before heavy work.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Sequence, get_type_hints

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Each closed set of strings is an enum whose members' names are their values (OmegaConf
# matches enum members by name, so it accepts the plain strings). Written out in the functional
# form, with a literal mapping, so that the type checker sees each as a class.

# The text decoder's linears (see quantize.py): fp32, int4 or int8 weights with int8 dynamic
# activations. group_size 0 means one scale per output channel.
QuantScheme = StrEnum("QuantScheme", {"none": "none", "8da4w": "8da4w", "8da8w": "8da8w"})
KvCache = StrEnum("KvCache", {"fp32": "fp32", "int8": "int8"})
# How int4/int8 scales are chosen: HQQ (scale-only, ExecuTorch's default; ~10 s per 45M-weight
# linear on 2 cores) or plain per-group min/max ("affine", ~0.3 s, same format and speed).
QParams = StrEnum("QParams", {"hqq": "hqq", "affine": "affine"})
# The vision tower + projector: fp32, or int8 per-channel weights with dynamic int8 activations
# (ExecuTorch's own LLaVA example quantizes its image encoder to int8 as well).
VisionScheme = StrEnum("VisionScheme", {"none": "none", "8da8w": "8da8w"})
ReferenceDtype = StrEnum("ReferenceDtype", {"float32": "float32", "bfloat16": "bfloat16"})

QUANT_SCHEMES = tuple(QuantScheme)
KV_CACHES = tuple(KvCache)
VISION_SCHEMES = tuple(VisionScheme)
REFERENCE_DTYPES = tuple(ReferenceDtype)
QPARAMS = {"hqq": "hqq_scale_only", "affine": "affine"}  # ours -> torchao's algorithm name
EMBEDDING_BITS = (8, "none")  # an int or a string: no enum, checked by validate
BUILTIN_SOURCES = ("builtin:tiny", "builtin:tiny-random", "builtin:llava-7b-shape")
EVAL_SETS = ("shapes", "photos")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    # builtin:tiny | a hub repo id ("llava-hf/llava-1.5-7b-hf") | a local HF-format directory
    source: str = "builtin:tiny"
    # Hub commit to pin; required for hub sources.
    revision: str | None = None
    # Seed of the built-in random-weight model.
    seed: int = 0
    # Layer counts of a built-in model (null: the preset's own). Only for builtin sources.
    text_layers: int | None = None
    vision_layers: int | None = None


@dataclass(frozen=True)
class ExportConfig:
    # Static KV cache length: prompt + image tokens + generated tokens.
    max_seq_len: int = 768
    # fp32 | int8 (per-token scales; ExecuTorch's quantized cache + quantized SDPA ops)
    kv_cache: KvCache = KvCache.fp32


@dataclass(frozen=True)
class QuantConfig:
    # none | 8da4w | 8da8w (see QUANT_SCHEMES)
    scheme: QuantScheme = QuantScheme["8da4w"]
    # int4 group size along in_features; 0: one scale per output channel
    group_size: int = 32
    # 8 (int8 per-row token embedding) or "none"
    embedding_bits: Any = 8
    # hqq | affine (see QPARAMS)
    qparams: QParams = QParams.hqq
    # none | 8da8w: the vision tower's and projector's linears (see VISION_SCHEMES)
    vision: VisionScheme = VisionScheme.none


@dataclass(frozen=True)
class EmitConfig:
    # Sample image turned into outputs/image.pt (relative to the project root or absolute).
    image: str = "assets/images/coffee.jpg"
    # Teacher-forced decode steps the .pte verifier compares with the eager model before
    # publishing (each is a full eager forward pass: a few seconds at 7B on 2 cores).
    verify_steps: int = 40


@dataclass(frozen=True)
class EvaluateConfig:
    # What the export is scored on (llava_pipeline.pipeline.evalset): "shapes" (seeded scenes of the
    # built-in model's task, with right answers), "photos" (the shipped photographs x general
    # questions), or a folder holding images and a questions.jsonl.
    set: str = "photos"
    # shapes: number of seeded scenes (one question of each type per scene) and their seed.
    scenes: int = 40
    seed: int = 1234
    # Longest answer generated, by the reference and by the .pte.
    max_new_tokens: int = 32
    # dtype of the transformers reference: float32, or bfloat16 (a 7B fits in 24 GiB).
    reference_dtype: ReferenceDtype = ReferenceDtype.float32
    # Reference log-probabilities kept per answer token for the KL divergence (the rest of
    # the vocabulary is one bucket).
    top_k: int = 64
    # Quality floors: the stage fails, naming the metric, when the .pte falls below one.
    # min_accuracy applies to every question type with right answers.
    min_accuracy: float = 0.0
    min_agreement: float = 0.0
    min_top1: float = 0.0
    max_kl: float | None = None


@dataclass(frozen=True)
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    emit: EmitConfig = field(default_factory=EmitConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def section(self, name: str) -> dict:
        """The resolved values of one top-level section, for manifests."""
        return asdict(getattr(self, name))


_SECTIONS = get_type_hints(PipelineConfig)  # "quant" -> QuantConfig, ...


def _schema() -> DictConfig:
    """The defaults as a structured config that merges and overrides can write to (OmegaConf
    marks a frozen dataclass's nodes read-only; the frozen dataclasses are what loading returns)."""
    schema = OmegaConf.structured(PipelineConfig)

    def writable(node: DictConfig) -> None:
        OmegaConf.set_readonly(node, False)
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                writable(child)

    writable(schema)
    return schema


_CONVERSIONS = {"Integer": "an integer", "Float": "a number", "String": "a string", "Boolean": "true or false"}
# Some keys' own words for a value outside their choices.
_UNKNOWN = {"quant.scheme": "unknown scheme"}


def _one_line(e: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's multi-line error as one line naming the key and, where they are few, the
    allowed keys or values."""
    key, msg = e.full_key or "", str(e.msg).splitlines()[0]
    if re.match(r"Key '.*' not in ", msg):
        parts = key.split(".")
        cls = PipelineConfig if len(parts) == 1 else _SECTIONS.get(parts[0]) if len(parts) == 2 else None
        if cls is not None:
            what = "unknown section" if "." not in key else "unknown key"
            return ConfigError(f"{key}: {what} (allowed: {', '.join(f.name for f in fields(cls))})")
    if msg.startswith(("Invalid type assigned", "Merge error")):
        return ConfigError(f"{key or 'configuration'}: expected a mapping")
    if m := re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg):
        return ConfigError(f"{key}: {_UNKNOWN.get(key, 'got')} {m[1]!r} (allowed: {m[2]})")
    if m := re.fullmatch(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg):
        return ConfigError(f"{key}: expected {_CONVERSIONS.get(m[2], m[2])}, got {m[1]!r}")
    if "is not Optional" in msg:
        return ConfigError(f"{key}: must not be null")
    return ConfigError(f"{key or 'configuration'}: {msg}")


def _structured(data: dict) -> DictConfig:
    if not isinstance(data, dict):
        raise ConfigError("configuration: expected a mapping at the top level")
    for name, raw in data.items():
        if raw is not None and not isinstance(raw, dict) and name in _SECTIONS:
            raise ConfigError(f"{name}: expected a mapping, got {raw!r}")
    try:
        merged = OmegaConf.merge(_schema(), {k: v for k, v in data.items() if v is not None})
    except OmegaConfBaseException as e:
        raise _one_line(e) from None
    assert isinstance(merged, DictConfig)  # merged into the structured schema, a mapping
    return merged


def _to_object(cfg: DictConfig) -> PipelineConfig:
    out = OmegaConf.to_object(cfg)
    assert isinstance(out, PipelineConfig)
    return out


def from_dict(data: dict) -> PipelineConfig:
    """Build a PipelineConfig from a nested dict; OmegaConf rejects unknown or mistyped keys."""
    return _to_object(_structured(data))


def to_dict(cfg: PipelineConfig) -> dict:
    return asdict(cfg)


def validate(cfg: PipelineConfig) -> PipelineConfig:
    """Model-independent checks; raises ConfigError naming the key and allowed values."""
    q = cfg.quant
    if q.group_size < 0:
        raise ConfigError(
            f"quant.group_size: must be 0 (per output channel) or a positive group size, got {q.group_size}"
        )
    if q.scheme == "8da8w" and q.group_size:
        raise ConfigError(
            f"quant.group_size={q.group_size}: quant.scheme=8da8w has int8 weights per output "
            "channel only (XNNPACK has no blockwise int8 kernel); set quant.group_size=0"
        )
    if q.embedding_bits not in EMBEDDING_BITS:
        raise ConfigError(f"quant.embedding_bits: got {q.embedding_bits!r} (allowed: 8, none)")
    if cfg.export.max_seq_len < 2:
        raise ConfigError(f"export.max_seq_len: must be at least 2, got {cfg.export.max_seq_len}")
    src = cfg.model.source
    if not src:
        raise ConfigError("model.source: must not be empty")
    if src.startswith("builtin:") and src not in BUILTIN_SOURCES:
        raise ConfigError(
            f"model.source: unknown built-in model {src!r} (allowed: {', '.join(BUILTIN_SOURCES)}, "
            "a hub repo id such as llava-hf/llava-1.5-7b-hf, or a local directory)"
        )
    for key in ("text_layers", "vision_layers"):
        n = getattr(cfg.model, key)
        if n is None:
            continue
        if source_kind(src) != "builtin":
            raise ConfigError(f"model.{key}: only a built-in source's depth can be set, not {src!r}'s (use null)")
        low = 2 if key == "vision_layers" else 1  # LLaVA-1.5 reads the second-to-last CLIP layer
        if n < low:
            raise ConfigError(f"model.{key}: must be at least {low}, got {n}")
        if src == "builtin:tiny":
            raise ConfigError(f"model.{key}: builtin:tiny is a trained checkpoint whose depth is fixed (use null)")
    if source_kind(src) == "hub":
        rev = cfg.model.revision or ""
        if not _COMMIT.fullmatch(rev):
            raise ConfigError(
                f"model.revision: a hub source ({src}) must be pinned to a 40-hex-digit commit, got {rev or None!r}"
            )
    if cfg.emit.verify_steps < 1:
        raise ConfigError(f"emit.verify_steps: must be at least 1, got {cfg.emit.verify_steps}")
    if not cfg.emit.image:
        raise ConfigError("emit.image: must name an image file")
    _validate_evaluate(cfg.evaluate)
    return cfg


def _validate_evaluate(e: EvaluateConfig) -> None:
    if e.set not in EVAL_SETS and not Path(e.set).is_dir():
        raise ConfigError(f"evaluate.set: {e.set!r} is neither {' nor '.join(EVAL_SETS)} nor a folder")
    if e.set not in EVAL_SETS and not (Path(e.set) / "questions.jsonl").is_file():
        raise ConfigError(f"evaluate.set: {Path(e.set) / 'questions.jsonl'} not found")
    for key, low in (("scenes", 1), ("max_new_tokens", 1), ("top_k", 1)):
        if getattr(e, key) < low:
            raise ConfigError(f"evaluate.{key}: must be at least {low}, got {getattr(e, key)}")
    for key in ("min_accuracy", "min_agreement", "min_top1"):
        if not 0.0 <= getattr(e, key) <= 1.0:
            raise ConfigError(f"evaluate.{key}: must be between 0 and 1, got {getattr(e, key)}")
    if e.max_kl is not None and e.max_kl < 0:
        raise ConfigError(f"evaluate.max_kl: must be >= 0 or null, got {e.max_kl}")


_COMMIT = re.compile(r"[0-9a-f]{40}")


def source_kind(source: str) -> str:
    """'builtin', 'hub' (`org/name` that is not a path on disk) or 'local'."""
    if source.startswith("builtin:"):
        return "builtin"
    if not source.startswith(("/", ".", "~")) and source.count("/") == 1 and not os.path.exists(source):
        return "hub"
    return "local"


# --------------------------------------------------------------------------- overrides


def _parse_overrides(overrides: list[str]):
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        first = str(e).strip().splitlines()[0]  # Hydra appends a multi-line grammar hint
        raise ConfigError(f"malformed override {overrides}: {first}") from None


def apply_overrides(data: dict, overrides: list[str], conf_dir: Path | None = None) -> dict:
    """Apply Hydra-syntax `key=value` overrides to a nested dict (a new dict is returned).

    `group=option` for a config group in `conf_dir` (e.g. `model=llava-1.5-7b`) merges that
    group's file, as Hydra composition would. Keys and values are checked against the schema
    as they are set.
    """
    out = OmegaConf.to_container(_overridden(data, overrides, conf_dir), enum_to_str=True)
    assert isinstance(out, dict)
    return out


def _overridden(data: dict, overrides: list[str], conf_dir: Path | None) -> DictConfig:
    cfg = _structured(data)
    for ov in _parse_overrides(list(overrides)):
        key = ov.key_or_group
        if ov.is_delete() or ov.is_add() or ov.is_sweep_override():
            raise ConfigError(f"{ov.input_line}: only plain key=value overrides are supported")
        value = ov.value()
        try:
            if "." not in key and conf_dir is not None and (conf_dir / key).is_dir():
                group_file = conf_dir / key / f"{value}.yaml"
                if not group_file.is_file():
                    options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
                    raise ConfigError(f"{key}: unknown option {value!r} (allowed: {', '.join(options)})")
                merged = OmegaConf.merge(cfg, yaml.safe_load(group_file.read_text()) or {})
                assert isinstance(merged, DictConfig)  # merged into the structured schema, a mapping
                cfg = merged
            else:
                OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _one_line(e) from None
    return cfg


def load(params_file: Path, overrides: Sequence[str] = (), conf_dir: Path | None = None) -> PipelineConfig:
    """Read params.yaml, apply overrides, type-check and validate."""
    if not params_file.is_file():
        raise ConfigError(f"{params_file}: parameters file not found")
    try:
        data = yaml.safe_load(params_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{params_file}: not valid YAML ({e})") from None
    return validate(_to_object(_overridden(data, list(overrides), conf_dir)))
