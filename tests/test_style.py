"""The code stays ruff-clean (lint and format): part of the test command, so CI enforces it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PATHS = ["distill", "export", "serve", "tests", "benchmarks", "examples"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    beside = Path(sys.executable).parent / "ruff"  # the venv's ruff, even when the venv is not activated
    exe = str(beside) if beside.exists() else shutil.which("ruff") or pytest.skip("ruff not installed (pip install -e '.[test]')")
    return subprocess.run([exe, *args, *PATHS], cwd=REPO, capture_output=True, text=True)


def test_ruff_check():
    res = ruff("check")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format():
    res = ruff("format", "--check")
    assert res.returncode == 0, res.stdout + res.stderr


def product_modules() -> set[str]:
    """Every product module by dotted name (package __init__ files stand for their package)."""
    out = set()
    for package in ("distill", "export", "serve"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_import_layers_hold_and_name_every_module():
    """The import graph flows one way (pyproject's import-linter contract), and no product module is left outside it."""
    import tomllib

    layers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    outside = {m for m in product_modules() if not any(m == n or m.startswith(n + ".") for n in named)} - {"distill", "distill.__init__"}
    assert not outside, f"modules in no layer of the import contract: {sorted(outside)}"
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter not installed (pip install -e '.[test]')")
    res = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_modules_and_functions_stay_small():
    """No product module over 400 lines, no function over 80 (the brief's style rule)."""
    import ast

    long_modules, long_functions = [], []
    for package in ("distill", "export", "serve"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if text.count("\n") > 400:
                long_modules.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_modules and not long_functions, long_modules + long_functions
