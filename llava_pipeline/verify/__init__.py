"""Verify an exported LLaVA .pte: the runner's contract, and numerics against the eager models.

    python -m llava_pipeline.verify outputs/llava.pte [--tokenizer_path T] [--outputs DIR]
                                    [--steps 40] [--no-fp32]

Checks, one table row each (method, metric, value, threshold, status: PASS, FAIL, WARN or
INFO), in the order `verify()` (verifier.py) runs them:

1. Provenance (manifest.py): the .pte is the one emit's manifest records, and the stage
   manifests chain back to the eager models it is compared with.
2. What ExecuTorch's MultimodalRunner needs (contract.py): methods, constants, tensor metas,
   and a tokenizer covering exactly the decoder's logits.
3. Numerics (numerics.py, with the thresholds and how they were measured): each method of
   the .pte against the eager model on the same inputs.

The program runs in a child process (child.py), so that a corrupted .pte that crashes the
runtime becomes a FAIL row, not a crashed verifier. Report and Row (report.py) hold the result;
the CLI is __main__.py. Exit status: 0 every row passes, 1 some row fails, 2 nothing could be
verified (VerifyError: missing or unloadable .pte, missing manifest or model).
"""

from llava_pipeline.verify.report import Report, Row, VerifyError
from llava_pipeline.verify.verifier import verify

__all__ = ["Report", "Row", "VerifyError", "verify"]
