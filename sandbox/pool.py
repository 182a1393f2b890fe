"""The sandbox pool and its sessions: the API the critic and tools use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from critloop.errors import (
    SandboxCapacityError,
    SandboxClosedError,
    SandboxProtocolError,
    SandboxUnavailableError,
)
from critloop.sandbox._client import KernelClient, KernelDied
from critloop.sandbox.backend import SandboxBackend
from critloop.sandbox.config import SandboxConfig
from critloop.sandbox.types import ExecResult

__all__ = ["PoolStatus", "SandboxPool", "Session", "create_backend"]

logger = logging.getLogger("critloop.sandbox")

_REPLY_MARGIN = 30.0
"""Seconds past a run's own limit (and grace) before the host gives up on a silent kernel."""


def create_backend(config: SandboxConfig) -> SandboxBackend:
    """The backend ``config.backend`` names. ``auto`` takes Docker when an engine answers (and
    then insists on it: a missing image is an error, never a silent fall back to local code
    execution), and the local backend, with a warning, when none does. Blocking."""
    from critloop.sandbox.docker_backend import DockerBackend, docker_client
    from critloop.sandbox.local_backend import LocalBackend

    if config.backend == "local":
        return LocalBackend(config)
    if config.backend == "docker":
        return DockerBackend(config)
    try:
        client = docker_client(timeout=3)
    except SandboxUnavailableError:
        return LocalBackend(config)
    return DockerBackend(config, client=client)


@dataclass(frozen=True, kw_only=True)
class PoolStatus:
    """A snapshot of a pool."""

    backend: str
    isolated: bool
    kernels: int
    """Kernels running now."""
    sessions: int
    """Sessions open now (forks included)."""
    kernels_replaced: int
    """Kernels that died since the pool started (each replaced in the background while the pool
    runs fewer than ``pool_size``, or when it hosted sessions). Kernels stopped for being idle are
    not counted here."""
    max_kernels: int
    """The ceiling the pool grows to (``SandboxConfig.max_kernels``)."""
    kernels_started: int
    """Kernels started since the pool started: the warm ones, the pool's growth and replacements."""
    kernels_stopped_idle: int
    """Kernels beyond ``pool_size`` stopped after ``kernel_idle_seconds`` without a session."""
    peak_kernels: int
    """Most kernels running or starting at once since the pool started (never past
    ``max_kernels``)."""


_NO_SLOT = "no free session slot"
"""Part of the kernel's refusal of an ``open`` when every one of its session slots is taken
(``max_sessions_per_kernel``, forks included)."""

_MEMORY_RECHECK_SECONDS = 1.0
"""At the ceiling, how often the kernels past the memory threshold are asked for a fresh report:
memory also falls without a session closing (a large run ends), and nothing else would say so."""


class _Start:
    """A kernel starting. Openers that find no room wait for it (``claims`` of them, at most
    ``sessions_per_kernel``) instead of each starting a kernel of their own."""

    __slots__ = ("claims", "task")

    def __init__(self) -> None:
        self.claims = 0
        self.task: asyncio.Task[KernelClient]


def _byte_count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _log_start_failure(task: asyncio.Task[KernelClient]) -> None:
    # Also retrieves the exception of a start nobody waited for (a replacement).
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, SandboxClosedError):
        logger.warning("a sandbox kernel failed to start: %s", error)


