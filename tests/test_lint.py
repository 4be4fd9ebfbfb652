"""The code is lint-clean by the project's configuration (pyproject.toml, [tool.ruff]): pyflakes' errors
(undefined and unused names) and pycodestyle's within 120 columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="pip install -e '.[test]' installs ruff")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "edgemtp", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
