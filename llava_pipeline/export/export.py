"""Export, lowering and serialization of the three runner methods.

The .pte holds what ExecuTorch's MultimodalRunner calls: `vision_encoder`,
`token_embedding`, `text_decoder`, plus constant methods it reads
(`get_max_seq_len`, `get_max_context_len`, `get_eos_ids`, ...). Each method is
exported and lowered on its own with its own partitioner list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from llava_pipeline.base.methods import MAX_SEQ_LEN, METHODS
from llava_pipeline.formats.runner_image import MAX_CHANNELS


def register_ops() -> None:
    """Register the non-core ops a lowered LLaVA program calls (custom LLM ops, quant ops)."""
    import executorch.extension.llm.custom_ops.custom_ops  # llama::update_cache, custom_sdpa
    import executorch.kernels.quantized  # noqa: F401  quantized_decomposed::embedding_byte
    import torchao.quantization  # noqa: F401  torchao::choose_qparams_affine, ...


def example_inputs(args) -> dict[str, tuple]:
    """Example inputs per method (shapes only matter; sequence length is dynamic)."""
    v = args.vision
    seq = 3
    return {
        "vision_encoder": (torch.zeros(1, 3, v.image_size, v.image_size, dtype=torch.uint8),),
        "token_embedding": (torch.zeros(1, seq, dtype=torch.long),),
        "text_decoder": (
            torch.zeros(1, seq, args.text.hidden_size, dtype=torch.float32),
            torch.tensor([0], dtype=torch.long),
        ),
    }


def dynamic_shapes(args) -> dict:
    # The runner feeds whole prompt chunks (up to the cache length) and single tokens.
    seq = Dim("seq", min=1, max=args.text.max_seq_len)
    # The picture as ExecuTorch's llava_main decodes it (runner_image.py): any channel count
    # stb gives, any size up to the model's.
    side = args.vision.image_size
    image = {
        1: Dim("channels", min=1, max=MAX_CHANNELS),
        2: Dim("height", min=1, max=side),
        3: Dim("width", min=1, max=side),
    }
    return {
        "vision_encoder": (image,),
        "token_embedding": ({1: seq},),
        "text_decoder": ({1: seq}, None),
    }


def export_methods(model, args) -> dict[str, ExportedProgram]:
    """torch.export each method module of a LlavaModel (non-strict, dynamic seq)."""
    inputs = example_inputs(args)
    shapes = dynamic_shapes(args)
    programs = {}
    # Export reasons as if the dynamic length were >= 2 and records a runtime
    # assert `start_pos <= max_seq_len - 2` in the ExportedProgram. The .pte does
    # not carry such asserts (ExecuTorch drops _assert_scalar), so a decode step
    # into the cache's last slot works there (tests/test_e2e.py checks it).
    # Size-oblivious export would avoid the assert but trips on torchao's
    # seq == 1 branch in dynamic activation quantization.
    with torch.no_grad():
        for name in METHODS:
            module = getattr(model, name).eval()
            programs[name] = torch.export.export(module, inputs[name], dynamic_shapes=shapes[name], strict=False)
    return programs


def partitioners(method: str, dynamic_quant: bool) -> list:
    """XNNPACK partitioner list per method.

    A method with dynamically quantized linears needs the dynamic-quant partitioner
    first (per-op, so each quantized linear becomes its own delegate call with its
    activation quantization, and its unpacked weights are freed as soon as they are
    packed), then the fp32 partitioner for the rest.
    """
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if dynamic_quant:
        return [
            XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True),
            XnnpackPartitioner(),
        ]
    return [XnnpackPartitioner()]


def dynamic_quant_methods(quant) -> frozenset[str]:
    """The methods whose linears `quant` quantizes with dynamic int8 activations."""
    out = set()
    if quant.scheme != "none":
        out.add("text_decoder")
    if quant.vision != "none":
        out.add("vision_encoder")
    return frozenset(out)


def constant_methods(args, bos_id: int, eos_ids: list[int]) -> dict:
    """Metadata the runner reads from the program (see the runner's constants.h)."""
    return {
        MAX_SEQ_LEN: args.text.max_seq_len,
        "get_max_context_len": args.text.max_seq_len,
        "get_vocab_size": args.text.vocab_size,
        "get_bos_id": bos_id,
        "get_eos_ids": list(eos_ids),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }


def _compile_config():
    from executorch.exir import EdgeCompileConfig

    # The custom LLM ops (update_cache, custom_sdpa) and torchao's quant ops are
    # not core ATen; IR validity checks would reject them.
    return EdgeCompileConfig(_check_ir_validity=False)


def lower(programs: dict[str, ExportedProgram], dynamic_quant: Collection[str], constants: dict):
    """to_edge_transform_and_lower with a partitioner list per method (`dynamic_quant`: the
    methods with dynamically quantized linears)."""
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(
        programs,
        partitioner={m: partitioners(m, m in dynamic_quant) for m in programs},
        constant_methods=constants,
        compile_config=_compile_config(),
    )


def delegation_summary(edge) -> dict:
    """Per method: delegate calls and the ops left outside any delegate."""
    summary = {}
    for name in edge.methods:
        gm = edge.exported_program(name).graph_module
        ops: Counter[str] = Counter()
        delegates = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            target = str(getattr(node.target, "__name__", node.target))
            if "executorch_call_delegate" in target:
                delegates += 1
            elif target != "getitem":
                ops[target] += 1
        summary[name] = {"delegate_calls": delegates, "undelegated_ops": dict(sorted(ops.items()))}
    return summary


# Heavy compute that must never run outside XNNPACK (the portable kernels are slow).
_MUST_DELEGATE = ("aten.linear", "aten.mm", "aten.addmm", "aten.bmm", "aten.convolution")
# Activation-quantization ops: outside a delegate they would run unfused per token.
_DYNAMIC_QUANT_OPS = ("torchao.choose_qparams", "torchao.quantize_affine")

# How the XNNPACK delegates' working memory is shared is a runtime setting of the
# XNNPACK backend, not part of the program: its workspace sharing mode (option
# "workspace_sharing_mode": 0 disabled, 1 per model, 2 global). This ExecuTorch
# build defaults it to global (EXECUTORCH_XNNPACK_SHARED_WORKSPACE=ON in its
# default CMake preset), and the runner does not override it.
WORKSPACE_SHARING = {
    "mode": "global",
    "set_by": "XNNPACK backend runtime default (EXECUTORCH_XNNPACK_SHARED_WORKSPACE=ON); "
    "backend option 'workspace_sharing_mode' overrides it per process",
    # Checked on executorch 1.5.1's wheel: the XNNWorkspaceManager constructor in
    # lib/libexecutorch_backend_xnnpack.so stores 2 (WorkspaceSharingMode::Global).
    "checked": "executorch 1.5.1 wheel: XNNWorkspaceManager() initialises the mode to 2 (Global)",
}


def check_delegation(summary: dict, dynamic_quant: Collection[str]) -> None:
    """Post-condition of lowering: every method delegated, no heavy op left behind."""
    for method, info in summary.items():
        # An embedding lookup has no XNNPACK kernel: token_embedding may stay portable.
        if info["delegate_calls"] == 0 and method != "token_embedding":
            raise RuntimeError(f"{method}: nothing was delegated to XNNPACK")
        heavy = _MUST_DELEGATE + (_DYNAMIC_QUANT_OPS if method in dynamic_quant else ())
        left = [op for op in info["undelegated_ops"] if op.startswith(heavy)]
        if left:
            raise RuntimeError(f"{method}: {left} left outside XNNPACK")


def save_edge(edge, out_dir: Path) -> None:
    """Serialize each lowered edge program (exir serde) for the next stage.

    Size: exir serde stores delegate data base64-encoded inside one JSON document, and
    each delegate keeps its pre-lowering program with a copy of the weights. At 7B that
    is tens of GB of text in memory. So, per method, the delegates' named data (the
    packed weights) goes to `<method>.blobs` as raw bytes (`<method>.blobs.json` says
    where), and each delegate's original program keeps its graph but not its weights
    (tensors of the same shape over a one-element storage): the emitter reads only that
    graph's debug handles. Both are restored by `load_edge`.

    Determinism: node metadata that records where it came from (`from_node` holds the
    Python id() of each graph it passed through, `stack_trace` absolute source paths)
    and zip timestamps would make identical programs differ; all are neutralized, so the
    same inputs give the same bytes in any checkout and DVC's downstream caching holds.
    """
    import zipfile

    from executorch.exir.serde.serialize import SCHEMA_VERSION, serialize

    for name in edge.methods:
        program = edge.exported_program(name)
        _strip_unstable_metadata(program)
        with _blobs_moved_out(program, out_dir / f"{name}.blobs"):
            artifact = serialize(program)
        # The entries exir serde's save() writes, with fixed timestamps, straight to disk.
        entries = (
            ("serialized_exported_program.json", artifact.exported_program),
            ("serialized_state_dict.pt", artifact.state_dict),
            ("serialized_constants.pt", artifact.constants),
            ("serialized_example_inputs.pt", artifact.example_inputs),
            ("version", ".".join(map(str, SCHEMA_VERSION)).encode()),
        )
        del artifact
        with zipfile.ZipFile(out_dir / f"{name}.pt2", "w") as zf:
            for entry, data in entries:
                info = zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o600 << 16
                zf.writestr(info, data)


def _lowered_modules(program: ExportedProgram) -> list:
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    return sorted(
        ((n, m) for n, m in program.graph_module.named_children() if isinstance(m, LoweredBackendModule)),
        key=lambda item: item[0],
    )


class _blobs_moved_out:
    """Within the block, delegates' named-data buffers live in `path` (raw, with a JSON
    index) and their original programs' weights are placeholders; restored on exit."""

    def __init__(self, program: ExportedProgram, path: Path):
        self.program, self.path = program, path
        self.saved: list = []

    def __enter__(self):
        import json

        index, offset = [], 0
        with open(self.path, "wb") as f:
            for mod_name, lowered in _lowered_modules(self.program):
                store = lowered.named_data_store_output
                if store is not None:
                    for i, buf in enumerate(store.buffers):
                        data = bytes(buf)
                        f.write(data)
                        index.append([mod_name, i, offset, len(data)])
                        offset += len(data)
                        self.saved.append((store.buffers, i, buf))
                        store.buffers[i] = b""
                original = lowered.original_module
                for table in (original._state_dict, original._constants):
                    for key, value in list(table.items()):
                        if type(value) in (torch.Tensor, torch.nn.Parameter) and value.numel() > 1:
                            self.saved.append((table, key, value))
                            table[key] = _placeholder(value)
        self.path.with_suffix(".blobs.json").write_text(json.dumps(index) + "\n")
        return self

    def __exit__(self, *exc):
        for container, key, value in reversed(self.saved):
            container[key] = value
        return False


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype, one element of storage (torch.save keeps the strides)."""
    stub = torch.zeros((), dtype=t.dtype).expand(t.shape)
    return torch.nn.Parameter(stub, requires_grad=False) if isinstance(t, torch.nn.Parameter) else stub


def _restore_blobs(program: ExportedProgram, path: Path) -> None:
    import json

    modules = dict(_lowered_modules(program))
    index = json.loads(path.with_suffix(".blobs.json").read_text())
    with open(path, "rb") as f:
        for mod_name, i, offset, size in index:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated (entry {mod_name}[{i}] at {offset}+{size})")
            modules[mod_name].named_data_store_output.buffers[i] = data


_UNSTABLE_META = ("from_node", "stack_trace")


def _strip_unstable_metadata(program: ExportedProgram) -> None:
    """Drop debug metadata that varies run to run or checkout to checkout, also in
    the original programs that delegates keep."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                for key in _UNSTABLE_META:
                    node.meta.pop(key, None)
        original = getattr(module, "original_module", None)
        if isinstance(original, ExportedProgram):
            _strip_unstable_metadata(original)


def load_edge(in_dir: Path, constants: dict):
    """Inverse of save_edge: an EdgeProgramManager ready for to_executorch()."""
    from executorch.exir import EdgeProgramManager
    from executorch.exir.serde.serialize import load

    register_ops()  # the deserializer resolves op names only for registered ops

    programs = {}
    for name in METHODS:
        with open(in_dir / f"{name}.pt2", "rb") as f:
            programs[name] = load(f)
        _restore_blobs(programs[name], in_dir / f"{name}.blobs")
    return EdgeProgramManager(programs, constant_methods=constants, compile_config=_compile_config())


def write_executorch(edge, path: Path) -> None:
    """Memory planning and serialization to `path`; delegate payloads as separate
    segments, streamed to the file (no contiguous copy of the whole program)."""
    with open(path, "wb") as f:
        to_executorch(edge).write_to_file(f)


def to_executorch(edge):
    """Memory planning and emission; delegate payloads as separate segments."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    et = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            # Inputs are owned by the caller (the runner passes its own buffers).
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            # The hint-based pass would cap dynamic inputs at the example length.
            sym_shape_eval_pass={m: ConstraintBasedSymShapeEvalPass() for m in METHODS},
        )
    )
    return et
