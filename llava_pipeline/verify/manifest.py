"""Provenance: the .pte is the program the stage manifests describe.

The .pte's sha256 must equal `emit/manifest.json`'s record of `llava.pte`, and the manifests
chain emit -> to_executorch -> partition -> quantize -> source_transform (each stage's recorded
input equals its upstream's manifest/output), so the eager models rebuilt from `quantize/` and
`source_transform/` are the ones this program was lowered from.
"""

from __future__ import annotations

from pathlib import Path

from llava_pipeline.base.files import read_json, sha256_file
from llava_pipeline.verify.report import Report, VerifyError

# (downstream stage, key path of its recorded input, upstream stage, what of upstream it names)
LINKS = (
    ("emit", ("inputs", "program"), "to_executorch", ("outputs", "model.pte")),
    ("to_executorch", ("inputs", "edge_programs", "manifest.json"), "partition", None),
    ("partition", ("inputs", "quantized_model", "manifest.json"), "quantize", None),
    ("quantize", ("inputs", "model", "manifest.json"), "source_transform", None),
)


def _dig(d, keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def check_provenance(report: Report, pte: Path, outputs: Path) -> dict:
    """Rows for the .pte hash and the manifest chain; returns the manifests by stage.
    Raises VerifyError if emit, quantize or source_transform has no manifest."""
    manifests = {}
    for name in ("emit", "quantize", "source_transform", "to_executorch", "partition"):
        path = outputs / name / "manifest.json"
        if path.is_file():
            manifests[name] = read_json(path)
        elif name in ("emit", "quantize", "source_transform"):
            raise VerifyError(f"{path}: missing (pass the pipeline's outputs folder with --outputs)")
    want = _dig(manifests["emit"], ("outputs", "llava.pte"))
    got = sha256_file(pte)
    same = got == want
    report.add("program", "sha256 == emit manifest's llava.pte", got[:12], (want or "none recorded")[:12], same)
    broken, unchecked = [], []
    for down, keys, up, names in LINKS:
        if down not in manifests or up not in manifests:
            unchecked.append(f"{down}->{up}")
            continue
        recorded = _dig(manifests[down], keys)
        actual = _dig(manifests[up], names) if names else sha256_file(outputs / up / "manifest.json")
        if recorded != actual:
            broken.append(f"{down}->{up}")
    value = f"{len(LINKS) - len(broken) - len(unchecked)}/{len(LINKS)} links match"
    if broken:
        report.add(
            "program", "manifest chain emit..source_transform", f"broken: {', '.join(broken)}", "all links", False
        )
    elif unchecked:
        report.warn(
            "program",
            "manifest chain emit..source_transform",
            f"{value}; no manifest for {', '.join(unchecked)}",
            "all links",
        )
    else:
        report.add("program", "manifest chain emit..source_transform", value, "all links", True)
    return manifests
