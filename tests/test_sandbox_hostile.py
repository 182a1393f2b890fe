"""Hostile-code containment suite for the Docker sandbox.

Every case runs code that tries to do harm (hang, fork, eat memory or disk, flood output, reach the
network or the host, escalate privileges, kill its supervisor, leak state) and asserts two things:
the bad effect did not happen or stayed bounded, and a fresh session still works afterwards.

The module runs on its own pool (one kernel, so that sessions share a container where a case needs
it), so that cases which kill a whole container never disturb the other test modules.
Sessions on one kernel are tenants of their own (a user id, a folder and a disk each, and a /proc
that shows their own processes only): the section "sessions against each other" attacks that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import require_docker

from critloop.sandbox import ExecResult, SandboxConfig, SandboxPool, Session

pytestmark = [pytest.mark.docker, pytest.mark.hostile]

LABEL = "io.critloop.sandbox"
OWNER_PID_LABEL = "io.critloop.owner.pid"
HOST_SECRET = "CRITLOOP_TEST_SECRET"
HOST_SECRET_VALUE = "host-secret-must-not-leak-7f3a9c"

TIMEOUT = 1.0
"""The limit given to hostile runs that never end."""
GRACE = 0.5
"""The pool's kill grace: SIGINT at the deadline, SIGKILL of the whole tree this much later."""
SLACK = 2.0
"""Scheduling and Docker latency allowed on top of a limit."""
PIDS_LIMIT = 256
MEMORY_MB = 512
SESSION_DISK_MB = 48
"""Each session's own disk: larger than MAX_FILE_MB, so that the file size limit shows."""
MAX_SESSIONS = 64
MAX_FILE_MB = 32
MAX_OUTPUT = 65536
MARKER = re.compile(r"\n\[\.\.\. output truncated: (\d+) more bytes not shown \.\.\.\]\n$")


# --------------------------------------------------------------------------- fixtures and helpers


def _our_containers() -> dict[str, str]:
    """Containers (id -> name) of critloop labelled as owned by this test process."""
    import docker

    client = docker.from_env(timeout=10)
    try:
        containers = client.containers.list(all=True, filters={"label": LABEL})
        return {c.id: c.name for c in containers if c.labels.get(OWNER_PID_LABEL) == str(os.getpid())}
    finally:
        client.close()


@pytest.fixture(scope="module")
def foreign_containers() -> set[str]:
    """Containers of this process that other modules' pools started before this module's pool."""
    require_docker()
    return set(_our_containers())


@pytest.fixture(scope="module")
async def hostile_pool(foreign_containers: set[str]) -> AsyncIterator[SandboxPool]:
    """A pool of one kernel for this module only: cases here kill whole containers."""
    # A secret in the environment of the host process while the kernel starts: it must not reach
    # the sandbox.
    os.environ[HOST_SECRET] = HOST_SECRET_VALUE  # for the module's lifetime: replacements too
    pool = SandboxPool(
        SandboxConfig(
            backend="docker",
            pool_size=1,
            timeout_seconds=5,
            kill_grace_seconds=GRACE,
            max_output_bytes=MAX_OUTPUT,
            memory_mb=MEMORY_MB,
            pids_limit=PIDS_LIMIT,
            session_disk_mb=SESSION_DISK_MB,
            max_sessions_per_kernel=MAX_SESSIONS,
            max_file_mb=MAX_FILE_MB,
        )
    )
    try:
        await pool.start()
        yield pool
    finally:
        await pool.close()
        os.environ.pop(HOST_SECRET, None)


@pytest.fixture
async def live_pool(hostile_pool: SandboxPool) -> SandboxPool:
    """The module's pool, with a live kernel (an earlier case may have killed the last one)."""
    await wait_until(lambda: hostile_pool.status().kernels >= 1, "a live kernel", timeout=60)
    return hostile_pool


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 30.0
) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


async def assert_fresh_session_works(pool: SandboxPool) -> None:
    """A new session runs code normally (the pool and its kernel recovered)."""
    session = await pool.open_session()
    try:
        result = await session.exec("print(6*7)", timeout=30)
    finally:
        await session.close()
    assert (result.status, result.stdout, result.stderr) == ("ok", "42\n", ""), result.text()


async def processes(pool: SandboxPool) -> int:
    """Live (non-zombie) processes below the supervisors of the pool's kernels."""
    return sum(kernel["processes"] for kernel in await pool.ping())


async def supervisor_pids(pool: SandboxPool) -> list[int]:
    return sorted(kernel["pid"] for kernel in await pool.ping())


async def assert_processes_return_to(pool: SandboxPool, baseline: int) -> None:
    """Poll (bounded) until the pool's process count is back at ``baseline``."""

    async def back() -> bool:
        return await processes(pool) == baseline

    await wait_until(back, f"the process count to return to {baseline}", timeout=10)


