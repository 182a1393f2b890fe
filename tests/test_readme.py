"""The README's Python examples run as written and print what their comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_docker

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
EXPECTED = ["ok [2, 3]\nx\ntimeout True\n", "385\n"]


def test_every_python_block_has_an_expectation() -> None:
    assert len(BLOCKS) == len(EXPECTED)


@pytest.mark.parametrize(("code", "expected"), list(zip(BLOCKS, EXPECTED, strict=True)))
def test_readme_example_runs(code: str, expected: str, tmp_path: Path) -> None:
    require_docker()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected
