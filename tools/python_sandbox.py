"""A LangChain tool that runs Python in a persistent sandbox session."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, ClassVar, TypeVar

from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, PrivateAttr

from critloop.sandbox import SandboxConfig, SandboxPool, Session

__all__ = ["PythonSandboxTool"]

_T = TypeVar("_T")


class _PythonSandboxInput(BaseModel):
    code: str = Field(description="Python source to run. Use print() to show results.")


_EXIT_WAIT_SECONDS = 10.0
"""How long interpreter exit waits for a tool nobody closed to close its pool."""


class _LoopThread:
    """A private event loop on a daemon thread: the tool's pool lives there, so the tool works
    the same from sync code, from any event loop, and from several loops.

    Runners not yet closed are closed at interpreter exit (an ``atexit`` hook, which runs while
    daemon threads still do): a script that never calls ``close()`` exits, and its containers
    go. Later, in finalization, the thread is frozen and nothing may wait on it.
    """

    live: ClassVar[set[_LoopThread]] = set()
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _hooked: ClassVar[bool] = False

    def __init__(self, pool: SandboxPool) -> None:
        self.pool = pool
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="critloop-sandbox", daemon=True)
        self.thread.start()
        with _LoopThread._lock:
            _LoopThread.live.add(self)
            if not _LoopThread._hooked:
                atexit.register(_LoopThread.close_all)
                _LoopThread._hooked = True

    def submit(self, coro: Coroutine[Any, Any, _T]) -> Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, *, wait: float | None) -> None:
        """Close the pool, then stop the loop. ``wait``: the seconds to wait for that (None:
        until done; 0: not at all, the loop stops by itself once the pool is closed)."""
        with _LoopThread._lock:
            if self not in _LoopThread.live:
                return
            _LoopThread.live.discard(self)
        if not self.thread.is_alive() or sys.is_finalizing():
            return  # nothing can run on it any more; the kernels see their stdin close and exit
        closing = self.submit(self.pool.close())
        closing.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.loop.stop))
        if wait == 0:
            return
        with contextlib.suppress(Exception):  # a close that fails or times out: the kernels still go
            closing.result(timeout=wait)
        self.thread.join(timeout=wait)
        if not self.thread.is_alive():
            self.loop.close()

    @staticmethod
    def close_all() -> None:
        for runner in list(_LoopThread.live):
            runner.close(wait=_EXIT_WAIT_SECONDS)


class PythonSandboxTool(BaseTool):
    """Runs Python code in a sandbox session that keeps its state across calls.

    One tool instance owns one session (variables, imports and files persist between calls)
    in a pool of its own; it chooses the Docker backend when an engine is reachable. The output
    is stdout, then stderr, then a status line when the run did not end ``ok``.

    Example:
        >>> from critloop.tools import PythonSandboxTool
        >>> tool = PythonSandboxTool()
        >>> tool.invoke({"code": "x = 2 ** 10"})  # doctest: +SKIP
        ''
        >>> tool.invoke({"code": "print(x)"})  # doctest: +SKIP
        '1024'
        >>> tool.close()  # doctest: +SKIP
    """

    name: str = "python_sandbox"
    description: str = (
        "Run Python code in a persistent, sandboxed Python session (no network; sympy, numpy and "
        "math are installed). Variables persist between calls. Print what you want to see."
    )
    args_schema: type[BaseModel] = _PythonSandboxInput
    config: SandboxConfig = Field(default_factory=lambda: SandboxConfig(pool_size=1))
    """Sandbox options (backend, limits); the pool is started on first use."""
    timeout_seconds: float | None = None
    """Time limit of one call; ``None`` takes ``config.timeout_seconds``."""

    _runner: _LoopThread | None = PrivateAttr(default=None)
    _session: Session | None = PrivateAttr(default=None)
    _guard: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _submit(self, coro_fn: Any) -> Future[str]:
        with self._guard:
            if self._runner is None:
                self._runner = _LoopThread(SandboxPool(self.config))
            runner = self._runner
        return runner.submit(coro_fn(runner.pool))

    async def _execute(self, pool: SandboxPool, code: str) -> str:
        if self._session is None or self._session.closed:
            self._session = await pool.open_session()
        result = await self._session.exec(code, timeout=self.timeout_seconds)
        return result.text()

    def _run(self, code: str, run_manager: Any = None) -> str:
        return self._submit(lambda pool: self._execute(pool, code)).result()

    async def _arun(self, code: str, run_manager: Any = None) -> str:
        return await asyncio.wrap_future(self._submit(lambda pool: self._execute(pool, code)))

    def reset(self) -> None:
        """Forget the session's variables and files."""
        if self._session is not None:
            session = self._session
            self._submit(lambda _: session.reset()).result()

    def close(self) -> None:
        """Stop the session and its pool (containers are removed). The tool may be used again."""
        self._close(wait=None)

    def _close(self, *, wait: float | None) -> None:
        with self._guard:
            runner, self._runner, self._session = self._runner, None, None
        if runner is not None:
            runner.close(wait=wait)

    def __del__(self) -> None:
        # Never wait here: a collector may run this anywhere, and at interpreter exit the loop's
        # thread no longer runs (the atexit hook closed what was open before that).
        with contextlib.suppress(Exception):
            self._close(wait=0)
