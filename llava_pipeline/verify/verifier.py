"""`verify()`: every check on one export, in order, into one Report.

Provenance first (manifest.py), then, while the child loads the program (child.py), the eager
models are rebuilt from the stage folders; then the runner's contract and the tokenizer
(contract.py) and, if the runner's methods are all there, the numerics (numerics.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from llava_pipeline.base.methods import METHODS
from llava_pipeline.runtime.runner import load_kernels, native_output_captured
from llava_pipeline.verify.child import Program
from llava_pipeline.verify.contract import check_contract, check_tokenizer
from llava_pipeline.verify.manifest import check_provenance
from llava_pipeline.verify.numerics import (
    KV_CACHE_LOGITS_REL,
    TOLERANCES,
    VISION_TOLERANCES,
    NumericsInputs,
    check_numerics,
    load_image,
    prompt,
)
from llava_pipeline.verify.report import Report, VerifyError


def verify(pte_path, tokenizer_path=None, outputs_dir=None, steps: int = 40, compare_fp32: bool = True) -> Report:
    """Verify `pte_path` against the pipeline folder `outputs_dir` (default: the .pte's folder).

    `tokenizer_path` None means `tokenizer.bin` beside the .pte if there is one (else the
    tokenizer row is a WARN); `image.pt` is also looked for beside the .pte, so emit can call
    `verify(out / "llava.pte", None, outputs)` on its finished folder before publishing.
    Returns a Report whose `.ok` is false if any row failed; prints nothing (the runtime's
    native logs are captured). Raises VerifyError (a PipelineError) when nothing can be
    verified: missing or unloadable .pte, an explicitly given tokenizer that does not exist,
    missing manifests or eager models.
    """
    pte = Path(pte_path)
    outputs = Path(outputs_dir) if outputs_dir is not None else pte.parent
    if not pte.is_file():
        raise VerifyError(f"{pte}: no such file")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise VerifyError(f"{tokenizer_path}: no such tokenizer file")
    with open(pte, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:6] != b"ET":
        raise VerifyError(f"{pte}: not an ExecuTorch program (no 'ET' file identifier)")
    with native_output_captured():  # the runtime and the custom ops log natively on fds 1 and 2
        return _verify(pte, tokenizer_path, outputs, steps, compare_fp32)


def _verify(pte: Path, tokenizer_path, outputs: Path, steps: int, compare_fp32: bool) -> Report:
    report = Report(pte)
    manifests = check_provenance(report, pte, outputs)
    quant = manifests["quantize"].get("config", {}).get("quant", {})
    scheme, vision_scheme = quant.get("scheme"), quant.get("vision", "none")
    if scheme not in TOLERANCES or vision_scheme not in VISION_TOLERANCES:
        raise VerifyError(
            f"{outputs / 'quantize/manifest.json'}: unknown quant scheme {scheme!r} (vision {vision_scheme!r})"
        )
    kv_cache = manifests["source_transform"].get("config", {}).get("export", {}).get("kv_cache", "fp32")
    if kv_cache not in KV_CACHE_LOGITS_REL:
        raise VerifyError(f"{outputs / 'source_transform/manifest.json'}: unknown export.kv_cache {kv_cache!r}")
    base = TOLERANCES[scheme]
    tol = replace(
        base,
        vision_rel=VISION_TOLERANCES[vision_scheme],
        logits_rel=max(base.logits_rel, KV_CACHE_LOGITS_REL[kv_cache]),
    )
    program = Program(pte)  # starts loading in the child while the eager models load here
    try:
        from llava_pipeline.export import model_io  # torch and ExecuTorch, loading while the child loads the .pte

        load_kernels()  # the eager models call the custom LLM and quantized ops too
        try:
            quant_model, args, _ = model_io.load_quantized(outputs / "quantize")
            fp32_model = model_io.load_transformed(outputs / "source_transform") if compare_fp32 else None
            eager_error = None
        except Exception as e:  # torch.load / safetensors / state-dict errors vary
            eager_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        desc = program.wait_loaded()  # an unloadable .pte is the first thing to report
        if eager_error:
            raise VerifyError(f"{outputs}: cannot rebuild the eager models ({eager_error})")
        width = check_contract(report, desc, args)
        if tokenizer_path is None and (pte.parent / "tokenizer.bin").is_file():
            tokenizer_path = pte.parent / "tokenizer.bin"
        tok = check_tokenizer(report, Path(tokenizer_path) if tokenizer_path else None, width)
        if all(m in desc["methods"] for m in METHODS):
            pixels, image_name = load_image(report, pte, args)
            before, after = prompt(tok, args)
            check_numerics(
                report,
                NumericsInputs(
                    program=program,
                    quant_model=quant_model,
                    fp32_model=fp32_model,
                    args=args,
                    tol=tol,
                    scheme=scheme,
                    vision_scheme=vision_scheme,
                    pixels=pixels,
                    image_name=image_name,
                    before=before,
                    after=after,
                    steps=steps,
                ),
            )
    finally:
        program.close()
    return report
