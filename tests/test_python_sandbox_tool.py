"""The LangChain tool over a sandbox session."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import require_docker
from langchain_core.tools import BaseTool

from critloop.sandbox import SandboxConfig
from critloop.tools import PythonSandboxTool


@pytest.fixture(scope="module")
def docker_tool() -> Iterator[PythonSandboxTool]:
    require_docker()
    tool = PythonSandboxTool()
    yield tool
    tool.close()


def test_tool_contract() -> None:
    tool = PythonSandboxTool(config=SandboxConfig(backend="local", pool_size=1))
    assert isinstance(tool, BaseTool)
    assert tool.name == "python_sandbox"
    assert list(tool.args) == ["code"]
    assert tool.args["code"]["type"] == "string"


@pytest.mark.docker
def test_tool_chooses_docker_and_keeps_state(docker_tool: PythonSandboxTool) -> None:
    assert docker_tool.invoke({"code": "x = 2 ** 10"}) == ""
    assert docker_tool.invoke({"code": "print(x)"}) == "1024"
    assert docker_tool._runner is not None and docker_tool._runner.pool.status().backend == "docker"


@pytest.mark.docker
def test_tool_reports_errors_with_a_status_line(docker_tool: PythonSandboxTool) -> None:
    out = docker_tool.invoke({"code": "print('before')\nundefined_name"})
    lines = out.splitlines()
    assert lines[0] == "before"
    assert "NameError: name 'undefined_name' is not defined" in out
    assert lines[-1] == "[status: error: NameError: name 'undefined_name' is not defined]"


@pytest.mark.docker
def test_tool_reports_timeouts(docker_tool: PythonSandboxTool) -> None:
    tool = PythonSandboxTool(timeout_seconds=0.3)
    try:
        out = tool.invoke({"code": "import time\ntime.sleep(30)"})
        assert out.endswith("[status: timeout: timed out after 0.3s]")
    finally:
        tool.close()


@pytest.mark.docker
async def test_tool_works_from_async_code(docker_tool: PythonSandboxTool) -> None:
    assert await docker_tool.ainvoke({"code": "y = 7"}) == ""
    assert await docker_tool.ainvoke({"code": "print(y * 6)"}) == "42"


@pytest.mark.docker
def test_tool_reset_and_reuse_after_close() -> None:
    tool = PythonSandboxTool()
    tool.invoke({"code": "z = 1"})
    tool.reset()
    assert "NameError" in tool.invoke({"code": "z"})
    tool.close()
    assert tool.invoke({"code": "print('again')"}) == "again"  # a closed tool starts anew
    tool.close()


def test_tool_on_the_local_backend() -> None:
    tool = PythonSandboxTool(config=SandboxConfig(backend="local", pool_size=1))
    try:
        tool.invoke({"code": "import sympy\nroots = sympy.solve('x**2 - 5*x + 6')"})
        assert tool.invoke({"code": "print(sum(roots))"}) == "5"
    finally:
        tool.close()


# A script that uses the tool and never closes it, as LangChain users write them.
UNCLOSED = """
import os, sys
from critloop.sandbox import SandboxConfig
from critloop.tools import PythonSandboxTool
tool = PythonSandboxTool(config=SandboxConfig(backend=sys.argv[1], pool_size=1))
print(tool.invoke({"code": "print(6*7)"}), os.getpid(), flush=True)
"""


def _run_unclosed(backend: str) -> tuple[str, int, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", UNCLOSED, backend], capture_output=True, text=True, timeout=120, check=False
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    output, pid = done.stdout.split()
    return output, int(pid), elapsed


def test_a_script_that_never_closes_the_tool_exits() -> None:
    output, _, elapsed = _run_unclosed("local")
    assert output == "42"
    assert elapsed < 30  # it used to wait forever on the stopped loop's future


@pytest.mark.docker
def test_a_script_that_never_closes_the_tool_exits_and_leaves_no_container() -> None:
    from critloop.sandbox.docker_backend import docker_client

    output, pid, elapsed = _run_unclosed("docker")
    assert output == "42" and elapsed < 60
    left = docker_client().containers.list(all=True, filters={"label": f"io.critloop.owner.pid={pid}"})
    assert left == []
