"""The LangChain tool over a sandbox session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_docker
from langchain_core.tools import BaseTool
from pydantic import Field

from critloop.errors import SandboxClosedError
from critloop.sandbox import SandboxConfig
from critloop.tools import PythonSandboxTool


@pytest.fixture(scope="module")
def docker_tool() -> Iterator[PythonSandboxTool]:
    require_docker()
    tool = PythonSandboxTool()
    yield tool
    tool.close()


@pytest.fixture(scope="module")
def local_tool() -> Iterator[PythonSandboxTool]:
    """One tool on the local backend for the module (each test names its own variables)."""
    tool = PythonSandboxTool(config=SandboxConfig(backend="local", pool_size=1))
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


def test_sync_calls_keep_state(local_tool: PythonSandboxTool) -> None:
    assert local_tool.invoke({"code": "sync_a = 20"}) == ""
    assert local_tool.invoke({"code": "sync_a += 1\nprint(sync_a * 2)"}) == "42"
    assert local_tool.invoke({"code": "print(sync_a)"}) == "21"


async def test_async_calls_keep_state_and_share_it_with_sync_calls(local_tool: PythonSandboxTool) -> None:
    assert await local_tool.ainvoke({"code": "async_b = [1, 2]"}) == ""
    assert await local_tool.ainvoke({"code": "async_b.append(3)\nprint(sum(async_b))"}) == "6"
    # A sync call from inside a running loop (this test's) is handed to another thread.
    assert local_tool.invoke({"code": "async_b.append(4)\nprint(async_b)"}) == "[1, 2, 3, 4]"
    assert await local_tool.ainvoke({"code": "print(len(async_b))"}) == "4"


async def test_concurrent_async_calls_from_one_loop(local_tool: PythonSandboxTool) -> None:
    outputs = await asyncio.gather(*(local_tool.ainvoke({"code": f"print({k} * {k})"}) for k in range(12)))
    assert outputs == [str(k * k) for k in range(12)]


def test_calls_from_two_event_loops_share_the_session(local_tool: PythonSandboxTool) -> None:
    assert asyncio.run(local_tool.ainvoke({"code": "loops_c = 'first loop'"})) == ""
    assert asyncio.run(local_tool.ainvoke({"code": "print(loops_c)"})) == "first loop"
    assert local_tool.invoke({"code": "print(loops_c.upper())"}) == "FIRST LOOP"


def test_state_outlives_the_thread_that_made_the_first_call() -> None:
    """The kernel is not tied to the thread that happened to start it (a local kernel under
    bubblewrap dies with the thread that forked it)."""
    tool = PythonSandboxTool(config=SandboxConfig(backend="local", pool_size=1))
    outputs: list[str] = []
    try:
        for code in ("g = 'kept'", "g += '!'"):
            _run_together(
                [threading.Thread(target=lambda code=code: outputs.append(tool.invoke({"code": code})))]
            )
        assert outputs == ["", ""]
        assert tool.invoke({"code": "print(g)"}) == "kept!"
    finally:
        tool.close()


def _run_together(threads: list[threading.Thread]) -> None:
    """Start the threads, wait for them (bounded), and insist that none is left running."""
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)


def _count_code(tag: str, k: int) -> str:
    # Each call adds one to a shared counter and echoes its own tag: calls run one at a time.
    return f"count_d = globals().get('count_d', 0) + 1\nprint('{tag}', {k})"


def test_two_threads_invoking_at_once_both_get_their_answers(local_tool: PythonSandboxTool) -> None:
    calls = 25
    start = threading.Barrier(2)
    wrong: list[tuple[str, int, str]] = []

    def caller(tag: str) -> None:
        start.wait()
        for k in range(calls):
            out = local_tool.invoke({"code": _count_code(tag, k)})
            if out != f"{tag} {k}":
                wrong.append((tag, k, out))

    _run_together([threading.Thread(target=caller, args=(tag,)) for tag in ("left", "right")])
    assert wrong == []
    assert local_tool.invoke({"code": "print(count_d)"}) == str(2 * calls)


def test_sync_and_async_callers_in_several_threads_at_once() -> None:
    """A thread invoking, and two threads each with an event loop of its own awaiting ainvoke,
    all at the same time on one tool."""
    tool = PythonSandboxTool(config=SandboxConfig(backend="local", pool_size=1))
    calls = 15
    start = threading.Barrier(3)
    wrong: list[tuple[str, int, str]] = []

    def sync_caller() -> None:
        start.wait()
        for k in range(calls):
            out = tool.invoke({"code": _count_code("sync", k)})
            if out != f"sync {k}":
                wrong.append(("sync", k, out))

    def async_caller(tag: str) -> None:
        async def run() -> None:
            start.wait()
            for k in range(calls):
                out = await tool.ainvoke({"code": _count_code(tag, k)})
                if out != f"{tag} {k}":
                    wrong.append((tag, k, out))

        asyncio.run(run())

    threads = [
        threading.Thread(target=sync_caller),
        threading.Thread(target=async_caller, args=("loop1",)),
        threading.Thread(target=async_caller, args=("loop2",)),
    ]
    try:
        _run_together(threads)
        assert wrong == []
        assert tool.invoke({"code": "print(count_d)"}) == str(3 * calls)
    finally:
        tool.close()


async def test_close_from_async_code_stops_the_pool_and_the_tool_starts_again() -> None:
    tool = PythonSandboxTool(config=SandboxConfig(backend="local", pool_size=1))
    try:
        assert await tool.ainvoke({"code": "e = 1"}) == ""
        runner = tool._runner
        assert runner is not None and runner.pool.status().kernels == 1
        tool.close()  # inside this test's running loop
        assert runner.closed and runner.pool.status().kernels == 0
        assert "NameError" in await tool.ainvoke({"code": "e"})  # a new session
        assert tool.invoke({"code": "print('again')"}) == "again"
    finally:
        tool.close()


class _SignallingTool(PythonSandboxTool):
    """Sets ``started`` when a call begins to run on the tool's loop."""

    started: threading.Event = Field(default_factory=threading.Event)

    async def _execute(self, runner: Any, code: str) -> str:
        self.started.set()
        return await super()._execute(runner, code)


