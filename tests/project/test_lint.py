"""The code stays clean under the project's ruff settings (pyproject [tool.ruff]: pyflakes, pycodestyle, import order,
120 columns): one ruff run over the checkout, a second or so."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

ROOT = REPO_ROOT


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