def code(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


async def run(session: Session, source: str, *, timeout: float = 10.0, **kwargs: Any) -> ExecResult:
    """Run dedented ``source``; also check the host-side wall time is bounded by the limit."""
    started = time.monotonic()
    result = await session.exec(code(source), timeout=timeout, **kwargs)
    elapsed = time.monotonic() - started
    assert elapsed < timeout + GRACE + SLACK + 3.0, f"exec took {elapsed:.1f}s for a {timeout:g}s limit"
    return result


async def run_json(session: Session, source: str, *, timeout: float = 10.0) -> Any:
    """Run ``source``, which prints one JSON document as its last line, and return it."""
    result = await run(session, source, timeout=timeout)
    assert result.status == "ok", result.text()
    return json.loads(result.stdout.strip().splitlines()[-1])


async def victim_session(pool: SandboxPool) -> Session:
    """A bystander session on the same kernel, holding state that must survive a neighbour."""
    victim = await pool.open_session()
    assert (await victim.exec("victim_state = 'intact'")).ok
    return victim


async def assert_victim_intact(victim: Session) -> None:
    result = await victim.exec("print(victim_state)")
    assert (result.status, result.stdout, result.state_survived) == ("ok", "intact\n", True), result.text()


@contextlib.asynccontextmanager
async def harmed_session(pool: SandboxPool) -> AsyncIterator[Session]:
    """A session for code that harms it, and only it: a victim session on the same kernel keeps
    its state, the supervisors are the same processes afterwards, and a fresh session works."""
    victim = await victim_session(pool)
    supervisors = await supervisor_pids(pool)
    try:
        async with await pool.open_session() as session:
            yield session
        assert await supervisor_pids(pool) == supervisors
        await assert_victim_intact(victim)
    finally:
        await victim.close()
    await assert_fresh_session_works(pool)


def assert_timed_out(result: ExecResult, *, limit: float = TIMEOUT) -> None:
    assert result.status == "timeout", result.text()
    assert limit <= result.duration < limit + GRACE + SLACK, result.duration


def assert_killed_at_deadline(result: ExecResult, *, limit: float = TIMEOUT) -> None:
    """Timed out, escalated to SIGKILL after the grace, and the session's state was lost."""
    assert_timed_out(result, limit=limit)
    assert result.state_survived is False
    assert result.error is not None and "killed" in result.error
    assert result.duration >= limit + GRACE * 0.9


def assert_truncated(text: str, *, kept: int, total: int) -> None:
    """``text`` holds exactly ``kept`` bytes of output and a marker counting the rest."""
    match = MARKER.search(text)
    assert match is not None, text[-200:]
    assert int(match.group(1)) == total - kept
    assert len(text[: match.start()].encode()) == kept


# --------------------------------------------------------------------------- run time


async def test_infinite_loop_is_interrupted_at_the_deadline(live_pool: SandboxPool) -> None:
    """A busy loop gets KeyboardInterrupt at the deadline; the session keeps its state."""
    async with await live_pool.open_session() as session:
        await session.exec("kept = 'yes'")
        result = await run(session, "while True:\n    pass", timeout=TIMEOUT)
        assert_timed_out(result)
        assert result.state_survived and "KeyboardInterrupt" in result.stderr
        assert (await session.exec("print(kept)")).stdout == "yes\n"
    await assert_fresh_session_works(live_pool)


async def test_loop_swallowing_keyboard_interrupt_is_killed(live_pool: SandboxPool) -> None:
    """A loop that catches KeyboardInterrupt and goes on is SIGKILLed after the grace."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        with_session = await processes(live_pool)
        await session.exec("kept = 'yes'")
        result = await run(
            session,
            """
            while True:
                try:
                    while True:
                        pass
                except KeyboardInterrupt:
                    pass
            """,
            timeout=TIMEOUT,
        )
        assert_killed_at_deadline(result)
        assert await processes(live_pool) == with_session  # one fresh worker, nothing else
        after = await session.exec("print('kept' in globals())")
        assert (after.status, after.stdout) == ("ok", "False\n")
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("signal.signal(signal.SIGINT, signal.SIG_IGN)", id="sigint-ignored"),
        pytest.param(
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})", id="sigint-blocked"
        ),
        pytest.param(
            "signal.signal(signal.SIGINT, lambda *_: print('not stopping', flush=True))",
            id="sigint-handler-replaced",
        ),
        pytest.param(
            "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):\n"
            "    signal.signal(s, signal.SIG_IGN)",
            id="every-catchable-signal-ignored",
        ),
    ],
)
async def test_code_defeating_the_interrupt_is_killed(live_pool: SandboxPool, setup: str) -> None:
    """Ignoring, blocking or replacing SIGINT cannot outlive the deadline: SIGKILL follows."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        result = await run(session, f"import signal\n{setup}\nwhile True:\n    pass", timeout=TIMEOUT)
        assert_killed_at_deadline(result)
        if "lambda" in setup:
            assert "not stopping" in result.stdout  # the handler ran, and did not save the loop
        after = await session.exec("import signal\nprint(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
        assert (after.status, after.stdout) == ("ok", "False\n")  # the fresh worker is clean
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


async def test_signal_handlers_set_by_one_run_do_not_protect_the_next(live_pool: SandboxPool) -> None:
    """A run that ignores SIGINT and returns cannot make a later run uninterruptible."""
    async with await live_pool.open_session() as session:
        first = await session.exec("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nkept = 1")
        assert first.ok, first.text()
        result = await run(session, "while True:\n    pass", timeout=TIMEOUT)
        assert_timed_out(result)
        assert result.state_survived  # the kernel re-armed its own handler: a clean interrupt
        assert (await session.exec("print(kept)")).stdout == "1\n"
    await assert_fresh_session_works(live_pool)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("import hashlib\nhashlib.pbkdf2_hmac('sha256', b'pw', b'salt', 10**9)", id="pbkdf2"),
        pytest.param(
            "import numpy\nm = numpy.ones((3000, 3000))\nfor _ in range(100):\n    m @ m", id="blas"
        ),
    ],
)
async def test_c_code_that_never_checks_signals_is_killed(live_pool: SandboxPool, source: str) -> None:
    """C code that never returns to the interpreter cannot see SIGINT: it is SIGKILLed."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        result = await run(session, source, timeout=TIMEOUT)
        assert_killed_at_deadline(result)
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("x = 10**(10**8)", id="huge-power"),
        pytest.param("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')", id="regex-backtracking"),
        pytest.param("x = str(7**(2*10**6))", id="huge-int-to-str"),
    ],
)
async def test_long_c_level_work_is_bounded(live_pool: SandboxPool, source: str) -> None:
    """Long big-number or regex work ends at the deadline (interrupted or killed)."""
    async with await live_pool.open_session() as session:
        result = await run(session, source, timeout=TIMEOUT)
        assert_timed_out(result)
        if not result.state_survived:
            assert result.error is not None and "killed" in result.error
    await assert_fresh_session_works(live_pool)


async def test_daemon_threads_do_not_hold_the_run_or_outlive_the_session(live_pool: SandboxPool) -> None:
    """Threads left printing after a run neither block it nor leak output; close kills them."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        result = await run(
            session,
            """
            import os, sys, threading, time

            def chatter():
                while True:
                    print('LEAK', flush=True)
                    os.write(2, b'LEAK\\n')
                    time.sleep(0.002)

            for _ in range(4):
                threading.Thread(target=chatter, daemon=True).start()
            threading.Thread(target=time.sleep, args=(3600,)).start()  # not even a daemon
            print('started', flush=True)
            """,
        )
        assert result.status == "ok", result.text()
        assert "started" in result.stdout
        assert result.duration < 2.0
        count = await session.exec("import threading\nprint(f'threads={threading.active_count()}')")
        match = re.search(r"threads=(\d+)", count.stdout)
        assert count.ok and match is not None and int(match.group(1)) >= 6, count.text()[-300:]
        # Another session never sees the chatter.
        await assert_fresh_session_works(live_pool)
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


async def test_background_process_writing_to_stdout_does_not_hang_the_run(live_pool: SandboxPool) -> None:
    """A child that keeps the output pipe open and keeps writing cannot hold the run open."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        result = await run(
            session,
            """
            import subprocess, sys
            child = 'import os, time\\nwhile True:\\n    os.write(1, b"bg\\\\n")\\n    time.sleep(0.001)'
            subprocess.Popen([sys.executable, '-c', child])
            subprocess.Popen(['sleep', '3600'])
            print('spawned')
            """,
        )
        assert result.status == "ok", result.text()
        assert "spawned\n" in result.stdout and result.duration < 2.0
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- processes


FORK_BOMB = """
import os, time
while True:  # every copy forks on until the pids limit refuses, then all of them wait
    try:
        os.fork()
    except OSError:
        break
while True:
    time.sleep(3600)
"""

SATURATING_FORK_BOMB = """
import json, os, time

def cgroup(*paths):
    for path in paths:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass

def pids():
    return cgroup("/sys/fs/cgroup/pids/pids.current", "/sys/fs/cgroup/pids.current")

if os.fork() == 0:
    try:
        exec(BOMB)
    finally:
        os._exit(0)
peak, deadline = 0, time.monotonic() + 10
while time.monotonic() < deadline:  # until the bomb has stopped growing
    now = int(pids())
    if now == peak and now > 100:
        break
    peak = max(peak, now)
    time.sleep(0.25)
limit = cgroup("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max")
print(json.dumps({"peak": peak, "limit": limit}))
"""

CGROUP_READER = """
import json

def cgroup(*paths):
    for path in paths:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return None

print(json.dumps({
    "pids_max": cgroup("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"),
    "pids_current": cgroup("/sys/fs/cgroup/pids/pids.current", "/sys/fs/cgroup/pids.current"),
    "memory_max": cgroup("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
}))
"""


async def test_fork_bomb_is_bounded_by_the_pids_limit(live_pool: SandboxPool) -> None:
    """A fork bomb hits the container's pids limit; neighbours live on; close kills all of it."""
    baseline = await processes(live_pool)
    victim = await victim_session(live_pool)
    with_victim = await processes(live_pool)
    replaced = live_pool.status().kernels_replaced
    try:
        async with await live_pool.open_session() as session:
            report = await run_json(session, f"BOMB = {code(FORK_BOMB)!r}\n" + code(SATURATING_FORK_BOMB))
            assert int(report["limit"]) == PIDS_LIMIT
            assert 100 < report["peak"] <= PIDS_LIMIT  # the bomb ran into the limit, and it held
            during = await processes(live_pool)
            assert 100 < during <= PIDS_LIMIT
            await assert_victim_intact(victim)  # it needs no new process: unaffected
        await assert_processes_return_to(live_pool, with_victim)
        assert live_pool.status().kernels_replaced == replaced
        await assert_victim_intact(victim)
    finally:
        await victim.close()
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


async def test_fork_bomb_that_ignores_sigint_does_not_crash_the_kernel(live_pool: SandboxPool) -> None:
    """A fork bomb killed at its deadline must not take down the other sessions of its kernel."""
    victim = await victim_session(live_pool)
    replaced = live_pool.status().kernels_replaced
    try:
        async with await live_pool.open_session() as session:
            bomb = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + code(FORK_BOMB)
            result = await run(session, bomb, timeout=TIMEOUT)
            assert result.status in ("timeout", "killed"), result.text()
            await wait_until(lambda: live_pool.status().kernels >= 1, "a live kernel")
            await assert_fresh_session_works(live_pool)
            # The containment that must hold: the bomb is killed, the kernel lives on.
            assert (result.status, result.state_survived) == ("timeout", False), result.text()
            assert live_pool.status().kernels_replaced == replaced
            await assert_victim_intact(victim)
    finally:
        await victim.close()


async def test_worker_death_is_noticed_while_its_child_lives(live_pool: SandboxPool) -> None:
    """A worker that exits while a forked child holds its channel is reported killed at once."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        result = await run(
            session,
            """
            import os, time
            if os.fork() == 0:
                try:
                    time.sleep(60)
                finally:
                    os._exit(0)
            os._exit(3)
            """,
            timeout=2.0,
        )
        assert result.state_survived is False
        assert (await session.exec("print(6*7)")).stdout == "42\n"
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)
    assert result.status == "killed", result.text()
    assert result.error is not None and "exit code 3" in result.error


async def test_setsid_and_double_forked_orphans_die_with_the_session(live_pool: SandboxPool) -> None:
    """Processes that detach (setsid, double fork, new session) are still killed on close."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        with_session = await processes(live_pool)
        result = await run(
            session,
            """
            import os, subprocess, sys, time
            subprocess.Popen(['sleep', '3600'], start_new_session=True)
            subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'],
                             start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pid = os.fork()
            if pid == 0:  # classic daemon: setsid, fork again, the middle process exits
                try:
                    os.setsid()
                    if os.fork() == 0:
                        os.setsid()
                        time.sleep(3600)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)  # the grandchild exists once the middle process has exited
            print('detached')
            """,
        )
        assert (result.status, result.stdout) == ("ok", "detached\n"), result.text()
        assert await processes(live_pool) >= with_session + 3
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


async def test_orphans_die_when_their_worker_dies(live_pool: SandboxPool) -> None:
    """A run that starts detached processes and then kills its own worker leaves nothing."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as session:
        with_session = await processes(live_pool)
        result = await run(
            session,
            """
            import os, subprocess
            for _ in range(3):
                subprocess.Popen(['sleep', '3600'], start_new_session=True)
            os.kill(os.getpid(), 9)
            """,
        )
        assert (result.status, result.state_survived) == ("killed", False), result.text()
        await assert_processes_return_to(live_pool, with_session)
        assert (await session.exec("print(6*7)")).stdout == "42\n"
    await assert_processes_return_to(live_pool, baseline)
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", id="list-growth"),
        pytest.param("blob = bytearray(2 * 1024**3)", id="bytearray-2GiB"),
        pytest.param("import numpy\nblob = numpy.ones(2 * 1024**3, dtype='u1')", id="numpy-2GiB"),
        pytest.param("s = 'x'\nwhile True:\n    s += s", id="string-doubling"),
    ],
)
async def test_memory_bomb_hits_the_container_limit_only(live_pool: SandboxPool, source: str) -> None:
    """A memory bomb dies of MemoryError or the OOM killer; the kernel and neighbours live on."""
    replaced = live_pool.status().kernels_replaced
    async with harmed_session(live_pool) as session:
        limits = await run_json(session, CGROUP_READER)
        assert int(limits["memory_max"]) == MEMORY_MB << 20
        result = await run(session, source, timeout=10.0)
        if result.status == "error":
            assert result.error is not None and result.error.startswith("MemoryError")
        else:
            assert result.status == "killed", result.text()
            assert result.error is not None and "SIGKILL" in result.error
        assert (await session.exec("print(6*7)")).stdout == "42\n"
    assert live_pool.status().kernels_replaced == replaced


async def test_impossible_allocation_is_a_memory_error(live_pool: SandboxPool) -> None:
    """An allocation far beyond the limit fails at once with MemoryError; state survives."""
    async with await live_pool.open_session() as session:
        await session.exec("kept = 1")
        result = await run(session, "x = ' ' * 10**12")
        assert (result.status, result.error, result.state_survived) == ("error", "MemoryError", True)
        assert (await session.exec("print(kept)")).stdout == "1\n"
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize(
    ("source", "stream", "total", "cap"),
    [
        pytest.param("for _ in range(100_000):\n    print('x' * 99)", 1, 10_000_000, MAX_OUTPUT, id="print"),
        pytest.param(
            "import os\nfor _ in range(16):\n    os.write(1, b'x' * (1 << 20))",
            1,
            16 << 20,
            MAX_OUTPUT,
            id="os-write",
        ),
        pytest.param(
            "import subprocess, sys\n"
            "_ = subprocess.run([sys.executable, '-c', 'import sys; sys.stdout.write(\"y\" * (8 << 20))'])",
            1,
            8 << 20,
            MAX_OUTPUT,
            id="subprocess",
        ),
        pytest.param(
            "import sys\n_ = sys.stderr.write('e' * (8 << 20))", 2, 8 << 20, MAX_OUTPUT, id="stderr"
        ),
        pytest.param("import os\n_ = os.write(1, b'z' * 100_000)", 1, 100_000, 1000, id="small-cap"),
    ],
)
async def test_huge_output_is_capped_with_a_marker(
    live_pool: SandboxPool, source: str, stream: int, total: int, cap: int
) -> None:
    """Output floods from Python, raw fds and children are capped, counted and marked."""
    async with await live_pool.open_session() as session:
        result = await run(session, source, max_output=cap)
        assert result.status == "ok", result.error
        assert result.truncated
        assert_truncated(result.stdout if stream == 1 else result.stderr, kept=cap, total=total)
        assert result.duration < 5.0
    await assert_fresh_session_works(live_pool)


async def test_output_imitating_protocol_frames_stays_plain_output(live_pool: SandboxPool) -> None:
    """Length-prefixed JSON written to stdout and stderr comes back verbatim, never parsed."""
    supervisors = await supervisor_pids(live_pool)
    async with await live_pool.open_session() as session:
        result = await run(
            session,
            """
            import json, os, struct, sys
            def frame(obj):
                body = json.dumps(obj).encode()
                return struct.pack('>I', len(body)) + body
            forged = frame({"id": 1, "ok": True, "result": {"status": "ok", "stdout": "forged"}})
            ready = frame({"event": "ready", "pid": 1, "protocol": 1})
            os.write(1, forged)
            os.write(2, forged)
            sys.stdout.buffer.write(ready)
            sys.stdout.flush()
            _ = os.write(1, struct.pack('>I', 0x7FFFFFF0))  # a header announcing a huge frame
            """,
        )
        forged_body = json.dumps({"id": 1, "ok": True, "result": {"status": "ok", "stdout": "forged"}})
        ready_body = json.dumps({"event": "ready", "pid": 1, "protocol": 1})
        forged = chr(len(forged_body)).rjust(4, "\0") + forged_body
        ready = chr(len(ready_body)).rjust(4, "\0") + ready_body
        assert result.status == "ok", result.text()
        assert result.stdout == forged + ready + "\x7f\ufffd\ufffd\ufffd"
        assert result.stderr == forged
        assert (await session.exec("print('still framed')")).stdout == "still framed\n"
    assert await supervisor_pids(live_pool) == supervisors
    await assert_fresh_session_works(live_pool)


FIND_CHANNEL = """
import os, socket, struct
channel_fd = next(
    int(fd) for fd in os.listdir('/proc/self/fd')
    if os.path.exists(f'/proc/self/fd/{fd}') and os.readlink(f'/proc/self/fd/{fd}').startswith('socket:')
)
channel = socket.socket(fileno=os.dup(channel_fd))
"""


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        pytest.param("struct.pack('>I', 8) + b'garbage!'", "malformed frame", id="garbage"),
        pytest.param("struct.pack('>I', 3) + b'[1]'", "malformed frame", id="not-an-object"),
        pytest.param("struct.pack('>I', 1 << 30)", "oversized frame", id="oversized"),
    ],
)
async def test_forged_frames_on_the_worker_channel_only_hurt_their_session(
    live_pool: SandboxPool, payload: str, why: str
) -> None:
    """Garbage written to the worker's own control socket kills that worker, nothing else."""
    async with harmed_session(live_pool) as session:
        await session.exec("kept = 1")
        result = await run(session, FIND_CHANNEL + f"channel.sendall({payload})\nprint('sent')")
        assert (result.status, result.state_survived) == ("killed", False), result.text()
        assert result.error is not None and why in result.error
        after = await session.exec("print('kept' in globals())")
        assert (after.status, after.stdout) == ("ok", "False\n")


# --------------------------------------------------------------------------- disk


def fill(folder: str) -> str:
    """Code that writes 4 MiB files into ``folder`` until a write fails; it prints the error,
    the bytes written and the folder's disk size (None where it has none)."""
    return f"""
        import errno, json, os, shutil
        written, error = 0, None
        try:
            for i in range(1000):
                with open(os.path.join({folder!r}, f'fill-{{i}}'), 'wb') as f:
                    for _ in range(4):
                        f.write(b'w' * (1 << 20))
                        written += 1 << 20
        except OSError as exc:
            error = errno.errorcode.get(exc.errno)
        total = shutil.disk_usage({folder!r}).total if os.path.isdir({folder!r}) else None
        print(json.dumps({{"error": error, "written": written, "total": total}}))
        """


async def test_there_is_no_shared_tmp_to_fill(live_pool: SandboxPool) -> None:
    """/tmp is not writable (the root is read-only): no folder outside a session's own takes a byte."""
    async with await live_pool.open_session() as session:
        report = await run_json(session, fill("/tmp"))
    assert report["error"] in ("EROFS", "EACCES", "ENOENT") and report["written"] == 0, report
    await assert_fresh_session_works(live_pool)


async def test_file_size_limit_stops_a_single_huge_file(live_pool: SandboxPool) -> None:
    """RLIMIT_FSIZE stops one file at the limit with EFBIG (SIGXFSZ does not kill the worker)."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import errno, json, os, resource
            error = None
            try:
                with open('big.bin', 'wb') as f:
                    for _ in range(40):
                        f.write(b'b' * (1 << 20))
            except OSError as exc:
                error = errno.errorcode.get(exc.errno)
            size = os.path.getsize('big.bin')
            os.remove('big.bin')
            print(json.dumps({"error": error, "size": size,
                              "limit": resource.getrlimit(resource.RLIMIT_FSIZE)}))
            """,
        )
        assert report == {
            "error": "EFBIG",
            "size": MAX_FILE_MB << 20,
            "limit": [MAX_FILE_MB << 20, MAX_FILE_MB << 20],
        }
    await assert_fresh_session_works(live_pool)


