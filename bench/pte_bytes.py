"""Weight and KV-cache bytes a decode step reads: of a .pte's method, or of a transformers LLaVA.

``pte_method_bytes`` reads the flatbuffer and delegate headers, never the weights: the
program flatbuffer (``_flatbuffer_to_program`` on the first ``program_size`` bytes the
extended header gives) lists the method's delegates; each XNNPACK payload (a segment)
starts with an ``XH00`` header whose flatbuffer names the named-data entries it uses (the
weights, stored as their own segments, keyed by a hash) and gives the size of any inline
constant data. ``weight_bytes`` = the segment sizes of the named-data keys found in the
method's delegate flatbuffers + inline constant data + the method's non-delegated constant
tensors (e.g. RMSNorm weights); non-delegated 2-D constants with one row per cache position
(RoPE cos/sin, read one row per token) are left out and reported as
``position_table_bytes``. These are the bytes as stored; XNNPACK repacks weights at load
(layout, same precision), so what it streams can differ slightly. KV cache: the method's
memory-planned 4-D buffers with the longest sequence dimension (the static caches,
deduplicated by memory offset) give the bytes per cached position.

``hf_text_bytes``: the language model's parameters except ``embed_tokens``, plus the
lm_head, at the model's dtype; KV = 2 * layers * kv_heads * head_dim * dtype size per
position.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

# ExecuTorch ScalarType codes -> element size in bytes.
_ET_ELEMENT_SIZE = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 15: 2}

_XNN_MAGIC = b"XH00"


def _xnn_payload_parts(payload_head: bytes) -> tuple[int, int, int, int] | None:
    """(flatbuffer offset, size, constant data offset, size) from an XNNPACK payload's
    header (its first 30 bytes), or None if it has none (a bare flatbuffer)."""
    if len(payload_head) < 30 or payload_head[4:8] != _XNN_MAGIC:
        return None
    fb_off, fb_size, const_off = struct.unpack_from("<III", payload_head, 10)
    (const_size,) = struct.unpack_from("<Q", payload_head, 22)
    return fb_off, fb_size, const_off, const_size


@dataclass(frozen=True)
class PteBytes:
    weight_bytes: int  # what a decode step streams: delegated named data + inline + other constants
    named_data_bytes: int
    inline_constant_bytes: int
    other_constant_bytes: int
    position_table_bytes: int  # left out of weight_bytes (one row read per token)
    kv_bytes_per_position: int
    kv_buffers: int
    delegates: int
    backends: tuple[str, ...] = ()  # the delegates' backend ids


def pte_method_bytes(pte: Path, method: str = "text_decoder") -> PteBytes:
    """Byte accounting of one method of a .pte (see the module docstring); reads the
    flatbuffer and the method's delegate headers only, never the weights themselves."""
    from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header
    from executorch.exir.schema import DataLocation, Tensor

    with open(pte, "rb") as f:
        head = f.read(64)
        eh = _get_extended_header(head)
        if eh is None or not eh.is_valid():
            raise ValueError(f"{pte}: no extended header (not a segmented .pte)")
        f.seek(0)
        program = _flatbuffer_to_program(f.read(eh.program_size))
        plans = {p.name: p for p in program.execution_plan}
        if method not in plans:
            raise ValueError(f"{pte} has no method {method}")
        plan = plans[method]
        segment_of_key = {nd.key: nd.segment_index for nd in (program.named_data or [])}

        def read_segment(index: int, start: int, size: int) -> bytes:
            seg = program.segments[index]
            f.seek(eh.segment_base_offset + seg.offset + start)
            return f.read(min(size, seg.size - start))

        keys: set[str] = set()
        inline = 0
        for delegate in plan.delegates:
            loc = delegate.processed.location
            if loc == DataLocation.SEGMENT:
                idx = delegate.processed.index
                parts = _xnn_payload_parts(read_segment(idx, 0, 30))
                if parts is None:  # no header: the whole payload is a flatbuffer
                    fb = read_segment(idx, 0, program.segments[idx].size)
                else:
                    fb_off, fb_size, _, const_size = parts
                    fb = read_segment(idx, fb_off, fb_size)
                    inline += const_size
            else:
                data = bytes(program.backend_delegate_data[delegate.processed.index].data)
                parts = _xnn_payload_parts(data[:30])
                fb = data if parts is None else data[parts[0] : parts[0] + parts[1]]
                inline += 0 if parts is None else parts[3]
            keys.update(k for k in segment_of_key if k.encode() in fb)

    named = sum(program.segments[segment_of_key[k]].size for k in keys)
    tensors = [v.val for v in plan.values if isinstance(v.val, Tensor)]
    planned4d = [t for t in tensors if t.allocation_info is not None and len(t.sizes) == 4]
    longest = max((t.sizes[1] for t in planned4d), default=0)  # the KV caches' length
    other = positional = 0
    for t in tensors:
        if t.data_buffer_idx > 0 and t.allocation_info is None:
            nbytes = _ET_ELEMENT_SIZE.get(int(t.scalar_type), 4)
            for d in t.sizes:
                nbytes *= d
            if len(t.sizes) == 2 and t.sizes[0] == longest:  # one row per cache position
                positional += nbytes
            else:
                other += nbytes
    seen, kv_per_pos = set(), 0
    for t in planned4d:
        a = t.allocation_info
        where = (a.memory_id, a.memory_offset_low, a.memory_offset_high)
        if t.sizes[1] != longest or where in seen:
            continue
        seen.add(where)
        kv_per_pos += _ET_ELEMENT_SIZE.get(int(t.scalar_type), 4) * t.sizes[0] * t.sizes[2] * t.sizes[3]
    return PteBytes(
        weight_bytes=named + inline + other,
        named_data_bytes=named,
        inline_constant_bytes=inline,
        other_constant_bytes=other,
        position_table_bytes=positional,
        kv_bytes_per_position=kv_per_pos,
        kv_buffers=len(seen),
        delegates=len(plan.delegates),
        backends=tuple(sorted({d.id for d in plan.delegates})),
    )


def hf_text_bytes(model) -> tuple[int, int]:
    """(weight bytes a decode step streams, KV bytes per cached position) of a transformers
    LLaVA: the language model's parameters except the token embedding, plus the lm_head
    (counted once if tied); KV = 2 * layers * kv_heads * head_dim * element size."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    total, seen = head.numel() * head.element_size(), {id(head), id(embed)}
    for name, p in model.named_parameters():
        if "language_model" in name and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_pos = 2 * cfg.num_hidden_layers * kv_heads * head_dim * embed.element_size()
    return total, per_pos
