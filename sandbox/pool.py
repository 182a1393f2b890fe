"""The sandbox pool and its sessions: the API the critic and tools use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from critloop.errors import SandboxClosedError, SandboxProtocolError, SandboxUnavailableError
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
    """Kernels that died and were replaced since the pool started."""


class SandboxPool:
    """Warm kernels that host sandbox sessions.

    Each kernel (a container, or a local process) hosts many sessions; a session is a worker
    process forked from the kernel's pre-imported template, so opening one costs milliseconds.
    Closing a session kills its worker and everything it started, and removes its files: the
    next session starts clean. A kernel that dies is replaced in the background.

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
        self._sessions: set[Session] = set()
        self._replacing: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._replaced = 0
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
            results = await asyncio.gather(
                *(self._start_kernel() for _ in range(self.config.pool_size)),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors and len(errors) == len(results):
                await backend.close()
                raise errors[0]
            for error in errors:
                logger.warning("a sandbox kernel failed to start: %s", error)
            self._started = True
            return self

    async def _start_kernel(self) -> KernelClient:
        kernel = await self.backend.start_kernel(self._kernel_closed)
        self._kernels.append(kernel)
        return kernel

    async def _kernel_closed(self, kernel: KernelClient) -> None:
        if kernel not in self._kernels or self._closed:
            return
        self._kernels.remove(kernel)
        self._replaced += 1
        logger.warning("sandbox kernel %s died; starting a replacement", kernel.name)
        task = asyncio.create_task(self._replace(kernel))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, dead: KernelClient) -> None:
        await self.backend.stop_kernel(dead)
        try:
            await self._start_kernel()
        except Exception as exc:  # noqa: BLE001 - open_session retries and reports
            logger.warning("could not replace sandbox kernel %s: %s", dead.name, exc)

    async def _kernel(self, avoid: frozenset[KernelClient] = frozenset()) -> KernelClient:
        """The live kernel with the fewest sessions (starting one if none is left)."""
        if self._closed:
            raise SandboxClosedError("the pool is closed")
        if not self._started:
            await self.start()
        alive = [k for k in self._kernels if k.alive and k not in avoid]
        if not alive:
            if self._replacing:
                await asyncio.wait(set(self._replacing))
                alive = [k for k in self._kernels if k.alive and k not in avoid]
            if not alive:
                alive = [await self._start_kernel()]
        return min(alive, key=lambda k: len(k.sessions))

    def _wait(self, seconds: float = 0.0) -> float:
        return seconds + self.config.kill_grace_seconds + _REPLY_MARGIN

    async def open_session(self) -> Session:
        """A fresh session: new globals, empty work dir, sympy/numpy/math already imported."""
        refused: set[KernelClient] = set()
        for attempt in range(3):
            kernel = await self._kernel(frozenset(refused))
            sid = uuid.uuid4().hex[:16]
            try:
                await kernel.request("open", wait=self._wait(), session=sid)
            except KernelDied:
                if attempt == 2:
                    raise SandboxUnavailableError("sandbox kernels keep dying at session start") from None
                continue
            except SandboxProtocolError as exc:
                # This kernel cannot fork a worker now (e.g. a fork bomb holds its pids): try another.
                refused.add(kernel)
                if attempt == 2:
                    raise SandboxUnavailableError(f"no sandbox kernel could open a session: {exc}") from None
                continue
            kernel.sessions.add(sid)
            session = Session(self, kernel, sid)
            self._sessions.add(session)
            return session
        raise AssertionError("unreachable")

    def status(self) -> PoolStatus:
        backend = self._backend
        return PoolStatus(
            backend=backend.name if backend else "none",
            isolated=bool(backend and backend.isolated),
            kernels=sum(1 for k in self._kernels if k.alive),
            sessions=len(self._sessions),
            kernels_replaced=self._replaced,
        )

    async def ping(self) -> list[dict[str, Any]]:
        """Each live kernel's own report (pid, modules, sessions, process count, disk)."""
        replies = []
        for kernel in [k for k in self._kernels if k.alive]:
            with contextlib.suppress(KernelDied):
                replies.append(await kernel.request("ping", wait=self._wait()))
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
        for task in list(self._replacing):
            task.cancel()
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=self._wait())
        for session in list(self._sessions):
            session._closed = True
        self._sessions.clear()
        if self._backend is not None:
            await asyncio.gather(*(self._backend.stop_kernel(k) for k in self._kernels))
            await self._backend.close()
        self._kernels.clear()
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
            try:
                await self._kernel.request("fork", wait=self._pool._wait(), session=self.id, new_session=sid)
            except KernelDied:
                raise SandboxUnavailableError("the sandbox kernel died during a fork") from None
            self._kernel.sessions.add(sid)
            clone = Session(self._pool, self._kernel, sid)
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
        self._kernel.sessions.discard(self.id)
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
        self._kernel.sessions.discard(self.id)
        kernel = await self._pool._kernel()
        await kernel.request("open", wait=self._pool._wait(), session=self.id)
        kernel.sessions.add(self.id)
        self._kernel = kernel
        return True

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, kernel={self._kernel.name!r}, closed={self._closed})"
