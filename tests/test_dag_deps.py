"""dvc.yaml's hand-kept declarations match the code: each stage's deps cover every module of
this project it imports (directly or through other modules, function-local imports included), and
its params are the config keys its manifest records."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

PACKAGES = ("llava_pipeline", "stages")


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names of this project's modules that `path` imports anywhere in its body."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    else:  # a package's own relative imports are relative to the package
        package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES and _module_file(n) is not None)
    return found


def _closure(start: Path) -> set[Path]:
    seen, todo = {start}, [start]
    while todo:
        for name in _imports(todo.pop()):
            path = _module_file(name)
            if path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _docstring_only(path: Path) -> bool:
    """A package __init__ that holds at most a docstring runs no code: no output depends on it."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str) for n in body
    )


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_list_every_module_the_stage_imports(name):
    deps = [ROOT / d for d in STAGES[name]["deps"]]
    listed = lambda p: any(p == d or d in p.parents for d in deps)  # noqa: E731
    code = _closure(ROOT / "stages" / f"{name}.py")
    missing = sorted(p.relative_to(ROOT).as_posix() for p in code if not listed(p) and not _docstring_only(p))
    assert not missing, f"dvc.yaml stage {name}: add to deps: {missing}"


def _keys(entries, params: dict) -> set[str]:
    """`quant` -> every quant.* key in params.yaml; `quant.scheme` -> itself."""
    out = set()
    for entry in entries:
        section, _, key = entry.partition(".")
        out |= {f"{section}.{key}"} if key else {f"{section}.{k}" for k in params[section]}
    return out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_manifest_records_exactly_the_params_dvc_tracks(name):
    """A stage's manifest config and its dvc.yaml `params:` are the same keys: a key in the
    manifest that DVC does not track would make the output's bytes change without a re-run."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tracked = _keys(STAGES[name].get("params", []), params)
    recorded = _keys(importlib.import_module(f"stages.{name}").SECTIONS, params)
    assert recorded == tracked, f"stage {name}: manifest {sorted(recorded)} vs dvc.yaml {sorted(tracked)}"


def _interpolate(text: str, params: dict) -> str:
    """dvc.yaml's `${section.key}` templates, filled from params.yaml as DVC fills them."""
    import re

    def value(match: re.Match) -> str:
        section, key = match.group(1).split(".", 1)
        return str(params[section][key])

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def test_committed_lock_matches_the_checked_in_sources_and_params():
    """dvc.lock records the md5 of every source file a stage depends on and the values of its
    params; a code or params.yaml change committed without `dvc repro` leaves a lock that a clean
    clone's `dvc status` reports as changed (the slow test_dvc checks find it after minutes, this
    in a second)."""
    import hashlib

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert sorted(lock) == sorted(STAGES), "dvc.lock and dvc.yaml list different stages: run dvc repro"
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stale = []
    for name, entry in lock.items():
        locked = {dep["path"] for dep in entry.get("deps", [])}
        wanted = {_interpolate(d, params) for d in declared[name].get("deps", [])}
        if locked != wanted:  # a dep added to or dropped from dvc.yaml since the lock was written
            stale.append(
                f"{name}: deps not in the lock {sorted(wanted - locked)}, no longer declared {sorted(locked - wanted)}"
            )
        for dep in entry.get("deps", []):
            path = ROOT / dep["path"]
            if not path.exists() and not dep["path"].startswith("outputs/"):
                stale.append(f"{name}: {dep['path']} is gone")
            elif path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                stale.append(f"{name}: {dep['path']}")
        for values in entry.get("params", {}).values():
            for key, value in values.items():
                section, _, sub = key.partition(".")
                current = params[section][sub] if sub else params[section]
                if current != value:
                    stale.append(f"{name}: {key} = {current!r}, lock has {value!r}")
    assert not stale, f"dvc.lock is stale (run dvc repro, commit dvc.lock): {stale}"
