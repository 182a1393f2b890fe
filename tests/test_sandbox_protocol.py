"""The sandbox protocol suite: the same behaviour on the Docker and the local backend."""

from __future__ import annotations

import asyncio
import os
import platform

import pytest

from critloop.errors import SandboxClosedError
from critloop.sandbox import SandboxConfig, SandboxPool


async def test_state_persists_across_execs(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        assert (await session.exec("import fractions\nx = fractions.Fraction(1, 3)")).ok
        result = await session.exec("print(x * 3)")
        assert (result.status, result.stdout, result.state_survived) == ("ok", "1\n", True)


async def test_last_expression_is_echoed_like_a_notebook(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        assert (await session.exec("y = 5\ny * 2")).stdout == "10\n"
        assert (await session.exec("None")).stdout == ""


async def test_math_libraries_are_preimported(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        result = await session.exec(
            "import sys\nprint(all(m in sys.modules for m in ('math', 'numpy', 'sympy')))\n"
            "import sympy, numpy\nx = sympy.Symbol('x')\nprint(sympy.factor(x**2 - 1), numpy.arange(3).sum())"
        )
        assert result.stdout == "True\n(x - 1)*(x + 1) 3\n"


def _kernel_can_collapse() -> bool:
    """Whether the kernel has MADV_COLLAPSE at all (Linux >= 6.1 built with huge-page support)."""
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 1) and os.path.isdir("/sys/kernel/mm/transparent_hugepage")


def _host_collapses_huge_pages() -> bool:
    """Whether this host lets a process collapse its heap into huge pages (MADV_COLLAPSE, THP on)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            enabled = "[never]" not in f.read()
    except OSError:
        return False
    return enabled and _kernel_can_collapse() and os.path.exists("/proc/self/smaps_rollup")


async def test_sessions_fork_from_a_frozen_template(backend_pool: SandboxPool) -> None:
    # Sessions are forks of the template: its objects are frozen out of the collector, so a
    # session's collections never touch (and copy) the template's pages.
    async with await backend_pool.open_session() as session:
        frozen = await session.exec("import gc\nprint(gc.get_freeze_count() > 10000)")
    assert frozen.stdout == "True\n"
    huge = [kernel["template_huge_pages_mb"] for kernel in await backend_pool.ping()]
    assert huge and all(mb % 2 == 0 for mb in huge), huge  # whole 2 MiB pages, or nothing
    if _host_collapses_huge_pages():
        assert all(mb >= 2 for mb in huge), huge  # the heap is (partly) in 2 MiB pages
    elif not _kernel_can_collapse():
        assert huge == [0] * len(huge), huge  # nothing collapsed, nothing claimed


async def test_output_is_captured_at_file_descriptor_level(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        code = (
            "import os, subprocess, sys\n"
            "print('py-out'); print('py-err', file=sys.stderr)\n"
            "os.write(1, b'fd-out\\n'); os.write(2, b'fd-err\\n')\n"
            "_ = subprocess.run([sys.executable, '-c', 'print(\"child-out\")'], check=True)\n"
        )
        result = await session.exec(code)
        assert result.ok, result.stderr
        assert result.stdout == "py-out\nfd-out\nchild-out\n"
        assert result.stderr == "py-err\nfd-err\n"


async def test_errors_come_back_as_tracebacks(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        await session.exec("kept = 1")
        result = await session.exec("def f():\n    return 1 / 0\nf()")
        assert result.status == "error"
        assert result.error == "ZeroDivisionError: division by zero"
        assert "Traceback (most recent call last)" in result.stderr
        assert 'File "<cell>", line 2, in f' in result.stderr
        assert "kernel.py" not in result.stderr  # only the user's frames
        assert result.state_survived
        assert (await session.exec("print(kept)")).stdout == "1\n"


async def test_syntax_errors_are_errors(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        result = await session.exec("def broken(:\n")
        assert result.status == "error"
        assert result.error is not None and result.error.startswith("SyntaxError")


async def test_fork_copies_state_and_the_copies_diverge(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as parent:
        await parent.exec("items = [1, 2]\nopen('notes.txt', 'w').write('parent')")
        async with await parent.fork() as clone:
            assert clone.id != parent.id
            await clone.exec("items.append('clone')\nopen('notes.txt', 'w').write('clone')")
            await parent.exec("items.append('parent')")
            assert (await clone.exec("print(items, open('notes.txt').read())")).stdout == (
                "[1, 2, 'clone'] clone\n"
            )
            assert (await parent.exec("print(items, open('notes.txt').read())")).stdout == (
                "[1, 2, 'parent'] parent\n"
            )


async def test_a_fork_outlives_its_parent(backend_pool: SandboxPool) -> None:
    before = sum(k["processes"] for k in await backend_pool.ping())
    parent = await backend_pool.open_session()
    await parent.exec("import subprocess\nz = 'snapshot'\nmine = subprocess.Popen(['sleep', '60'])")
    clone = await parent.fork()
    # The clone is the parent's own child process: closing the parent kills the parent's
    # processes, never the clone's.
    await parent.close()
    assert (await clone.exec("print(z)")).stdout == "snapshot\n"
    await clone.exec("import subprocess\ntheirs = subprocess.Popen(['sleep', '60'])")
    assert sum(k["processes"] for k in await backend_pool.ping()) == before + 2
    await clone.close()
    assert sum(k["processes"] for k in await backend_pool.ping()) == before


async def test_a_fork_outlives_its_parent_killed_at_a_deadline(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as parent:
        await parent.exec("z = 'snapshot'")
        async with await parent.fork() as clone:
            # A run that ignores the interrupt is killed with its worker (and the session
            # replaced by a fresh one); the clone below that worker lives on.
            hung = await parent.exec(
                "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)",
                timeout=0.2,
            )
            assert hung.status == "timeout" and not hung.state_survived
            assert (await clone.exec("print(z)")).stdout == "snapshot\n"


async def test_closing_a_fork_leaves_its_parent_working(backend_pool: SandboxPool) -> None:
    before = sum(k["processes"] for k in await backend_pool.ping())
    async with await backend_pool.open_session() as parent:
        await parent.exec("z = 1")
        for i in range(3):
            clone = await parent.fork()
            await clone.exec(f"z = {i + 10}")
            await clone.close()
        assert (await parent.exec("print(z)")).stdout == "1\n"
        assert sum(k["processes"] for k in await backend_pool.ping()) == before + 1
    assert sum(k["processes"] for k in await backend_pool.ping()) == before


async def test_reset_clears_variables_and_files(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        await session.exec("secret = 42\nopen('f.txt', 'w').write('x')")
        await session.reset()
        result = await session.exec("import os\nprint('secret' in globals(), os.listdir('.'))")
        assert result.stdout == "False []\n"


async def test_timeout_interrupts_and_keeps_state(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        await session.exec("kept = 'yes'")
        result = await session.exec("while True:\n    pass", timeout=0.3)
        assert result.status == "timeout"
        assert result.state_survived
        assert "KeyboardInterrupt" in result.stderr
        assert 0.3 <= result.duration < 2.0
        assert (await session.exec("print(kept)")).stdout == "yes\n"


async def test_timeout_kills_code_that_ignores_the_interrupt(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        await session.exec("kept = 'yes'")
        result = await session.exec(
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
            timeout=0.3,
        )
        assert (result.status, result.state_survived) == ("timeout", False)
        assert result.error is not None and "killed" in result.error
        after = await session.exec("print('kept' in globals())")
        assert (after.status, after.stdout) == ("ok", "False\n")


async def test_worker_death_is_reported_and_the_session_goes_on(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        result = await session.exec("import os\nos._exit(7)")
        assert (result.status, result.state_survived) == ("killed", False)
        assert result.error is not None and "exit code 7" in result.error
        assert (await session.exec("print('alive')")).stdout == "alive\n"


async def test_output_is_capped_with_a_visible_marker(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        result = await session.exec("print('a' * 10_000)", max_output=1000)
        assert result.truncated
        assert result.stdout.startswith("a" * 1000)
        assert "[... output truncated: 9001 more bytes not shown ...]" in result.stdout


async def test_non_utf8_output_is_replaced_not_fatal(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        result = await session.exec("import os\n_ = os.write(1, b'ok \\xff\\xfe end')")
        assert result.ok and result.stdout == "ok \ufffd\ufffd end"


async def test_text_view_lists_output_then_status(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        result = await session.exec("print('partial')\nraise ValueError('bad value')")
        text = result.text()
        assert text.startswith("partial\nTraceback")
        assert text.endswith("[status: error: ValueError: bad value]")


async def test_many_sessions_run_concurrently(backend_pool: SandboxPool) -> None:
    sessions = await asyncio.gather(*(backend_pool.open_session() for _ in range(16)))
    try:
        results = await asyncio.gather(
            *(s.exec(f"import time\ntime.sleep(0.3)\nprint({i})") for i, s in enumerate(sessions))
        )
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(16)]
        # 16 runs of 0.3 s each finish together, not one after another (4.8 s).
        assert max(r.duration for r in results) < 2.5
        assert len({s.id for s in sessions}) == 16
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


async def test_calls_on_one_session_are_serialised(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as session:
        await session.exec("log = []")
        await asyncio.gather(*(session.exec(f"log.append({i})") for i in range(10)))
        assert (await session.exec("print(sorted(log))")).stdout == f"{list(range(10))}\n"


async def test_sessions_are_isolated_from_each_other(backend_pool: SandboxPool) -> None:
    async with await backend_pool.open_session() as a, await backend_pool.open_session() as b:
        await a.exec("import math\nmath.pi = 3\nshared = 1\nopen('mine.txt', 'w').write('a')")
        result = await b.exec(
            "import math, os\nprint(math.pi > 3.14, 'shared' in globals(), os.listdir('.'))"
        )
        assert result.stdout == "True False []\n"


async def test_closed_session_refuses_work(backend_pool: SandboxPool) -> None:
    session = await backend_pool.open_session()
    await session.close()
    await session.close()  # idempotent
    with pytest.raises(SandboxClosedError):
        await session.exec("print(1)")


async def test_closing_a_session_frees_its_processes(backend_pool: SandboxPool) -> None:
    before = sum(k["processes"] for k in await backend_pool.ping())
    session = await backend_pool.open_session()
    await session.exec("import subprocess\nsubprocess.Popen(['sleep', '60'])")
    assert sum(k["processes"] for k in await backend_pool.ping()) >= before + 2
    await session.close()
    assert sum(k["processes"] for k in await backend_pool.ping()) == before


async def test_released_session_is_uncounted_at_once_and_freed_in_the_background(
    backend_pool: SandboxPool,
) -> None:
    before = sum(k["processes"] for k in await backend_pool.ping())
    sessions = backend_pool.status().sessions
    session = await backend_pool.open_session()
    await session.exec("import subprocess\nsubprocess.Popen(['sleep', '60'])")
    session.release()
    session.release()  # idempotent
    assert session.closed and backend_pool.status().sessions == sessions
    with pytest.raises(SandboxClosedError):
        await session.exec("print(1)")
    await backend_pool.settle()
    assert sum(k["processes"] for k in await backend_pool.ping()) == before


async def test_closing_the_pool_waits_for_released_sessions() -> None:
    own = await SandboxPool(SandboxConfig(backend="local", pool_size=1)).start()
    try:
        session = await own.open_session()
        session.release()
        assert own._releasing
    finally:
        await own.close()
    assert not own._releasing


async def test_concurrent_sessions_never_mix_outputs(backend_pool: SandboxPool) -> None:
    """Pipes of one run are never read or closed by another (regression: fd reuse)."""
    sessions = await asyncio.gather(*(backend_pool.open_session() for _ in range(8)))

    async def drive(i: int) -> list[str]:
        wrong = []
        for k in range(150):
            result = await sessions[i].exec(f"print('s{i}-{k}')")
            if (result.status, result.stdout) != ("ok", f"s{i}-{k}\n"):
                wrong.append(f"{result.status}: {result.stdout!r}")
        return wrong

    try:
        outcomes = await asyncio.gather(*(drive(i) for i in range(8)))
        assert [w for w in outcomes if w] == []
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