WRITE_ATTEMPT = """
import errno, os, sys
try:
    {action}
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
else:
    print('WROTE')
"""


@pytest.mark.parametrize(
    "action",
    [
        pytest.param("open('/evil.txt', 'w').write('x')", id="root-dir"),
        pytest.param("open('/etc/passwd', 'a').write('evil::0:0::/:/bin/sh\\n')", id="etc-passwd"),
        pytest.param("open('/etc/evil.conf', 'w').write('x')", id="etc-new-file"),
        pytest.param("open('/usr/bin/evil', 'w').write('x')", id="usr-bin"),
        pytest.param("open('/opt/critloop/kernel.py', 'a').write('# pwned')", id="kernel-append"),
        pytest.param("os.remove('/opt/critloop/kernel.py')", id="kernel-delete"),
        pytest.param("os.rename('/opt/critloop/kernel.py', '/opt/critloop/k.py')", id="kernel-rename"),
        pytest.param(
            "open(os.path.join(os.path.dirname(os.__file__), 'sitecustomize.py'), 'w').write('x')",
            id="stdlib-sitecustomize",
        ),
        pytest.param("open('/proc/sys/kernel/hostname', 'w').write('x')", id="proc-sys"),
        pytest.param(
            "open(next(p for p in ('/sys/fs/cgroup/memory/memory.limit_in_bytes',"
            " '/sys/fs/cgroup/memory.max') if os.path.exists(p)), 'w').write('-1')",
            id="own-memory-limit",
        ),
    ],
)
async def test_writes_outside_the_tmpfs_are_refused(live_pool: SandboxPool, action: str) -> None:
    """The root file system (kernel, stdlib, /etc, /proc/sys, cgroups) is read-only."""
    async with await live_pool.open_session() as session:
        result = await run(session, WRITE_ATTEMPT.format(action=action))
        assert result.status == "ok", result.text()
        assert result.stdout.strip() in ("EROFS", "EACCES", "EPERM"), result.stdout
        kernel = await session.exec("print(open('/opt/critloop/kernel.py').read().endswith('# pwned'))")
        assert kernel.stdout == "False\n"
    await assert_fresh_session_works(live_pool)


async def test_writable_places_are_noexec(live_pool: SandboxPool) -> None:
    """Binaries and scripts dropped in the work dir, /tmp or /dev/shm cannot be executed."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import json, os, shutil, subprocess
            results = {}
            for where in ('.', '/tmp', '/dev/shm'):
                path = os.path.join(where, 'dropped-id')
                try:
                    shutil.copy('/usr/bin/id', path)
                    os.chmod(path, 0o755)
                    subprocess.run([path], capture_output=True)
                    results[where] = 'EXECUTED'
                except PermissionError:
                    results[where] = 'EACCES'
                except OSError as exc:
                    results[where] = f'not writable: {exc.errno}'
                finally:
                    if os.path.exists(path):
                        os.remove(path)
            print(json.dumps(results))
            """,
        )
        assert report["."] == "EACCES", report
        assert all(v == "EACCES" or v.startswith("not writable") for v in report.values()), report
    await assert_fresh_session_works(live_pool)


async def test_tmp_and_shm_files_do_not_outlive_their_session(live_pool: SandboxPool) -> None:
    """Files a session leaves in /tmp or /dev/shm must not be visible to a later session."""
    async with await live_pool.open_session() as writer:
        result = await run(
            writer,
            """
            for p in ('/tmp/left-behind', '/dev/shm/left-behind'):
                try:
                    open(p, 'w').write('secret of a closed session')
                except OSError:
                    pass
            """,
        )
        assert result.ok, result.text()
    async with await live_pool.open_session() as reader:
        leaked = await run_json(
            reader,
            """
            import json, os
            found = [p for p in ('/tmp/left-behind', '/dev/shm/left-behind') if os.path.exists(p)]
            for p in found:
                os.remove(p)
            print(json.dumps(found))
            """,
        )
    await assert_fresh_session_works(live_pool)
    assert leaked == []


# --------------------------------------------------------------------------- network


@pytest.mark.parametrize(
    ("family", "address"),
    [
        pytest.param("AF_INET", ("1.1.1.1", 53), id="tcp-1.1.1.1-53"),
        pytest.param("AF_INET", ("8.8.8.8", 80), id="tcp-8.8.8.8-80"),
        pytest.param("AF_INET", ("172.17.0.1", 2375), id="tcp-docker-bridge-gateway"),
        pytest.param("AF_INET6", ("2606:4700:4700::1111", 443), id="tcp-ipv6"),
    ],
)
async def test_tcp_egress_fails(live_pool: SandboxPool, family: str, address: tuple[str, int]) -> None:
    """TCP connections to the internet or the host's Docker bridge fail at once."""
    async with await live_pool.open_session() as session:
        result = await run(
            session,
            f"""
            import errno, socket
            s = socket.socket(socket.{family}, socket.SOCK_STREAM)
            s.settimeout(3)
            try:
                s.connect({address!r})
            except OSError as exc:
                print(errno.errorcode.get(exc.errno, exc.errno))
            else:
                print('CONNECTED')
            """,
        )
        assert result.stdout.strip() in ("ENETUNREACH", "EADDRNOTAVAIL", "EAFNOSUPPORT"), result.text()
        assert result.duration < 1.0  # refused locally, not a timeout on the wire
    await assert_fresh_session_works(live_pool)


