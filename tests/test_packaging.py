"""What pyproject.toml promises matches the code."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Standard-library modules the code may import, with the Python version that added them.
NEW_STDLIB = {"tomllib": (3, 11)}


def _min_python(spec: str) -> tuple[int, int]:
    assert spec.startswith(">="), spec
    major, minor = spec[2:].split(".")[:2]
    return int(major), int(minor)


def test_requires_python_covers_the_imports_and_ruffs_target():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = _min_python(project["project"]["requires-python"])
    needed = (3, 0)
    for folder in ("llmfs", "codec", "cache"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom) and node.module
                    else []
                )
                for name in names:
                    needed = max(needed, NEW_STDLIB.get(name.split(".")[0], (3, 0)))
    assert declared >= needed, f"the code imports a module of Python {needed}"
    target = project["tool"]["ruff"]["target-version"]
    assert target == f"py{declared[0]}{declared[1]}"
    assert sys.version_info[:2] >= declared
