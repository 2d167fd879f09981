"""pyproject.toml's metadata agrees with what it pins and with what make lint checks."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())


def _python_floor() -> str:
    m = re.fullmatch(r">=\s*(3\.\d+)", PYPROJECT["project"]["requires-python"])
    assert m, PYPROJECT["project"]["requires-python"]
    return m[1]


def test_requires_python_is_a_version_every_installed_pin_supports():
    # numpy 2.4, transformers 5, pillow 13 and others need Python 3.11 (so does config.py's
    # StrEnum): a lower floor promises installs that cannot work.
    floor = _python_floor()
    pins = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["test"]]
    checked, refused = [], []
    for pin in pins:
        name = Requirement(pin).name
        try:
            needs = importlib.metadata.metadata(name).get("Requires-Python")
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing to read
        checked.append(name)
        if needs and not SpecifierSet(needs).contains(f"{floor}.0"):
            refused.append(f"{name} (Requires-Python {needs})")
    assert "numpy" in checked and "transformers" in checked
    assert not refused, f"requires-python >={floor}, but {', '.join(refused)}"


def test_the_type_checker_checks_the_oldest_python_the_project_admits():
    assert PYPROJECT["tool"]["mypy"]["python_version"] == _python_floor()