class SandboxPool:
    """Kernels that host sandbox sessions, as many as the load needs.

    Each kernel (a container, or a local process) hosts many sessions; a session is a worker
    process forked from the kernel's pre-imported template, so opening one costs milliseconds.
    Closing a session kills its worker and everything it started, and removes its files: the
    next session starts clean. A kernel that dies is replaced in the background.

    The pool keeps ``pool_size`` kernels warm and grows with load: a new session goes to the
    least-loaded kernel below ``sessions_per_kernel`` sessions and ``memory_threshold`` of its
    memory; when none is, a kernel starts for it (openers share a start in progress), up to
    ``max_kernels``. At that ceiling, opening waits up to ``open_timeout_seconds`` for room, then
    raises :class:`~critloop.errors.SandboxCapacityError`; a running session is never stopped to
    make room. Kernels beyond ``pool_size`` that host no session for ``kernel_idle_seconds``
    stop.

    Example:
        >>> import asyncio
        >>> from critloop.sandbox import SandboxConfig, SandboxPool
        >>> async def main():
        ...     async with SandboxPool(SandboxConfig(pool_size=1)) as pool:
        ...         async with await pool.open_session() as session:
        ...             await session.exec("x = 6 * 7")
        ...             return (await session.exec("print(x)")).stdout
        >>> asyncio.run(main())  # doctest: +SKIP
        '42\\n'
    """

    def __init__(self, config: SandboxConfig | None = None, *, backend: SandboxBackend | None = None) -> None:
        self.config = config or SandboxConfig()
        self._given_backend = backend
        self._backend: SandboxBackend | None = backend
        self._kernels: list[KernelClient] = []
        """Kernels started and not yet stopped by the pool (a dead one leaves at its channel's end)."""
        self._sessions: set[Session] = set()
        self._starts: set[_Start] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        """Kernels being stopped: dead ones, idle ones."""
        self._releasing: set[asyncio.Task[None]] = set()
        self._empty_since: dict[KernelClient, float] = {}
        """When each kernel that hosts no session became empty (event loop time)."""
        self._idle_timers: dict[KernelClient, asyncio.TimerHandle] = {}
        self._slot_cap: dict[KernelClient, int] = {}
        """Kernels that refused an open for want of a session slot, and how many sessions they
        hosted then: no new session goes there until they host fewer."""
        self._room: asyncio.Event | None = None
        """Set (and replaced) when room may have come: a session left, a kernel started or
        stopped, a memory report fell. Made on demand, in the loop that waits on it."""
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -_MEMORY_RECHECK_SECONDS
        self._generation = 0
        self._started = False
        self._closed = False
        self._replaced = 0
        self._kernels_started = 0
        self._stopped_idle = 0
        self._peak = 0
        self._start_lock = asyncio.Lock()

    @property
    def backend(self) -> SandboxBackend:
        if self._backend is None:
            raise SandboxClosedError("the pool is not started")
        return self._backend

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called since the last :meth:`start`."""
        return self._closed

    async def start(self) -> SandboxPool:
        """Pick the backend and start ``pool_size`` kernels (concurrently). Idempotent; after
        :meth:`close` it starts a new set of kernels (sessions of before stay closed)."""
        async with self._start_lock:
            self._closed = False
            if self._started:
                return self
            if self._backend is None:
                self._backend = await asyncio.to_thread(create_backend, self.config)
            backend: SandboxBackend = self._backend
            starts = [self._begin_start() for _ in range(self.config.pool_size)]
            results = await asyncio.gather(*(start.task for start in starts), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors and len(errors) == len(results):
                await backend.close()
                raise errors[0]
            self._started = True
            return self

    # ------------------------------------------------------------------ kernels: start, death, idle

    def _live(self) -> list[KernelClient]:
        return [k for k in self._kernels if k.alive]

    def _kernel_count(self) -> int:
        """Kernels running or starting: what ``max_kernels`` bounds."""
        return len(self._live()) + len(self._starts)

    def _begin_start(self) -> _Start:
        start = _Start()
        self._starts.add(start)
        self._peak = max(self._peak, self._kernel_count())
        start.task = asyncio.create_task(self._run_start(start), name="critloop-kernel-start")
        start.task.add_done_callback(_log_start_failure)
        return start

    async def _run_start(self, start: _Start) -> KernelClient:
        backend, generation = self.backend, self._generation
        try:
            kernel = await backend.start_kernel(self._kernel_closed)
        finally:
            self._starts.discard(start)
        if self._closed or generation != self._generation:
            await backend.stop_kernel(kernel)
            raise SandboxClosedError("the pool closed while a kernel started")
        if not kernel.alive:
            raise SandboxUnavailableError(f"sandbox kernel {kernel.name} exited right after start-up")
        self._kernels.append(kernel)
        self._kernels_started += 1
        self._empty_since[kernel] = asyncio.get_running_loop().time()
        self._arm_idle_timers()
        self._signal_room()
        return kernel

    def _forget(self, kernel: KernelClient) -> None:
        """Drop a kernel the pool no longer runs from the pool's accounting."""
        self._kernels.remove(kernel)
        self._empty_since.pop(kernel, None)
        self._slot_cap.pop(kernel, None)
        timer = self._idle_timers.pop(kernel, None)
        if timer is not None:
            timer.cancel()

    def _stop(self, kernel: KernelClient) -> None:
        task = asyncio.create_task(self.backend.stop_kernel(kernel), name=f"critloop-stop-{kernel.name}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _kernel_closed(self, kernel: KernelClient) -> None:
        # Kernels the pool stops itself (idle ones, every one at close) are forgotten first: this
        # sees only deaths.
        if kernel not in self._kernels or self._closed:
            return
        self._forget(kernel)
        self._replaced += 1
        self._stop(kernel)
        # Its sessions re-open elsewhere at their next call (growing the pool if needed); a
        # replacement keeps the warm kernels warm, and has their new home ready.
        wanted = bool(kernel.sessions) or self._kernel_count() < self.config.pool_size
        if wanted and self._kernel_count() < self.config.max_kernels:
            logger.warning("sandbox kernel %s died; starting a replacement", kernel.name)
            self._begin_start()
        else:
            logger.warning("sandbox kernel %s died", kernel.name)
        self._signal_room()

    def _arm_idle_timers(self) -> None:
        """Schedule the idle check of each empty kernel while the pool runs more than ``pool_size``
        (a timer per empty kernel, never a polling loop)."""
        if self._closed or len(self._live()) <= self.config.pool_size:
            return
        loop = asyncio.get_running_loop()
        for kernel, since in self._empty_since.items():
            if kernel not in self._idle_timers:
                delay = max(0.0, since + self.config.kernel_idle_seconds - loop.time())
                self._idle_timers[kernel] = loop.call_later(delay, self._idle_due, kernel)

    def _idle_due(self, kernel: KernelClient) -> None:
        self._idle_timers.pop(kernel, None)
        since = self._empty_since.get(kernel)
        if self._closed or kernel not in self._kernels or since is None or kernel.sessions:
            return
        if not kernel.alive:
            return  # dead, not idle: _kernel_closed takes it
        loop = asyncio.get_running_loop()
        left = since + self.config.kernel_idle_seconds - loop.time()
        if left > 0:  # it hosted sessions, and emptied again, since this check was scheduled
            self._idle_timers[kernel] = loop.call_later(left, self._idle_due, kernel)
            return
        if len(self._live()) <= self.config.pool_size:
            return  # one of the warm kernels now; re-armed when the pool grows again
        self._forget(kernel)
        self._stopped_idle += 1
        logger.info("sandbox kernel %s idle for %.1fs: stopping it", kernel.name, loop.time() - since)
        self._stop(kernel)
        self._signal_room()  # below the ceiling again

    # ------------------------------------------------------------------ placement

    def _claim(self, kernel: KernelClient, sid: str) -> None:
        """Count ``sid`` on ``kernel`` (before its request is sent: concurrent openers see it)."""
        kernel.sessions.add(sid)
        self._empty_since.pop(kernel, None)

    def _unclaim(self, kernel: KernelClient, sid: str) -> None:
        kernel.sessions.discard(sid)
        if kernel not in self._kernels:
            return
        if not kernel.sessions:
            self._empty_since[kernel] = asyncio.get_running_loop().time()
            self._arm_idle_timers()
        self._signal_room()

    def _over_memory(self, kernel: KernelClient) -> bool:
        used = kernel.memory_used
        if used is None:
            return False  # unknown (the local backend): not over
        limit = kernel.memory_limit or self.config.memory_mb << 20
        return used > self.config.memory_threshold * limit

    def _note_memory(self, kernel: KernelClient, reply: dict[str, Any]) -> None:
        """Record a reply's memory report (``{"used", "limit"}`` in bytes, or null: unknown)."""
        was_over = self._over_memory(kernel)
        report = reply.get("memory")
        used = limit = None
        if isinstance(report, dict):
            used, limit = report.get("used"), report.get("limit")
        kernel.memory_used, kernel.memory_limit = _byte_count(used), _byte_count(limit) or None
        if was_over and not self._over_memory(kernel):
            self._signal_room()

    def _roomiest(self, avoid: set[KernelClient]) -> KernelClient | None:
        """The live kernel with the fewest sessions among those with room for a new one."""
        cap = self.config.sessions_per_kernel
        room = [
            k
            for k in self._live()
            if k not in avoid and len(k.sessions) < self._slot_cap.get(k, cap) and not self._over_memory(k)
        ]
        return min(room, key=lambda k: len(k.sessions), default=None)

    def _start_to_join(self) -> _Start | None:
        """A start in progress with room for one more opener, else a new one below the ceiling."""
        for start in self._starts:
            if start.claims < self.config.sessions_per_kernel:
                return start
        if self._kernel_count() < self.config.max_kernels:
            return self._begin_start()
        return None

    def _signal_room(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    async def _wait_for_room(self, deadline: float) -> None:
        """At the ceiling: return when room may have come, raise SandboxCapacityError past ``deadline``."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            c = self.config
            raise SandboxCapacityError(
                f"no sandbox capacity: {c.max_kernels} kernels (max_kernels) each host "
                f"{c.sessions_per_kernel} sessions (sessions_per_kernel) or are past "
                f"{c.memory_threshold:.0%} of their memory (memory_threshold); waited "
                f"{c.open_timeout_seconds:g}s (raise [sandbox] max_kernels or open_timeout_seconds)"
            )
        if self._room is None:
            self._room = asyncio.Event()
        room = self._room
        if any(self._over_memory(k) for k in self._live()):
            self._refresh_memory()
            remaining = min(remaining, _MEMORY_RECHECK_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(room.wait(), remaining)

    def _refresh_memory(self) -> None:
        """Ask the kernels past the memory threshold for a fresh report: one round of pings in
        the background, shared by every waiting open, at most once per recheck interval."""
        loop = asyncio.get_running_loop()
        if self._refreshing is not None or loop.time() - self._refreshed_at < _MEMORY_RECHECK_SECONDS:
            return
        self._refreshed_at = loop.time()
        over = [k for k in self._live() if self._over_memory(k)]
        self._refreshing = asyncio.create_task(self._ping_each(over), name="critloop-memory-refresh")
        self._refreshing.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None

    async def _ping_each(self, kernels: list[KernelClient]) -> None:
        async def one(kernel: KernelClient) -> None:
            with contextlib.suppress(KernelDied, SandboxProtocolError):
                self._note_memory(kernel, await kernel.request("ping", wait=self._wait()))

        await asyncio.gather(*(one(k) for k in kernels))

    async def _open(self, sid: str) -> KernelClient:
        """Open session ``sid`` on a kernel with room and return that kernel.

        The least-loaded live kernel below ``sessions_per_kernel`` sessions and the memory
        threshold takes it; when none has room, a kernel starts for it (a start in progress is
        shared, up to ``sessions_per_kernel`` openers each), up to ``max_kernels``; at that
        ceiling, it waits for room, up to ``open_timeout_seconds``.
        """
        loop = asyncio.get_running_loop()
        refused: set[KernelClient] = set()
        failures = 0
        deadline: float | None = None
        while True:
            if self._closed:
                raise SandboxClosedError("the pool is closed")
            if not self._started:
                await self.start()
                continue
            kernel = self._roomiest(refused)
            if kernel is None:
                start = self._start_to_join()
                if start is not None:
                    start.claims += 1
                    try:
                        await asyncio.shield(start.task)
                    finally:
                        start.claims -= 1
                    continue
                if deadline is None:
                    deadline = loop.time() + self.config.open_timeout_seconds
                await self._wait_for_room(deadline)
                continue
            self._claim(kernel, sid)
            try:
                reply = await kernel.request("open", wait=self._wait(), session=sid)
            except KernelDied:
                self._unclaim(kernel, sid)
                failures += 1
                if failures == 3:
                    raise SandboxUnavailableError("sandbox kernels keep dying at session start") from None
                continue
            except SandboxProtocolError as exc:
                self._unclaim(kernel, sid)
                if _NO_SLOT in str(exc):
                    # Full by the kernel's own count (its forks included): no new session goes
                    # there until it hosts fewer; another kernel, or a new one, takes this one.
                    self._slot_cap[kernel] = len(kernel.sessions)
                    continue
                # This kernel cannot fork a worker now (e.g. a fork bomb holds its pids): try another.
                refused.add(kernel)
                failures += 1
                if failures == 3:
                    raise SandboxUnavailableError(f"no sandbox kernel could open a session: {exc}") from None
                continue
            except BaseException:
                self._unclaim(kernel, sid)
                raise
            self._slot_cap.pop(kernel, None)
            self._note_memory(kernel, reply)
            return kernel

    def _wait(self, seconds: float = 0.0) -> float:
        return seconds + self.config.kill_grace_seconds + _REPLY_MARGIN

    async def open_session(self) -> Session:
        """A fresh session: new globals, empty work dir, sympy/numpy/math already imported.

        Raises:
            SandboxCapacityError: ``max_kernels`` kernels are full and no room came within
                ``open_timeout_seconds``.
        """
        sid = uuid.uuid4().hex[:16]
        kernel = await self._open(sid)
        session = Session(self, kernel, sid)
        self._sessions.add(session)
        return session

    def status(self) -> PoolStatus:
        backend = self._backend
        return PoolStatus(
            backend=backend.name if backend else "none",
            isolated=bool(backend and backend.isolated),
            kernels=len(self._live()),
            sessions=len(self._sessions),
            kernels_replaced=self._replaced,
            max_kernels=self.config.max_kernels,
            kernels_started=self._kernels_started,
            kernels_stopped_idle=self._stopped_idle,
            peak_kernels=self._peak,
        )

    async def ping(self) -> list[dict[str, Any]]:
        """Each live kernel's own report (pid, modules, sessions, process count, disk, memory)."""
        replies = []
        for kernel in self._live():
            with contextlib.suppress(KernelDied):
                reply = await kernel.request("ping", wait=self._wait())
                self._note_memory(kernel, reply)
                replies.append(reply)
        return replies

    async def settle(self) -> None:
        """Wait until every session released with :meth:`Session.release` is gone."""
        while self._releasing:
            await asyncio.wait(set(self._releasing))

    async def close(self) -> None:
        """Close every session and stop every kernel. Idempotent; :meth:`start` starts anew."""
        if self._closed:
            return
        self._closed = True
        self._generation += 1
        self._signal_room()  # waiting opens see the pool closed
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        if self._refreshing is not None:
            self._refreshing.cancel()
        # A start in flight stops its own kernel when it sees the pool closed; cancelling it
        # could leave a container half made.
        starting = [start.task for start in self._starts]
        if starting:
            _, late = await asyncio.wait(starting, timeout=self.config.start_timeout_seconds)
            for task in late:
                task.cancel()
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=self._wait())
        for session in list(self._sessions):
            session._closed = True
        self._sessions.clear()
        if self._backend is not None:
            await asyncio.gather(*(self._backend.stop_kernel(k) for k in self._kernels))
            if self._stopping:
                await asyncio.wait(set(self._stopping), timeout=self._wait())
            await self._backend.close()
        self._kernels.clear()
        self._empty_since.clear()
        self._slot_cap.clear()
        self._room = self._refreshing = None
        self._backend, self._started = self._given_backend, False
        self._start_lock = asyncio.Lock()  # a later start() may run in another event loop

    async def __aenter__(self) -> SandboxPool:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Session:
    """One persistent Python namespace in the sandbox, like a Jupyter kernel.

    Variables, imports and files persist across :meth:`exec` calls. Calls on one session run
    one at a time; different sessions run concurrently. If the session's worker dies (or its
    whole kernel), the call reports it (``status``, ``state_survived``) and the session goes on
    in a fresh worker.
    """

    def __init__(self, pool: SandboxPool, kernel: KernelClient, sid: str) -> None:
        self.id = sid
        self._pool = pool
        self._kernel = kernel
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def exec(
        self, code: str, *, timeout: float | None = None, max_output: int | None = None
    ) -> ExecResult:
        """Run ``code`` in this session.

        Args:
            code: Python source. If its last statement is an expression, its repr is printed
                (as in a notebook) unless it is None.
            timeout: seconds before the run is interrupted (then killed); default from config.
            max_output: bytes kept of stdout and of stderr each; default from config.

        Returns:
            The run's :class:`ExecResult`. User errors, timeouts and crashes are results,
            never exceptions; only infrastructure failures raise (``SandboxError``).
        """
        limit = self._pool.config.timeout_seconds if timeout is None else timeout
        cap = self._pool.config.max_output_bytes if max_output is None else max_output
        async with self._lock:
            lost = await self._ensure_kernel()
            try:
                reply = await self._kernel.request(
                    "exec",
                    wait=self._pool._wait(limit),
                    session=self.id,
                    code=code,
                    timeout=limit,
                    max_output=cap,
                )
            except KernelDied:
                return ExecResult(
                    status="killed",
                    error="the sandbox kernel died (its container or process exited)",
                    state_survived=False,
                )
        try:
            result = ExecResult.model_validate(reply["result"])
        except (KeyError, ValueError) as exc:
            raise SandboxProtocolError(f"malformed exec reply: {exc}") from exc
        if lost:
            result = result.model_copy(update={"state_survived": False})
        return result

    async def fork(self) -> Session:
        """A new session holding a copy of this one's variables and files (an ``os.fork`` in
        the sandbox): the two diverge from here on. Cheap; used for snapshots."""
        async with self._lock:
            await self._ensure_kernel()
            sid = uuid.uuid4().hex[:16]
            kernel = self._kernel  # a fork always lives on its parent's kernel
            self._pool._claim(kernel, sid)
            try:
                reply = await kernel.request(
                    "fork", wait=self._pool._wait(), session=self.id, new_session=sid
                )
            except BaseException as exc:
                self._pool._unclaim(kernel, sid)
                if isinstance(exc, KernelDied):
                    raise SandboxUnavailableError("the sandbox kernel died during a fork") from None
                raise
            self._pool._note_memory(kernel, reply)
            clone = Session(self._pool, kernel, sid)
            self._pool._sessions.add(clone)
            return clone

    async def reset(self) -> None:
        """Forget every variable and file: the session starts over in a fresh worker."""
        async with self._lock:
            if await self._ensure_kernel():
                return  # a fresh worker already
            with contextlib.suppress(KernelDied):
                await self._kernel.request("reset", wait=self._pool._wait(), session=self.id)

    async def close(self) -> None:
        """Kill the worker and everything it started; remove its files. Idempotent."""
        if self._detach():
            await self._kill()

    def release(self) -> None:
        """Close without waiting: the session is closed (and uncounted) at once, and its worker
        is killed in the background, a task the pool tracks and awaits when it closes. For
        callers whose result is ready and who should not wait for the clean-up. Idempotent."""
        if self._detach():
            task = asyncio.create_task(self._kill())
            self._pool._releasing.add(task)
            task.add_done_callback(self._pool._releasing.discard)

    def _detach(self) -> bool:
        """Mark closed and drop from the pool's and kernel's accounting; False if it already was."""
        if self._closed:
            return False
        self._closed = True
        self._pool._sessions.discard(self)
        self._pool._unclaim(self._kernel, self.id)
        return True

    async def _kill(self) -> None:
        if self._kernel.alive:
            with contextlib.suppress(KernelDied, SandboxProtocolError):
                await self._kernel.request("close", wait=self._pool._wait(), session=self.id)

    async def _ensure_kernel(self) -> bool:
        """Re-open this session on a live kernel if its kernel died; True if it had to."""
        if self._closed:
            raise SandboxClosedError(f"session {self.id} is closed")
        if self._kernel.alive:
            return False
        self._pool._unclaim(self._kernel, self.id)
        self._kernel = await self._pool._open(self.id)  # placed as a new session is
        if self._closed:  # released while it re-opened: undo, as release() could not
            self._pool._unclaim(self._kernel, self.id)
            await self._kill()
            raise SandboxClosedError(f"session {self.id} is closed")
        return True

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, kernel={self._kernel.name!r}, closed={self._closed})"
