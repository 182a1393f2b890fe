"""The llama.cpp fixture reports a server that died: its signal and the end of its stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from model_fixtures import LlamaServerProcess

CRASH = (
    "import os, signal, sys\n"
    "sys.stderr.write('ggml: illegal instruction at 0x1\\n')\n"
    "os.kill(os.getpid(), signal.SIGSEGV)"
)


def dead_server(tmp_path: Path, code: str) -> LlamaServerProcess:
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", code], stderr=stderr)
    process.wait(timeout=30)
    return LlamaServerProcess(process=process, stderr_path=stderr_path, base_url="http://127.0.0.1:9/v1")


def test_a_server_killed_by_a_signal_is_named_with_its_stderr(tmp_path: Path) -> None:
    server = dead_server(tmp_path, CRASH)
    problem = server.death()
    assert problem is not None
    assert f"(pid {server.process.pid}) was killed by SIGSEGV" in problem
    assert problem.endswith("ggml: illegal instruction at 0x1")
    with pytest.raises(pytest.fail.Exception, match="killed by SIGSEGV"):
        server.check()


def test_a_server_that_exited_gives_its_code(tmp_path: Path) -> None:
    problem = dead_server(tmp_path, "raise SystemExit(3)").death()
    assert problem is not None and "exited with code 3" in problem and problem.endswith("(nothing)")


def test_a_live_server_has_no_death(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        server = LlamaServerProcess(process=process, stderr_path=tmp_path / "none", base_url="")
        assert server.death() is None
        server.check()
    finally:
        process.kill()
        process.wait()