async def test_dns_resolution_fails(live_pool: SandboxPool) -> None:
    """Names do not resolve: there is no route to any resolver."""
    async with await live_pool.open_session() as session:
        result = await run(
            session,
            """
            import socket
            for name in ('example.com', 'pypi.org', 'host.docker.internal'):
                try:
                    print(name, socket.getaddrinfo(name, 80))
                except socket.gaierror as exc:
                    print(name, 'gaierror')
            """,
        )
        assert result.stdout.splitlines() == [
            "example.com gaierror",
            "pypi.org gaierror",
            "host.docker.internal gaierror",
        ], result.text()
        assert result.duration < 5.0
    await assert_fresh_session_works(live_pool)


async def test_udp_egress_fails_and_only_loopback_exists(live_pool: SandboxPool) -> None:
    """UDP datagrams cannot leave, and the only network interface is loopback."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import errno, json, os, socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            outcome = {}
            for target in (('8.8.8.8', 53), ('1.1.1.1', 123), ('255.255.255.255', 67)):
                try:
                    s.sendto(b'x' * 32, target)
                    outcome[target[0]] = 'SENT'
                except OSError as exc:
                    outcome[target[0]] = errno.errorcode.get(exc.errno, exc.errno)
            print(json.dumps({"udp": outcome, "interfaces": sorted(os.listdir('/sys/class/net'))}))
            """,
        )
        assert set(report["udp"].values()) <= {"ENETUNREACH", "EACCES", "EPERM"}, report
        assert report["interfaces"] == ["lo"]
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- the host


async def test_host_environment_is_not_visible(live_pool: SandboxPool) -> None:
    """The sandbox sees only the image's environment: no host variables, no host secret."""
    import docker

    from critloop.sandbox.image import image_tag

    client = docker.from_env(timeout=10)
    try:
        image_env = client.images.get(live_pool.config.image or image_tag()).attrs["Config"]["Env"] or []
    finally:
        client.close()
    allowed = {entry.split("=", 1)[0] for entry in image_env}
    # Set by Docker (HOSTNAME), the backend (kill grace), Python's locale coercion and the kernel.
    allowed |= {"HOSTNAME", "CRITLOOP_KILL_GRACE", "LC_CTYPE", "HOME", "TMPDIR"}
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import json, os
            try:
                init_env = open('/proc/1/environ', 'rb').read().decode(errors='replace')
            except OSError as exc:  # not even visible: nothing to read
                init_env = exc.strerror
            print(json.dumps({"env": dict(os.environ), "init_env": init_env}))
            """,
        )
    env = report["env"]
    assert set(env) <= allowed, set(env) - allowed
    assert HOST_SECRET not in env and HOST_SECRET_VALUE not in json.dumps(report)
    assert env["HOSTNAME"] == "sandbox" != socket.gethostname()
    assert env["HOME"] == env["TMPDIR"] and env["HOME"].startswith("/work/")
    host_only = {k for k in os.environ if k not in allowed and len(os.environ[k]) > 3}
    assert not any(f"{k}={os.environ[k]}" in report["init_env"] for k in host_only)
    await assert_fresh_session_works(live_pool)


async def test_host_files_and_processes_are_not_visible(live_pool: SandboxPool) -> None:
    """Own hostname, own PID namespace under docker-init, no host paths, no Docker socket."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            f"""
            import json, os
            pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]
            print(json.dumps({{
                "hostname": open('/etc/hostname').read().strip(),
                "init_visible": os.path.exists('/proc/1'),
                "pids": len(pids),
                "host_paths": [p for p in ({os.path.abspath(__file__)!r}, {os.getcwd()!r},
                                           '/var/lib/docker', '/etc/docker', '/root/.docker')
                               if p not in ('/', '/work') and os.path.exists(p)],
                "sockets": [p for p in ('/var/run/docker.sock', '/run/docker.sock',
                                        '/run/containerd/containerd.sock') if os.path.exists(p)],
                "uid": os.getuid(),
            }}))
            """,
        )
    assert report["hostname"] == "sandbox"
    assert report["init_visible"] is False  # (docker-init): /proc shows a session its own processes
    assert report["pids"] == 1  # this session's worker: not the host's, not the other sessions'

    assert report["host_paths"] == [] and report["sockets"] == []
    assert report["uid"] >= 1 << 20  # a user id of its own, far from the image's users
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- privileges


async def test_setuid_fails_and_no_capabilities_are_held(live_pool: SandboxPool) -> None:
    """Changing to root fails; no capabilities at all; no_new_privs and seccomp are on."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import json, os
            attempts = {}
            for name, call in [('setuid', lambda: os.setuid(0)), ('seteuid', lambda: os.seteuid(0)),
                               ('setgid', lambda: os.setgid(0)), ('setgroups', lambda: os.setgroups([0])),
                               ('setresuid', lambda: os.setresuid(0, 0, 0)),
                               ('chroot', lambda: os.chroot('/tmp'))]:
                try:
                    call()
                    attempts[name] = 'ALLOWED'
                except PermissionError:
                    attempts[name] = 'EPERM'
            status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines()
                          if ':\\t' in line)
            keys = ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp')
            print(json.dumps({"attempts": attempts, "ids": [os.getuid(), os.geteuid(), os.getgid()],
                              "status": {k: status[k].strip() for k in keys}}))
            """,
        )
    assert set(report["attempts"].values()) == {"EPERM"}, report["attempts"]
    uid = report["ids"][0]
    assert report["ids"] == [uid, uid, uid] and uid >= 1 << 20
    status = report["status"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    await assert_fresh_session_works(live_pool)


async def test_su_sudo_and_setuid_binaries_do_not_escalate(live_pool: SandboxPool) -> None:
    """sudo is absent; su and setuid-root binaries run without privilege (no_new_privs)."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import json, os, shutil, subprocess
            def attempt(argv):
                p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=10)
                return [p.returncode, p.stdout.strip()]
            out = {"sudo": shutil.which('sudo')}
            if shutil.which('su'):
                out["su"] = attempt(['su', '-c', 'id -u', 'root'])
            if shutil.which('mount'):
                out["mount"] = attempt(['mount', '-t', 'tmpfs', 'none', '/work'])
            out["id"] = attempt(['id', '-u'])
            out["uid"] = os.getuid()
            print(json.dumps(out))
            """,
            timeout=20,
        )
    assert report["sudo"] is None
    for tool in ("su", "mount"):
        if tool in report:
            returncode, stdout = report[tool]
            assert returncode != 0 and stdout != "0", (tool, report[tool])
    assert report["id"] == [0, str(report["uid"])] and report["uid"] != 0
    await assert_fresh_session_works(live_pool)


async def test_user_code_cannot_touch_the_supervisor_memory(live_pool: SandboxPool) -> None:
    """The supervisor's memory must be out of reach of the code it runs."""
    async with await live_pool.open_session() as session:
        result = await run(
            session,
            """
            import errno, os
            pp = os.getppid()
            try:
                start = int(open(f'/proc/{pp}/maps').readline().split('-')[0], 16)
                with open(f'/proc/{pp}/mem', 'rb') as mem:
                    mem.seek(start)
                    print('READ', mem.read(4))
            except OSError as exc:
                print('DENIED', errno.errorcode.get(exc.errno))
            """,
        )
        assert result.status == "ok", result.text()
    await assert_fresh_session_works(live_pool)
    assert result.stdout.startswith("DENIED"), result.stdout


