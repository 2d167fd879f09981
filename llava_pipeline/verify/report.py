"""The verifier's result: one row per check (method, metric, value, threshold, status), the
table the CLI prints, and VerifyError for when nothing can be verified."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llava_pipeline.base.errors import PipelineError


class VerifyError(PipelineError):
    """Nothing can be verified (missing/unloadable .pte, missing manifest): exit 2, one line."""


@dataclass
class Row:
    method: str
    metric: str
    value: str
    threshold: str
    status: str  # PASS, FAIL, WARN (not failing), INFO (not judged)


@dataclass
class Report:
    """The verification result: `ok` is true when no row has status FAIL."""

    pte: Path
    rows: list[Row] = field(default_factory=list)

    def add(self, method: str, metric: str, value, threshold: str, passed: bool | None) -> Row:
        status = "INFO" if passed is None else ("PASS" if passed else "FAIL")
        row = Row(method, metric, value if isinstance(value, str) else fmt(value), threshold, status)
        self.rows.append(row)
        return row

    def warn(self, method: str, metric: str, value: str, threshold: str = "") -> None:
        self.rows.append(Row(method, metric, value, threshold, "WARN"))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        head = Row("method", "metric", "value", "threshold", "status")
        cells = [[r.method, r.metric, r.value, r.threshold, r.status] for r in (head, *self.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def fmt(x) -> str:
    """A row value: floats to 3 significant digits (scientific outside 1e-3..1e4)."""
    if isinstance(x, float):
        return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
    return str(x)
