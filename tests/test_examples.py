"""`make demo` runs examples/sandbox_demo.py: it must keep working as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import require_docker

DEMO = Path(__file__).resolve().parents[1] / "examples" / "sandbox_demo.py"


def test_the_sandbox_demo_runs() -> None:
    require_docker()
    done = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "backend: docker (isolated: True), kernels: 2"
    assert "  [Code Output] [2, 3]" in lines[2]
    assert "5 claimed 6 -> WRONG" in lines[4]
    assert "fork diverges: [2, 3, 99] vs [2, 3]" in lines
    assert any(
        line.startswith("infinite loop: timeout after") and "state survived: True" in line for line in lines
    )
    assert "network egress: OSError: [Errno 101] Network is unreachable" in lines
    assert lines[-1] == "LangChain tool python_sandbox -> 385"