# --------------------------------------------------------------------------- killing the parents


async def test_the_supervisor_and_init_are_out_of_reach(live_pool: SandboxPool) -> None:
    """Signals to the supervisor (a root process) and to the container's init are refused."""
    supervisors = await supervisor_pids(live_pool)
    replaced = live_pool.status().kernels_replaced
    async with await live_pool.open_session() as session:
        await session.exec("kept = 1")
        report = await run_json(
            session,
            """
            import errno, json, os, signal
            out = {}
            for name, pid in (('supervisor', os.getppid()), ('init', 1)):
                for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM):
                    try:
                        os.kill(pid, sig)
                        out[f'{name}/{int(sig)}'] = 'SENT'
                    except OSError as exc:
                        out[f'{name}/{int(sig)}'] = errno.errorcode.get(exc.errno)
            out["kept"] = kept
            print(json.dumps(out))
            """,
        )
    assert report.pop("kept") == 1
    assert set(report.values()) == {"EPERM"}, report
    assert await supervisor_pids(live_pool) == supervisors
    assert live_pool.status().kernels_replaced == replaced
    await assert_fresh_session_works(live_pool)


async def test_a_killed_container_is_replaced(live_pool: SandboxPool, foreign_containers: set[str]) -> None:
    """A container that dies (killed from the host here: its sessions can no longer kill its
    supervisor) is replaced; its sessions go on in the new one, with their state lost."""
    import docker

    replaced = live_pool.status().kernels_replaced
    async with await live_pool.open_session() as session:
        await session.exec("kept = 1")
        client = docker.from_env(timeout=10)
        try:
            for container_id in set(_our_containers()) - foreign_containers:  # this module's only
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    client.containers.get(container_id).kill()
        finally:
            client.close()
        await wait_until(lambda: live_pool.status().kernels_replaced == replaced + 1, "the kernel's death")
        await wait_until(lambda: live_pool.status().kernels == 1, "the replacement kernel", timeout=60)
        after = await session.exec("print('kept' in globals())")  # re-opened transparently
        assert (after.status, after.stdout, after.state_survived) == ("ok", "False\n", False)
    await assert_fresh_session_works(live_pool)


async def test_killing_the_own_process_group_only_ends_the_session_worker(live_pool: SandboxPool) -> None:
    """os.killpg(0, SIGKILL) kills the worker and its children, not the supervisor."""
    async with harmed_session(live_pool) as session:
        result = await run(
            session, "import os, subprocess\nsubprocess.Popen(['sleep', '3600'])\nos.killpg(0, 9)"
        )
        assert (result.status, result.state_survived) == ("killed", False), result.text()
        assert result.error is not None and "SIGKILL" in result.error
        assert (await session.exec("print(6*7)")).stdout == "42\n"


# --------------------------------------------------------------------------- exits and crashes


@pytest.mark.parametrize(
    ("source", "status", "error", "survived"),
    [
        pytest.param("import sys\nsys.exit(3)", "error", "SystemExit: 3", True, id="sys-exit"),
        pytest.param("raise SystemExit", "error", "SystemExit", True, id="raise-systemexit"),
        pytest.param("import os\nos._exit(0)", "killed", "exit code 0", False, id="os-exit"),
        pytest.param("import os\nos.abort()", "killed", "SIGABRT", False, id="abort"),
        pytest.param("import os\nos.kill(os.getpid(), 9)", "killed", "SIGKILL", False, id="self-sigkill"),
        pytest.param("import os\nos.kill(os.getpid(), 15)", "killed", "SIGTERM", False, id="self-sigterm"),
        pytest.param("import ctypes\nctypes.string_at(0)", "killed", "SIGSEGV", False, id="segfault"),
        pytest.param(
            "import sys\nsys.setrecursionlimit(10**7)\nnest = []\nfor _ in range(10**6):\n    nest = [nest]\n"
            "repr(nest)",
            "killed",
            "SIGSEGV",
            False,
            id="c-stack-overflow",
        ),
    ],
)
async def test_exits_and_crashes_end_only_the_run(
    live_pool: SandboxPool, source: str, status: str, error: str, survived: bool
) -> None:
    """Exits and crashes are reported; the session goes on (in a fresh worker if it died)."""
    supervisors = await supervisor_pids(live_pool)
    async with await live_pool.open_session() as session:
        await session.exec("kept = 1")
        result = await run(session, source)
        assert (result.status, result.state_survived) == (status, survived), result.text()
        assert result.error is not None and error in result.error
        after = await session.exec(
            "import resource\nprint('kept' in globals(), resource.getrlimit(resource.RLIMIT_CORE))"
        )
        assert (after.status, after.stdout) == ("ok", f"{survived} (0, 0)\n"), after.text()
        files = await session.exec("import os\nprint([f for f in os.listdir('.') if 'core' in f])")
        assert files.stdout == "[]\n"  # no core dump
    assert await supervisor_pids(live_pool) == supervisors
    await assert_fresh_session_works(live_pool)


async def test_deep_recursion_is_a_recursion_error(live_pool: SandboxPool) -> None:
    """Unbounded Python recursion raises RecursionError; the session keeps its state."""
    async with await live_pool.open_session() as session:
        await session.exec("kept = 1")
        result = await run(session, "def f(n):\n    return f(n + 1)\nf(0)")
        assert (result.status, result.state_survived) == ("error", True), result.text()
        assert result.error is not None and result.error.startswith("RecursionError")
        assert (await session.exec("print(kept)")).stdout == "1\n"
    await assert_fresh_session_works(live_pool)


async def test_reading_stdin_gets_eof_not_a_hang(live_pool: SandboxPool) -> None:
    """input() raises EOFError at once; raw reads of stdin return nothing."""
    async with await live_pool.open_session() as session:
        result = await run(session, "input('question? ')", timeout=5.0)
        assert (result.status, result.state_survived) == ("error", True), result.text()
        assert result.error is not None and result.error.startswith("EOFError")
        assert result.duration < 1.0
        raw = await run(session, "import os, sys\nprint(repr(sys.stdin.read()), os.read(0, 10))", timeout=5.0)
        assert (raw.status, raw.stdout) == ("ok", "'' b''\n")
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- state between sessions


POLLUTE = """
import builtins, json, math, os, sys
import numpy, sympy
secret_global = 'A'
open('leak.txt', 'w').write('A')
math.pi = 3
numpy.pi = 3
sympy.leaked = True
os.environ['LEAKED'] = '1'
os.environ['PATH'] = '/tmp/evil'
builtins.leaked_builtin = True
builtins.divmod = lambda *_: 'pwned'
sys.path.insert(0, '/tmp/evil')
sys.modules['fractions'] = None
"""

INSPECT = """
import builtins, json, math, os, sys
import numpy, sympy
print(json.dumps({
    "global": 'secret_global' in globals(),
    "files": os.listdir('.'),
    "pi": math.pi, "numpy_pi": float(numpy.pi), "sympy": hasattr(sympy, 'leaked'),
    "env": 'LEAKED' in os.environ, "path_env": os.environ['PATH'],
    "builtin": hasattr(builtins, 'leaked_builtin'), "divmod": divmod(7, 2),
    "sys_path": '/tmp/evil' in sys.path, "fractions": sys.modules.get('fractions', 0) is not None,
}))
"""