def test_close_ends_a_call_in_progress_in_another_thread() -> None:
    tool = _SignallingTool(config=SandboxConfig(backend="local", pool_size=1), timeout_seconds=600)
    outcome: list[str] = []

    def caller() -> None:
        try:
            outcome.append(tool.invoke({"code": "import time\ntime.sleep(600)"}))
        except SandboxClosedError as exc:
            outcome.append(f"closed: {exc}")

    thread = threading.Thread(target=caller)
    try:
        assert tool.invoke({"code": "pass"}) == ""  # the session is open
        tool.started.clear()
        thread.start()
        assert tool.started.wait(timeout=120)
        tool.close()
        thread.join(timeout=120)
        assert not thread.is_alive()  # not after the 600 s the code asked for
        assert len(outcome) == 1
        assert outcome[0].startswith(("[status: killed", "closed: "))
        assert tool.invoke({"code": "print('after')"}) == "after"
    finally:
        tool.close()
        thread.join(timeout=120)


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def _tree(pid: int) -> set[int]:
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        with contextlib.suppress(OSError):  # exited meanwhile
            todo.extend(_children(current))
    return tree


def _kill_and_wait(pids: set[int]) -> None:
    """SIGKILL ``pids`` and wait until each has exited (on pidfds: no polling)."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
            os.kill(pid, signal.SIGKILL)
    try:
        for fd in fds:
            ready, _, _ = select.select([fd], [], [], 30)
            assert ready, "a killed kernel process did not exit"
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(
    not hasattr(os, "pidfd_open") or not Path(f"/proc/{os.getpid()}/task").is_dir(), reason="Linux only"
)
def test_a_kernel_that_died_between_calls_is_replaced_before_the_next_call() -> None:
    """The tool's loop runs only during calls: the next call first sees what happened meanwhile
    (here: its kernel was killed), and moves the session to a new kernel."""
    before = _children(os.getpid())
    tool = PythonSandboxTool(config=SandboxConfig(backend="local", pool_size=1))
    try:
        assert tool.invoke({"code": "f = 'state'\nprint(f)"}) == "state"
        kernels = _children(os.getpid()) - before
        assert kernels
        _kill_and_wait(set().union(*(_tree(pid) for pid in kernels)))
        assert tool.invoke({"code": "print(6 * 7)"}) == "42"  # not "[status: killed ...]"
        assert tool.invoke({"code": "print('f' in globals())"}) == "False"
    finally:
        tool.close()


# A script that uses the tool and never closes it, as LangChain users write them: sync calls,
# or async calls from asyncio.run.
UNCLOSED = """
import asyncio, os, sys
from critloop.sandbox import SandboxConfig
from critloop.tools import PythonSandboxTool
tool = PythonSandboxTool(config=SandboxConfig(backend=sys.argv[1], pool_size=1))
if sys.argv[2] == "async":
    output = asyncio.run(tool.ainvoke({"code": "print(6*7)"}))
else:
    output = tool.invoke({"code": "print(6*7)"})
print(output, os.getpid(), flush=True)
"""


def _run_unclosed(backend: str, mode: str = "sync") -> tuple[str, int, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", UNCLOSED, backend, mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    output, pid = done.stdout.split()
    return output, int(pid), elapsed


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_script_that_never_closes_the_tool_exits(mode: str) -> None:
    output, _, elapsed = _run_unclosed("local", mode)
    assert output == "42"
    assert elapsed < 30  # it used to wait forever on the stopped loop's future


@pytest.mark.docker
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_script_that_never_closes_the_tool_exits_and_leaves_no_container(mode: str) -> None:
    from critloop.sandbox.docker_backend import docker_client

    output, pid, elapsed = _run_unclosed("docker", mode)
    assert output == "42" and elapsed < 60
    left = docker_client().containers.list(all=True, filters={"label": f"io.critloop.owner.pid={pid}"})
    assert left == []
