"""What every stage shares: config loading, atomic outputs, manifests, metrics.

A stage writes into a private `outputs/.<stage>.partial/` folder and only a
finished folder, manifest included, is moved to `outputs/<stage>/`. A stage
killed midway therefore leaves no folder that DVC or a later stage would take
as done. Manifests are deterministic (relative paths, no timestamps); wall time
and peak RSS go to `outputs/metrics/<stage>.json`, which DVC tracks as a metric.

The terminal gets one line per stage (name, wall time, peak RSS, what it wrote and
its size) or one error line; everything the libraries print goes to
`outputs/logs/<stage>.log` (set LLAVA_VERBOSE=1 to see it on the terminal instead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from llava_pipeline.base import config as config_mod
from llava_pipeline.base import rss
from llava_pipeline.base.errors import PipelineError
from llava_pipeline.base.files import sha256_file, write_json

OUTPUTS = Path("outputs")
# The DAG in an order that runs it by hand (dvc.yaml declares the same edges): the export,
# then the transformers reference (which needs only download) and the evaluation.
EXPORT_STAGES = ("download", "source_transform", "quantize", "partition", "to_executorch", "emit")
STAGES = (*EXPORT_STAGES, "reference", "evaluate")
PACKAGES = (
    "torch",
    "executorch",
    "torchao",
    "transformers",
    "safetensors",
    "sentencepiece",
    "pytorch-tokenizers",
    "pillow",
)


def hash_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative POSIX path."""
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def upstream(stage: str, outputs: Path = OUTPUTS) -> Path:
    """The finished output folder of an upstream stage; error if it is not there."""
    folder = outputs / stage
    if not (folder / "manifest.json").is_file():
        raise PipelineError(f"{folder}: no finished output of stage '{stage}' (run `dvc repro {stage}` first)")
    return folder


@dataclass
class StageContext:
    """Handed to a stage body: where to write, and what it read."""

    name: str
    cfg: config_mod.PipelineConfig
    out: Path  # the private folder to write into
    outputs: Path
    inputs: dict[str, Path] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # stage-specific manifest fields
    metrics: dict = field(default_factory=dict)  # stage-specific run-time figures (metrics file)
    wrote: list[Path] = field(default_factory=list)  # what the stage line names (default: its folder)
    terminal: int | None = None  # fd of the terminal while library output goes to the log
    summary: str = ""  # a second terminal line under the stage line, if any

    def status(self, text: str) -> None:
        """Overwrite the terminal's status line (when it is a terminal) with `text`; "" clears it."""
        fd = self.terminal
        if fd is not None and os.isatty(fd):
            os.write(fd, (f"\r  {self.name}: {text}\033[K" if text else "\r\033[K").encode())

    def progress(self, items, what: str):
        """Iterate `items`, showing `what i/n` on the status line."""
        items = list(items)
        for i, item in enumerate(items):
            self.status(f"{what} {i + 1}/{len(items)}")
            yield item
        self.status("")

    def read(self, label: str, path: Path) -> Path:
        """Record `path` as an input of this stage (hashed into the manifest)."""
        if not path.exists():
            raise PipelineError(f"{path}: input '{label}' not found")
        self.inputs[label] = path
        return path


def _input_hashes(inputs: dict[str, Path]) -> dict:
    out = {}
    for label, path in sorted(inputs.items()):
        tree = hash_tree(path)
        out[label] = tree[path.name] if path.is_file() else tree
    return out


def finish(ctx: StageContext, sections: tuple[str, ...], final: Path) -> None:
    """Write the manifest into the private folder and move it into place."""
    config: dict = {}
    for item in sections:  # "quant" (a whole section) or "evaluate.seed" (one key of one)
        name, _, key = item.partition(".")
        values = ctx.cfg.section(name)
        if key:
            config.setdefault(name, {})[key] = values[key]
        else:
            config[name] = values
    manifest = {
        "stage": ctx.name,
        "config": config,
        "inputs": _input_hashes(ctx.inputs),
        "outputs": hash_tree(ctx.out),
        "packages": package_versions(),
        **ctx.extra,
    }
    write_json(ctx.out / "manifest.json", manifest)
    if final.exists():
        shutil.rmtree(final)
    os.replace(ctx.out, final)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def stage_line(name: str, wall_s: float, rss_mb: float, wrote: list[Path]) -> str:
    what = ", ".join(f"{p.as_posix()}{'/' if p.is_dir() else ''} ({human_size(_size(p))})" for p in wrote)
    return f"{name:<16} {wall_s:6.1f} s {rss_mb:7.0f} MiB  {what}"


@contextlib.contextmanager
def library_output_to(log: Path | None):
    """Send what is written to fds 1 and 2 (Python and native code alike) to `log`; yields
    a duplicate of the terminal's stderr fd (None and no redirection when `log` is None)."""
    if log is None:
        yield None
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield saved_err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)


def run(
    name: str,
    body: Callable[[StageContext], None],
    sections: tuple[str, ...],
    argv: list[str] | None = None,
    outputs: Path = OUTPUTS,
    publish: Callable[[StageContext, Path], None] | None = None,
) -> int:
    """Run a stage body with config from params.yaml + argv overrides.

    `sections` are the config sections (or `section.key`s) the stage reads, recorded in its
    manifest: the same list as the stage's `params:` in dvc.yaml (tests/test_dag_deps.py).
    `publish`, if given, is called after the folder is in place (emit uses it to
    move user-facing files to fixed paths).
    Returns a process exit code; expected errors print one line, no traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    log = None if os.environ.get("LLAVA_VERBOSE", "") not in ("", "0") else outputs / "logs" / f"{name}.log"
    try:
        with library_output_to(log) as terminal:
            cfg = config_mod.load(Path("params.yaml"), argv, conf_dir=Path("conf"))
            final = outputs / name
            tmp = outputs / f".{name}.partial"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            ctx = StageContext(name=name, cfg=cfg, out=tmp, outputs=outputs, terminal=terminal)
            body(ctx)
            finish(ctx, sections, final)
            if publish is not None:
                publish(ctx, final)
    except (config_mod.ConfigError, PipelineError) as e:
        where = f" (library log: {log.as_posix()})" if log is not None and log.is_file() else ""
        print(f"error: {e}{where}", file=sys.stderr)
        return 2
    except BaseException:
        if log is not None and log.is_file():
            print(f"error in stage {name}; library log: {log.as_posix()}", file=sys.stderr)
        raise
    metrics_dir = outputs / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    import psutil

    figures = {
        # From process start: imports are a real part of a stage's cost.
        "process_wall_s": round(time.time() - psutil.Process().create_time(), 2),
        "work_wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": rss.peak_with_children_mb(),  # VmHWM, not ru_maxrss: see rss.py
        **ctx.metrics,
    }
    write_json(metrics_dir / f"{name}.json", figures)
    print(stage_line(name, figures["process_wall_s"], figures["peak_rss_mb"], ctx.wrote or [final]), flush=True)
    if ctx.summary:
        print(f"  {ctx.summary}", flush=True)
    return 0