async def test_state_does_not_leak_into_other_sessions(live_pool: SandboxPool) -> None:
    """Globals, files, patched modules, builtins and environ of one session stay in it."""
    clean = None
    async with await live_pool.open_session() as polluter:
        result = await polluter.exec(code(POLLUTE))
        assert result.ok, result.text()
        async with await live_pool.open_session() as neighbour:  # open at the same time
            clean = await run_json(neighbour, INSPECT)
    async with await live_pool.open_session() as later:  # after the polluter closed
        assert await run_json(later, INSPECT) == clean
    assert clean is not None
    assert clean["files"] == [] and clean["pi"] == clean["numpy_pi"] > 3.14
    assert not (clean["global"] or clean["sympy"] or clean["env"] or clean["builtin"] or clean["sys_path"])
    assert clean["divmod"] == [3, 1] and clean["fractions"] and "/tmp/evil" not in clean["path_env"]
    await assert_fresh_session_works(live_pool)


async def test_reset_forgets_pollution(live_pool: SandboxPool) -> None:
    """reset() gives the session a clean worker: nothing of the polluting run remains."""
    async with await live_pool.open_session() as session:
        assert (await session.exec(code(POLLUTE))).ok
        await session.reset()
        report = await run_json(session, INSPECT)
        assert report["files"] == [] and report["pi"] > 3.14 and report["divmod"] == [3, 1]
        assert not (report["global"] or report["env"] or report["builtin"] or report["sys_path"])
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- sessions against each other
#
# Every session runs under a user id of its own (its snapshots share it), with its own folder
# (mode 0700) on a tmpfs of its own, and sees only its own processes in /proc.


async def session_pid(session: Session) -> int:
    return int((await session.exec("import os\nprint(os.getpid())")).stdout)


async def test_sessions_cannot_signal_each_others_workers_or_forks(live_pool: SandboxPool) -> None:
    """SIGKILL, SIGSTOP and SIGTERM to another session's worker, or to its snapshot, are refused."""
    victim = await victim_session(live_pool)
    snapshot = await victim.fork()
    try:
        targets = [await session_pid(victim), await session_pid(snapshot)]
        async with await live_pool.open_session() as attacker:
            report = await run_json(
                attacker,
                f"""
                import errno, json, os, signal
                outcome = {{}}
                for pid in {targets}:
                    for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, 0):
                        try:
                            os.kill(pid, sig)
                            outcome[f'{{pid}}/{{int(sig)}}'] = 'SENT'
                        except OSError as exc:
                            outcome[f'{{pid}}/{{int(sig)}}'] = errno.errorcode.get(exc.errno)
                print(json.dumps(outcome))
                """,
            )
        assert set(report.values()) == {"EPERM"}, report
        await assert_victim_intact(victim)
        await assert_victim_intact(snapshot)  # a fork holds a copy of the victim's state
    finally:
        await snapshot.close()
        await victim.close()
    await assert_fresh_session_works(live_pool)


async def test_sessions_cannot_see_each_others_processes(live_pool: SandboxPool) -> None:
    """/proc lists a session's own processes only; another session's pid, cmdline, environ, mem
    and status cannot be opened, and ptrace and process_vm_readv are refused."""
    victim = await victim_session(live_pool)
    try:
        target = await session_pid(victim)
        async with await live_pool.open_session() as spy:
            report = await run_json(
                spy,
                f"""
                import ctypes, errno, json, os
                libc = ctypes.CDLL(None, use_errno=True)
                out = {{"listed": sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
                        "me": os.getpid(), "files": {{}}}}
                for name in ('cmdline', 'environ', 'mem', 'status', 'maps'):
                    try:
                        open(f'/proc/{target}/{{name}}', 'rb').read(16)
                        out["files"][name] = 'READ'
                    except OSError as exc:
                        out["files"][name] = errno.errorcode.get(exc.errno)
                libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
                attached = libc.ptrace(16, {target}, None, None)  # PTRACE_ATTACH
                out["ptrace"] = [attached, errno.errorcode.get(ctypes.get_errno())]
                class IoVec(ctypes.Structure):
                    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
                buffer = ctypes.create_string_buffer(8)
                local, remote = IoVec(ctypes.addressof(buffer), 8), IoVec(0x400000, 8)
                read = libc.process_vm_readv(
                    {target}, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
                out["vm_readv"] = [read, errno.errorcode.get(ctypes.get_errno())]
                print(json.dumps(out))
                """,
            )
        assert report["listed"] == [report["me"]], report  # not the victim, the supervisor or init
        assert set(report["files"].values()) == {"ENOENT"}, report["files"]
        assert report["ptrace"] == [-1, "ESRCH"] or report["ptrace"] == [-1, "EPERM"], report
        assert report["vm_readv"][0] == -1 and report["vm_readv"][1] in ("ESRCH", "EPERM"), report
        await assert_victim_intact(victim)
    finally:
        await victim.close()
    await assert_fresh_session_works(live_pool)


async def test_sessions_cannot_read_each_others_files(live_pool: SandboxPool) -> None:
    """/work cannot be listed or written; another live session's folder cannot be entered."""
    async with await live_pool.open_session() as owner, await live_pool.open_session() as snoop:
        assert (await owner.exec("open('private.txt', 'w').write('owner-only')")).ok
        owner_dir = (await owner.exec("import os\nprint(os.getcwd())")).stdout.strip()
        report = await run_json(
            snoop,
            f"""
            import errno, json, os
            def attempt(call):
                try:
                    call()
                    return 'ALLOWED'
                except OSError as exc:
                    return errno.errorcode.get(exc.errno)
            stolen = []
            for slot in range({MAX_SESSIONS}):
                path = f'/work/{{slot}}/private.txt'
                if path.startswith(os.getcwd() + '/'):
                    continue
                try:
                    stolen.append(open(path).read())
                except OSError:
                    pass
            print(json.dumps({{
                "stolen": stolen,
                "list_work": attempt(lambda: os.listdir('/work')),
                "write_work": attempt(lambda: open('/work/left-behind', 'w').close()),
                "mkdir_work": attempt(lambda: os.mkdir('/work/mine')),
                "list_owner": attempt(lambda: os.listdir({owner_dir!r})),
                "write_owner": attempt(lambda: open({owner_dir!r} + '/planted', 'w').close()),
            }}))
            """,
        )
        listed = await owner.exec("import os\nprint(sorted(os.listdir('.')))")
    await assert_fresh_session_works(live_pool)
    assert report["stolen"] == [], report
    assert {k: v for k, v in report.items() if k != "stolen"} == {
        "list_work": "EACCES",
        "write_work": "EACCES",
        "mkdir_work": "EACCES",
        "list_owner": "EACCES",
        "write_owner": "EACCES",
    }
    assert listed.stdout == "['private.txt']\n"


async def test_one_session_filling_its_disk_leaves_the_others_theirs(live_pool: SandboxPool) -> None:
    """A session that fills its disk gets ENOSPC at its own size; a neighbour still writes as much
    as ever, and the next session in that slot starts with an empty disk."""
    async with await live_pool.open_session() as hog:
        hogged = await run_json(hog, fill("."))
        assert hogged["error"] == "ENOSPC" and hogged["total"] == SESSION_DISK_MB << 20, hogged
        async with await live_pool.open_session() as neighbour:
            assert await run_json(neighbour, fill(".")) == hogged  # the same disk of its own, in full
    async with await live_pool.open_session() as later:
        fresh = await run_json(
            later,
            "import json, os, shutil\nprint(json.dumps([os.listdir('.'), shutil.disk_usage('.').free]))",
        )
    assert fresh == [[], SESSION_DISK_MB << 20]
    await assert_fresh_session_works(live_pool)


