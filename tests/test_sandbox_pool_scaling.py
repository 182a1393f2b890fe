"""The sandbox pool grows and shrinks with load: placement by session count and memory, shared
kernel starts, the ``max_kernels`` ceiling (a bounded wait, then SandboxCapacityError), idle
kernels stopped. Scripted kernels (in memory, instant) for the rules; the local backend for one
real round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from critloop.config import load_config
from critloop.errors import ConfigError, SandboxCapacityError, SandboxClosedError, SandboxUnavailableError
from critloop.sandbox import SandboxConfig, SandboxPool, Session
from critloop.sandbox import kernel as kernel_module
from critloop.sandbox._client import KernelClient
from critloop.sandbox.backend import OnKernelClose, SandboxBackend

MB = 1 << 20


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds: state another task changes, with no event to await."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


class ScriptedKernel:
    """A kernel's channel in memory: answers open, fork, exec, close and ping at once, with the
    memory report and the session slots a test sets."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sessions: set[str] = set()
        self.memory: dict[str, int] | None = None
        """Sent as ``memory`` in the replies of open, fork and ping (None: unknown)."""
        self.slots: int | None = None
        """Like the kernel's max_sessions_per_kernel: open refuses past it."""
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._frames = kernel_module.FrameReader()
        self._inbox.put_nowait(
            kernel_module.encode_frame({"event": "ready", "protocol": kernel_module.PROTOCOL_VERSION})
        )

    async def read(self) -> bytes:
        return await self._inbox.get()

    async def write(self, data: bytes) -> None:
        self._frames.feed(data)
        for request in self._frames:
            self._inbox.put_nowait(kernel_module.encode_frame({"id": request["id"], **self._answer(request)}))

    async def close(self) -> None:
        self._inbox.put_nowait(b"")  # end of stream: the client's read loop ends

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "open":
            if self.slots is not None and len(self.sessions) >= self.slots:
                return {"ok": False, "error": "RuntimeError: no free session slot (all 2 taken)"}
            self.sessions.add(request["session"])
            return {"ok": True, "session": request["session"], "memory": self.memory}
        if op == "fork":
            self.sessions.add(request["new_session"])
            return {"ok": True, "session": request["new_session"], "memory": self.memory}
        if op == "close":
            self.sessions.discard(request["session"])
            return {"ok": True, "session": request["session"]}
        if op == "exec":
            return {"ok": True, "result": {"status": "ok", "stdout": f"{self.name}\n"}}
        if op == "ping":
            return {"ok": True, "sessions": sorted(self.sessions), "memory": self.memory}
        return {"ok": False, "error": f"ValueError: unknown op {op!r}"}


class ScriptedBackend(SandboxBackend):
    """Starts scripted kernels; counts starts and stops."""

    name = "scripted"
    isolated = False

    def __init__(self) -> None:
        self.kernels: dict[KernelClient, ScriptedKernel] = {}
        self.started = 0
        self.stopped: list[str] = []

    async def start_kernel(self, on_close: OnKernelClose) -> KernelClient:
        self.started += 1
        script = ScriptedKernel(f"k{self.started}")
        client = KernelClient(script, name=script.name, on_close=on_close)
        await client.wait_ready(5)
        self.kernels[client] = script
        return client

    async def stop_kernel(self, kernel: KernelClient) -> None:
        if self.kernels.pop(kernel, None) is not None:
            self.stopped.append(kernel.name)
        await kernel.close()

    def script(self, session: Session) -> ScriptedKernel:
        """The scripted kernel hosting ``session``."""
        return self.kernels[session._kernel]


def scripted_pool(**options: Any) -> tuple[SandboxPool, ScriptedBackend]:
    backend = ScriptedBackend()
    return SandboxPool(SandboxConfig(**options), backend=backend), backend


def kernel_of(session: Session) -> str:
    return session._kernel.name


# --------------------------------------------------------------------------- growth


async def test_a_kernel_starts_when_every_kernel_holds_sessions_per_kernel() -> None:
    pool, _ = scripted_pool(pool_size=1, max_kernels=4, sessions_per_kernel=2)
    async with pool:
        first, second = await pool.open_session(), await pool.open_session()
        assert pool.status().kernels == 1 and kernel_of(first) == kernel_of(second) == "k1"
        third = await pool.open_session()
        assert kernel_of(third) == "k2" and pool.status().kernels == 2
        # Forks go to their parent's kernel, full or not; snapshots count for new sessions.
        forks = [await third.fork() for _ in range(2)]
        assert {kernel_of(f) for f in forks} == {"k2"}
        assert kernel_of(await pool.open_session()) == "k3"
        status = pool.status()
        assert (status.kernels, status.kernels_started, status.peak_kernels, status.max_kernels) == (
            3,
            3,
            3,
            4,
        )
        assert (await third.exec("x")).stdout == "k2\n"


