"""The pipeline's expected-failure exception, below every other module of the package."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """An expected failure (bad input, missing upstream output): reported in one line."""
