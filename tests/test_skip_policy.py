"""CI's rule on skips (tests/skip_policy.py), on a throwaway test file run by a real pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

CASES = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no engine answers")

@pytest.mark.skipif(True, reason="machine limit: no user namespaces")
def test_machine_cannot():
    pass

@pytest.mark.xfail(strict=True, reason="a known limit")
def test_known_limit():
    raise AssertionError
"""


def run_pytest(tmp_path: Path, no_skips: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "CRITLOOP_NO_SKIPS": "1" if no_skips else "0"}
    command = [sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:cacheprovider", "-q", "-rs"]
    return subprocess.run(
        [*command, "test_cases.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_under_no_skips_a_skip_fails_the_run_and_is_listed(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, no_skips=True)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    assert "skipped tests fail this run (CRITLOOP_NO_SKIPS=1)" in done.stdout
    assert "test_cases.py::test_skips: no engine answers" in done.stdout
    # What the machine cannot provide, and expected failures, are not held against the run.
    assert "test_cases.py::test_machine_cannot:" not in done.stdout
    assert "test_cases.py::test_known_limit:" not in done.stdout


def test_without_the_rule_skips_pass(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, no_skips=False)
    assert done.returncode == pytest.ExitCode.OK, done.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in done.stdout
    assert "skipped tests fail this run" not in done.stdout
