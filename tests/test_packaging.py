"""The installed package holds every subpackage: pyproject's explicit package list must name each folder of
bnfold/ (and cli/, models/) that has an __init__.py, or a non-editable install (`pip install .`, the README's
Quick start) lacks it while the editable development install does not notice."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the two lines are plain literals)
    listed = set(ast.literal_eval(re.search(r"^packages = (\[.*\])$", text, re.M).group(1)))
    pairs = re.search(r"^package-dir = \{(.*)\}$", text, re.M).group(1)
    dirs = {pkg: ROOT / folder for pkg, folder in re.findall(r'"([\w.]+)" = "([\w./]+)"', pairs)}
    assert set(dirs) == {"bnfold", "bnfold.cli", "bnfold.models"}
    found = set()
    for pkg, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((pkg, *rel)))
    assert found - listed == set(), f"add to pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
