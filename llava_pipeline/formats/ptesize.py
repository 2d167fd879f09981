"""Bytes of a .pte attributed to each method.

A method's bytes: its XNNPACK delegate blobs, the named data (packed weights) those blobs
refer to by key, and the constant buffers its own tensors point at. Shared data
(none in this project's programs) would be counted in every method that uses it.
"""

from __future__ import annotations

from pathlib import Path


def method_bytes(pte: Path) -> dict[str, int]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte_file = deserialize_pte_binary(Path(pte).read_bytes())
    program, named = pte_file.program, pte_file.named_data
    keys: dict[bytes, int] = {}
    if named is not None:
        keys = {k.encode(): len(named.buffers[e.buffer_index]) for k, e in named.pte_data.items()}
    out: dict[str, int] = {}
    for plan in program.execution_plan:
        total = 0
        used_keys: set[bytes] = set()
        for d in plan.delegates:
            blob = program.backend_delegate_data[d.processed.index].data
            total += len(blob)
            used_keys.update(k for k in keys if k in blob)
        total += sum(keys[k] for k in used_keys)
        buffers = {getattr(v.val, "data_buffer_idx", 0) for v in plan.values}
        total += sum(len(program.constant_buffer[i].storage) for i in buffers if i)
        if plan.delegates or total:
            out[plan.name] = total
    return out
