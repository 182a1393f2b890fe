"""A LangChain tool that runs Python in a persistent sandbox session."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, PrivateAttr

from critloop.sandbox import SandboxConfig, SandboxPool, Session

__all__ = ["PythonSandboxTool"]

_T = TypeVar("_T")


class _PythonSandboxInput(BaseModel):
    code: str = Field(description="Python source to run. Use print() to show results.")


class _LoopThread:
    """A private event loop on a daemon thread: the tool's pool lives there, so the tool works
    the same from sync code, from any event loop, and from several loops."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="critloop-sandbox", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


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
    _pool: SandboxPool | None = PrivateAttr(default=None)
    _session: Session | None = PrivateAttr(default=None)
    _guard: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _submit(self, coro_fn: Any) -> Future[str]:
        with self._guard:
            if self._runner is None:
                self._runner = _LoopThread()
            runner = self._runner
        return runner.submit(coro_fn())

    async def _execute(self, code: str) -> str:
        if self._session is None or self._session.closed:
            if self._pool is None:
                self._pool = SandboxPool(self.config)
            self._session = await self._pool.open_session()
        result = await self._session.exec(code, timeout=self.timeout_seconds)
        return result.text()

    def _run(self, code: str, run_manager: Any = None) -> str:
        return self._submit(lambda: self._execute(code)).result()

    async def _arun(self, code: str, run_manager: Any = None) -> str:
        return await asyncio.wrap_future(self._submit(lambda: self._execute(code)))

    def reset(self) -> None:
        """Forget the session's variables and files."""
        if self._session is not None:
            session = self._session
            self._submit(lambda: session.reset()).result()

    def close(self) -> None:
        """Stop the session and its pool (containers are removed). The tool may be used again."""
        with self._guard:
            runner, pool = self._runner, self._pool
            self._runner = self._pool = self._session = None
        if runner is None:
            return
        if pool is not None:
            runner.submit(pool.close()).result()
        runner.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to do
            self.close()
