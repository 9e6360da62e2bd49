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