async def test_a_kernel_past_the_memory_threshold_takes_no_new_session() -> None:
    pool, backend = scripted_pool(pool_size=1, max_kernels=4, memory_mb=512)
    async with pool:
        (k1,) = backend.kernels.values()
        k1.memory = {"used": 300 * MB, "limit": 512 * MB}  # 59% of the limit: below 0.75
        a = await pool.open_session()
        b = await pool.open_session()
        assert kernel_of(a) == kernel_of(b) == "k1"
        k1.memory = {"used": 400 * MB, "limit": 512 * MB}  # 78%: reported with this open
        c = await pool.open_session()
        assert kernel_of(c) == "k1" and pool.status().kernels == 1
        d = await pool.open_session()
        assert kernel_of(d) == "k2" and pool.status().kernels == 2
        assert (d._kernel.memory_used, d._kernel.memory_limit) == (None, None)  # unknown: not over
        assert [kernel_of(await pool.open_session()) for _ in range(3)] == ["k2"] * 3  # 4 there, 3 on k1
        # A fresh report below the threshold (here, a ping) makes k1 a candidate again.
        k1.memory = {"used": 100 * MB, "limit": 512 * MB}
        await pool.ping()
        assert kernel_of(await pool.open_session()) == "k1"
        assert pool.status().kernels_started == 2


async def test_the_memory_threshold_falls_back_to_memory_mb_without_a_reported_limit() -> None:
    pool, backend = scripted_pool(pool_size=1, max_kernels=2, memory_mb=100, memory_threshold=0.5)
    async with pool:
        (k1,) = backend.kernels.values()
        k1.memory = {"used": 60 * MB}  # no limit: 60% of memory_mb
        await pool.open_session()
        assert kernel_of(await pool.open_session()) == "k2"


async def test_a_burst_of_opens_starts_only_the_kernels_it_needs() -> None:
    pool, backend = scripted_pool(pool_size=1, max_kernels=12, sessions_per_kernel=16)
    async with pool:
        sessions = await asyncio.gather(*(pool.open_session() for _ in range(128)))
        status = pool.status()
        assert status.sessions == 128
        assert backend.started == status.kernels_started == status.peak_kernels == 8  # ceil(128 / 16)
        assert sorted(len(k.sessions) for k in backend.kernels.values()) == [16] * 8
        await asyncio.gather(*(s.close() for s in sessions))
        assert pool.status().sessions == 0


async def test_a_burst_past_the_ceiling_waits_and_every_open_succeeds() -> None:
    pool, backend = scripted_pool(pool_size=2, max_kernels=3, sessions_per_kernel=4, open_timeout_seconds=10)

    async def one() -> str:
        async with await pool.open_session() as session:
            return (await session.exec("x")).stdout

    async with pool:
        outputs = await asyncio.gather(*(one() for _ in range(40)))
        assert len(outputs) == 40 and set(outputs) <= {"k1\n", "k2\n", "k3\n"}
        status = pool.status()
        assert backend.started == status.peak_kernels == 3 and status.sessions == 0


async def test_at_the_ceiling_an_open_waits_until_a_session_closes() -> None:
    pool, backend = scripted_pool(pool_size=1, max_kernels=1, sessions_per_kernel=2, open_timeout_seconds=30)
    async with pool:
        first, _ = await pool.open_session(), await pool.open_session()
        opening = asyncio.create_task(pool.open_session())
        await until(lambda: pool._room is not None, "the open to wait for room")
        assert not opening.done() and backend.started == 1
        await first.close()
        third = await asyncio.wait_for(opening, 5)
        assert kernel_of(third) == "k1" and backend.started == 1 and first.closed


async def test_at_the_ceiling_an_open_fails_after_open_timeout_seconds() -> None:
    pool, backend = scripted_pool(
        pool_size=1, max_kernels=1, sessions_per_kernel=1, open_timeout_seconds=0.05
    )
    async with pool:
        running = await pool.open_session()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(SandboxCapacityError) as failed:
            await pool.open_session()
        assert loop.time() - began >= 0.05
        assert isinstance(failed.value, SandboxUnavailableError)
        message = str(failed.value)
        assert message.startswith("no sandbox capacity: 1 kernels (max_kernels)")
        assert "waited 0.05s" in message and "raise [sandbox] max_kernels or open_timeout_seconds" in message
        # The running session was left alone.
        assert not running.closed and (await running.exec("x")).ok
        assert backend.started == 1 and pool.status().sessions == 1


async def test_at_the_ceiling_a_falling_memory_report_makes_room() -> None:
    pool, backend = scripted_pool(pool_size=1, max_kernels=1, open_timeout_seconds=30)
    async with pool:
        (k1,) = backend.kernels.values()
        k1.memory = {"used": 500 * MB, "limit": 512 * MB}
        await pool.open_session()
        opening = asyncio.create_task(pool.open_session())
        await until(lambda: pool._room is not None, "the open to wait for room")
        k1.memory = {"used": 200 * MB, "limit": 512 * MB}
        await pool.ping()  # what the waiting open also does, once a second
        assert kernel_of(await asyncio.wait_for(opening, 5)) == "k1"