async def test_a_snapshot_cannot_reach_the_next_tenant_of_its_sessions_folder(live_pool: SandboxPool) -> None:
    """A snapshot outlives its session and shares its uid: it may hold a file open in the closed
    session's folder. That folder goes to no one else until the snapshot is gone too, so what the
    snapshot writes there never fills (or shows up on) another tenant's disk."""
    session = await live_pool.open_session()
    assert (await session.exec("import os\nhome = os.getcwd()\nopen('left.txt', 'w').write('x')")).ok
    home = (await session.exec("print(home)")).stdout.strip()
    snapshot = await session.fork()
    try:
        opened = await snapshot.exec("held = [open(home + f'/held-{i}.bin', 'wb') for i in range(2)]")
        assert opened.ok, opened.text()
        await session.close()
        async with await live_pool.open_session() as tenant:
            cwd = (await tenant.exec("import os\nprint(os.getcwd())")).stdout.strip()
            assert cwd != home  # the closed session's folder is not handed out
            fill_held = """
                try:
                    for f in held:  # two files: one alone would stop at the file size limit first
                        f.write(b'z' * (30 << 20))
                        f.flush()
                except OSError as exc:
                    print(exc.errno)
                """
            wrote = await run(snapshot, fill_held)
            assert wrote.stdout.strip() == "28", wrote.text()  # ENOSPC: its own uid's old disk only
            free = await tenant.exec("import shutil\nprint(shutil.disk_usage('.').free)")
            assert int(free.stdout) == SESSION_DISK_MB << 20
    finally:
        await snapshot.close()
    async with await live_pool.open_session() as later:  # the folder is free again, and empty
        report = await run_json(
            later,
            """
            import json, os, shutil
            print(json.dumps([os.getcwd(), os.listdir('.'), shutil.disk_usage('.').free]))
            """,
        )
    assert report == [home, [], SESSION_DISK_MB << 20], report
    await assert_fresh_session_works(live_pool)


async def test_kill_every_process_reaches_only_the_own_session(live_pool: SandboxPool) -> None:
    """os.kill(-1, SIGKILL) reaches the session's own processes only (Linux spares the caller):
    its child dies; its worker, the neighbours and the kernel live on."""
    replaced = live_pool.status().kernels_replaced
    baseline = await processes(live_pool)
    async with harmed_session(live_pool) as session:
        await session.exec("kept = 1")
        result = await run(
            session,
            """
            import os, subprocess
            child = subprocess.Popen(['sleep', '3600'])
            os.kill(-1, 9)
            print(child.wait(), kept)
            """,
        )
        assert (result.status, result.stdout, result.state_survived) == ("ok", "-9 1\n", True), result.text()
    await assert_processes_return_to(live_pool, baseline)
    assert live_pool.status().kernels_replaced == replaced


async def test_nothing_outlives_a_session(live_pool: SandboxPool) -> None:
    """Files, background processes and IPC objects: nothing a closed session made reaches the
    next one (IPC objects cannot be made at all: they outlive their maker)."""
    baseline = await processes(live_pool)
    async with await live_pool.open_session() as writer:
        report = await run_json(
            writer,
            """
            import ctypes, errno, json, os, subprocess
            libc = ctypes.CDLL(None, use_errno=True)
            open('secret.txt', 'w').write('of a closed session')
            subprocess.Popen(['sh', '-c', 'setsid sleep 3600 &'])
            out = {}
            for name, call in [('msgget', lambda: libc.msgget(0, 0o1666)),
                               ('shmget', lambda: libc.shmget(0, 4096, 0o1666)),
                               ('semget', lambda: libc.semget(0, 1, 0o1666)),
                               ('mq_open', lambda: libc.mq_open(b'/leak', 0o102, 0o666, None))]:
                out[name] = call()
            print(json.dumps(out))
            """,
        )
        assert set(report.values()) == {-1}, report
    async with await live_pool.open_session() as reader:
        seen = await run_json(
            reader,
            """
            import json, os
            print(json.dumps({"files": os.listdir('.'),
                              "procs": [p for p in os.listdir('/proc') if p.isdigit()]}))
            """,
        )
    assert seen["files"] == [] and len(seen["procs"]) == 1, seen
    await assert_processes_return_to(live_pool, baseline)  # the detached sleep went with its session
    await assert_fresh_session_works(live_pool)


async def test_sessions_cannot_make_namespaces_or_mounts(live_pool: SandboxPool) -> None:
    """A session cannot create user (or any) namespaces or mount anything, while threads,
    subprocesses and forks (clone without namespace flags) work."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import ctypes, errno, json, os, subprocess, threading
            libc = ctypes.CDLL(None, use_errno=True)
            out = {}
            for name, flags in [('user', 0x10000000), ('mountns', 0x20000), ('pid', 0x20000000),
                                ('net', 0x40000000)]:
                out[name] = [libc.unshare(flags), errno.errorcode.get(ctypes.get_errno())]
            out["mount"] = [libc.mount(b'none', b'.', b'tmpfs', 0, None),
                            errno.errorcode.get(ctypes.get_errno())]
            box = []
            t = threading.Thread(target=lambda: box.append(1)); t.start(); t.join()
            out["thread"] = box
            out["subprocess"] = subprocess.run(['echo', 'ok'], capture_output=True, text=True).stdout
            pid = os.fork()
            if pid == 0:
                os._exit(7)
            out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            print(json.dumps(out))
            """,
        )
    for name in ("user", "mountns", "pid", "net", "mount"):
        assert report[name] == [-1, "EPERM"], (name, report)
    assert report["thread"] == [1] and report["subprocess"] == "ok\n" and report["fork"] == 7
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- devices and Docker


async def test_docker_socket_and_host_devices_are_unreachable(live_pool: SandboxPool) -> None:
    """No Docker socket, no block devices or /dev/mem, and mknod is refused."""
    async with await live_pool.open_session() as session:
        report = await run_json(
            session,
            """
            import errno, json, os, socket, stat
            out = {}
            out["sockets"] = [p for p in ('/var/run/docker.sock', '/run/docker.sock',
                                          '/run/containerd/containerd.sock') if os.path.exists(p)]
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect('/var/run/docker.sock')
                out["connect"] = 'CONNECTED'
            except OSError as exc:
                out["connect"] = errno.errorcode.get(exc.errno)
            out["block"] = [n for n in os.listdir('/dev') if stat.S_ISBLK(os.lstat('/dev/' + n).st_mode)]
            out["present"] = [p for p in ('/dev/mem', '/dev/kmem', '/dev/port', '/dev/sda', '/dev/vda',
                                          '/dev/nvme0n1', '/dev/kvm', '/dev/fuse', '/dev/kmsg')
                              if os.path.exists(p)]
            readable = []
            for p in ('/dev/mem', '/dev/sda', '/dev/vda', '/proc/kcore', '/dev/kmsg'):
                try:
                    open(p, 'rb').read(1)
                    readable.append(p)
                except OSError:
                    pass
            out["readable"] = readable
            mknod = {}
            for where in ('/tmp', '.', '/dev/shm'):
                try:
                    os.mknod(os.path.join(where, 'mem'), 0o600 | stat.S_IFCHR, os.makedev(1, 1))
                    mknod[where] = 'CREATED'
                except OSError as exc:
                    mknod[where] = errno.errorcode.get(exc.errno)
            out["mknod"] = mknod
            print(json.dumps(out))
            """,
        )
    assert report["sockets"] == [] and report["connect"] == "ENOENT"
    assert report["block"] == [] and report["present"] == [] and report["readable"] == []
    assert report["mknod"]["."] == "EPERM", report["mknod"]  # no CAP_MKNOD
    assert "CREATED" not in report["mknod"].values(), report["mknod"]
    await assert_fresh_session_works(live_pool)


# --------------------------------------------------------------------------- last: cleanup


async def test_closing_the_pool_leaves_no_container(
    hostile_pool: SandboxPool, foreign_containers: set[str]
) -> None:
    """After the pools of this module close, no container of theirs remains (runs last)."""
    # Another pool on the same engine works from scratch and is cleaned up too.
    second = SandboxPool(SandboxConfig(backend="docker", pool_size=1))
    await second.start()
    try:
        await assert_fresh_session_works(second)
    finally:
        await second.close()
    await hostile_pool.close()

    def leftovers() -> dict[str, str]:
        return {cid: name for cid, name in _our_containers().items() if cid not in foreign_containers}

    await wait_until(lambda: not leftovers(), "the sandbox containers to be removed", timeout=30)
    assert leftovers() == {}
