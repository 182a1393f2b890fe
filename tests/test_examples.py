"""The examples: the sandbox tour (examples/sandbox_demo.py) keeps working as written, and
`make demo` runs the refine loop on a problem shipped in examples/problems/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "sandbox_demo.py"
PROBLEMS = ROOT / "examples" / "problems"


@pytest.mark.slow
@pytest.mark.docker
def test_the_sandbox_demo_runs() -> None:
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


def test_the_shipped_problems_are_small_text_problems() -> None:
    problems = sorted(PROBLEMS.glob("*.txt"))
    assert PROBLEMS / "arithmetic.txt" in problems and len(problems) >= 2
    for path in problems:
        text = path.read_text(encoding="utf-8").strip()
        assert text and "?" in text and len(text) < 300, path


def test_make_demo_sets_up_then_runs_the_loop_on_a_shipped_problem() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry_run = ["make", "-n", "demo", "VENV=.venv"]
    done = subprocess.run(dry_run, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.splitlines()
    fetch = commands.index(".venv/bin/critloop models fetch")
    build = next(i for i, c in enumerate(commands) if "critloop sandbox build" in c)
    solve = commands.index(".venv/bin/critloop solve --file examples/problems/arithmetic.txt --max-rounds 1")
    assert fetch < solve and build < solve