async def test_at_the_ceiling_the_waiting_open_asks_for_fresh_memory_reports() -> None:
    pool, backend = scripted_pool(pool_size=1, max_kernels=1, open_timeout_seconds=30)
    async with pool:
        (k1,) = backend.kernels.values()
        k1.memory = {"used": 500 * MB, "limit": 512 * MB}
        await pool.open_session()
        k1.memory = {"used": 200 * MB, "limit": 512 * MB}  # nobody told the pool
        assert kernel_of(await asyncio.wait_for(pool.open_session(), 5)) == "k1"


async def test_a_kernel_out_of_session_slots_counts_as_full() -> None:
    pool, backend = scripted_pool(pool_size=1, max_kernels=3, sessions_per_kernel=16)
    async with pool:
        (k1,) = backend.kernels.values()
        k1.slots = 2
        sessions = [await pool.open_session() for _ in range(3)]
        assert [kernel_of(s) for s in sessions] == ["k1", "k1", "k2"]
        assert kernel_of(await pool.open_session()) == "k2"  # k1 stays full: not asked again
        await sessions[0].close()
        assert kernel_of(await pool.open_session()) == "k1"  # room again once a session left


# --------------------------------------------------------------------------- shrinking, deaths


async def test_idle_kernels_beyond_pool_size_stop_and_the_warm_ones_stay() -> None:
    pool, backend = scripted_pool(pool_size=2, max_kernels=4, sessions_per_kernel=1, kernel_idle_seconds=0.05)
    async with pool:
        sessions = [await pool.open_session() for _ in range(4)]
        assert pool.status().kernels == 4
        await sessions[3].close()
        await until(lambda: pool.status().kernels == 3, "the idle kernel to stop")
        for session in sessions[:3]:
            await session.close()
        await until(lambda: pool.status().kernels == 2, "the idle kernels to stop down to pool_size")
        status = pool.status()
        assert (status.kernels_stopped_idle, status.kernels_replaced, status.kernels_started) == (2, 0, 4)
        assert len(backend.stopped) == 2 and len(backend.kernels) == 2
        assert not pool._idle_timers  # nothing is left to stop the warm ones
        # It grows again, and shrinks again; kernels hosting sessions are never stopped.
        busy = [await pool.open_session() for _ in range(3)]
        assert pool.status().kernels == 3 and backend.started == 5
        grown = next(s for s in busy if kernel_of(s) == "k5")
        await grown.close()
        await until(lambda: pool.status().kernels_stopped_idle == 3, "the grown kernel to stop")
        assert pool.status().kernels == 2
        assert [(await s.exec("x")).ok for s in busy if s is not grown] == [True, True]


async def test_a_dead_kernel_is_replaced_and_its_sessions_reopen_elsewhere() -> None:
    pool, _ = scripted_pool(pool_size=1, max_kernels=2)
    async with pool:
        session = await pool.open_session()
        await session._kernel.close()  # the channel ends: the kernel died
        await until(
            lambda: pool.status().kernels == 1 and pool.status().kernels_replaced == 1, "a replacement"
        )
        result = await session.exec("x")
        assert result.ok and not result.state_survived and kernel_of(session) == "k2"
        assert pool.status().kernels_stopped_idle == 0


async def test_close_wakes_a_waiting_open() -> None:
    pool, _ = scripted_pool(pool_size=1, max_kernels=1, sessions_per_kernel=1, open_timeout_seconds=30)
    await pool.start()
    await pool.open_session()
    opening = asyncio.create_task(pool.open_session())
    await until(lambda: pool._room is not None, "the open to wait for room")
    await pool.close()
    with pytest.raises(SandboxClosedError, match="the pool is closed"):
        await asyncio.wait_for(opening, 5)


# --------------------------------------------------------------------------- configuration


def test_max_kernels_below_pool_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"max_kernels \(2\) must be at least pool_size \(4\)"):
        SandboxConfig(pool_size=4, max_kernels=2)
    path = tmp_path / "critloop.toml"
    path.write_text("[sandbox]\npool_size = 12\n")
    with pytest.raises(ConfigError, match=r"sandbox: .*max_kernels \(8\) must be at least pool_size \(12\)"):
        load_config(path)
    config = SandboxConfig()
    assert (config.max_kernels, config.sessions_per_kernel, config.memory_threshold) == (8, 16, 0.75)
    assert (config.kernel_idle_seconds, config.open_timeout_seconds) == (60.0, 30.0)


# --------------------------------------------------------------------------- a real kernel


async def test_the_local_backend_grows_and_shrinks() -> None:
    config = SandboxConfig(
        backend="local",
        pool_size=1,
        max_kernels=2,
        sessions_per_kernel=1,
        kernel_idle_seconds=0.05,
        timeout_seconds=5,
    )
    async with SandboxPool(config) as pool:
        a, b = await pool.open_session(), await pool.open_session()
        assert pool.status().kernels == 2 and a._kernel is not b._kernel
        assert [(await s.exec("print(6 * 7)")).stdout for s in (a, b)] == ["42\n", "42\n"]
        await b.close()
        await until(lambda: pool.status().kernels == 1, "the idle local kernel to stop", timeout=30)
        assert pool.status().kernels_replaced == 0 and (await a.exec("print(1)")).stdout == "1\n"
