"""A LangChain tool that runs Python in a persistent sandbox session."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import queue
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, ClassVar, TypeVar

from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, PrivateAttr

from critloop.errors import SandboxClosedError
from critloop.sandbox import SandboxConfig, SandboxPool, Session

__all__ = ["PythonSandboxTool"]

_T = TypeVar("_T")


class _PythonSandboxInput(BaseModel):
    code: str = Field(description="Python source to run. Use print() to show results.")


_EXIT_WAIT_SECONDS = 10.0
"""How long interpreter exit waits for a tool nobody closed to close its pool."""


_CATCH_UP_PASSES = 5
"""Passes of the loop a call lets run before it starts, so that what reached the loop's
channels between calls is dealt with first, as if the loop had run all along: a kernel that
died meanwhile is marked dead (the end of a local kernel's pipe takes four passes to reach its
client, a Docker socket's fewer) and the session moves to a new kernel, instead of the call
going to the dead one. A pass costs about 2.5 us."""


class _RunnerClosed(Exception):
    """The runner was closed before the call could start (the tool takes a new one). Internal."""


class _Runner:
    """The tool's pool, on an event loop of its own: the tool works the same from sync code,
    from any event loop, and from several loops.

    The loop runs only while a call needs it. A sync call from the main thread, with no event
    loop running there, runs it on the main thread itself (``run_until_complete``): the call
    costs no thread hop. (A hop is two more wake-ups of a thread that then needs the GIL, and
    with any other thread busy in Python each of them waits out the interpreter's switch
    interval, 5 ms.) Every other call goes to the runner's worker thread, which runs the loop
    the same way: async calls, sync calls made inside a running loop (whose thread cannot run
    a second one), and sync calls from other threads, because a kernel started during a call
    is a child of the thread that runs the loop, and a local kernel under bubblewrap
    (``--die-with-parent``) is killed when that thread ends: only threads that live as long as
    the pool may run it. One thread at a time runs it (``_lock``); the tool's one session runs
    one call at a time anyway. Between calls nothing needs to run: a kernel writes only
    replies, and those wait in its pipe or socket (a call first catches up, see
    ``_CATCH_UP_PASSES``).

    Runners not yet closed are closed at interpreter exit (an ``atexit`` hook, which runs while
    daemon threads still do): a script that never calls ``close()`` exits, and its containers
    go. Later, in finalization, nothing may wait on another thread.
    """

    live: ClassVar[set[_Runner]] = set()
    exiting: ClassVar[bool] = False
    """Set by the exit hook: from then on no tool starts a new pool."""
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _hooked: ClassVar[bool] = False

    def __init__(self, pool: SandboxPool) -> None:
        self.pool = pool
        self.session: Session | None = None
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self._lock = threading.Lock()
        """Held by the thread that runs the loop (one call, or the close)."""
        self._state = threading.Lock()
        """Orders job submissions against the close (no job is queued after it)."""
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._closed = threading.Event()
        """Set when the close is over (done, failed or given up)."""
        with _Runner._registry_lock:
            if _Runner.exiting:
                self.loop.close()
                raise SandboxClosedError("the interpreter is exiting: no new sandbox pool")
            _Runner.live.add(self)
            if not _Runner._hooked:
                atexit.register(_Runner.close_all)
                _Runner._hooked = True

    # ------------------------------------------------------------------ calls

    def call(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run the coroutine ``make()`` returns on the runner's loop and return its result."""
        if threading.current_thread() is threading.main_thread() and _running_loop() is None:
            with self._lock:
                if self.closed:
                    raise _RunnerClosed
                return self.loop.run_until_complete(make())
        done: Future[_T] = Future()  # blocks this thread (and its loop, if one runs here)
        self._submit(self._job(make, _settle_concurrent(done)))
        return done.result()

    async def acall(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """:meth:`call` for async callers: the worker thread runs it, the caller's loop goes on.
        Cancelling the caller cancels the call."""
        caller = asyncio.get_running_loop()
        waiter: asyncio.Future[_T] = caller.create_future()

        def settle(result: _T | None, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                caller.call_soon_threadsafe(_settle_asyncio, waiter, result, error)

        tasks: list[asyncio.Task[_T]] = []
        self._submit(self._job(make, settle, waiter.cancelled, tasks))
        try:
            return await waiter
        except asyncio.CancelledError:
            if tasks:
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(tasks[0].cancel)
            raise

    def _job(
        self,
        make: Callable[[], Coroutine[Any, Any, _T]],
        settle: Callable[[_T | None, BaseException | None], None],
        cancelled: Callable[[], bool] = lambda: False,
        tasks: list[asyncio.Task[_T]] | None = None,
    ) -> Callable[[], None]:
        """A call for the worker thread: runs the loop until it is done, then ``settle``s."""

        def job() -> None:
            if cancelled():
                return
            try:
                with self._lock:
                    if self.closed:
                        raise _RunnerClosed
                    task = self.loop.create_task(make())
                    if tasks is not None:
                        tasks.append(task)
                        if cancelled():  # cancelled before the task was there to cancel
                            task.cancel()
                    result = self.loop.run_until_complete(task)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                settle(None, exc)
            else:
                settle(result, None)

        return job

    def _submit(self, job: Callable[[], None]) -> None:
        with self._state:
            if self.closed:
                raise _RunnerClosed
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="critloop-sandbox", daemon=True)
                self._worker.start()
            self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    # ------------------------------------------------------------------ closing

    def close(self, *, wait: float | None) -> None:
        """Close the pool and the loop at once: a call in progress ends (its kernel goes), and
        later calls find the runner closed. ``wait``: the seconds to wait for the close to
        finish (None: until done; 0: not at all, a thread of its own closes)."""
        with self._state:
            first = not self.closed
            self.closed = True
            if first and self._worker is not None:
                self._jobs.put(None)  # after every job queued: each finds the runner closed
        running = _running_loop()
        if running is self.loop:
            wait = 0  # called from inside a call on this thread (a signal handler): never wait
        if first:
            if wait != 0 and running is None:
                self._close_here(None if wait is None else time.monotonic() + wait)
            elif sys.is_finalizing():
                return  # nothing can run any more; the kernels see their stdin close and exit
            else:  # this thread must not wait, or cannot run the loop (it runs another one)
                try:
                    threading.Thread(target=self._close_here, args=(None,), daemon=True).start()
                except RuntimeError:  # no new threads at interpreter shutdown
                    return
        if wait != 0:
            self._closed.wait(wait)

    def _close_here(self, deadline: float | None) -> None:
        try:
            closing: Future[None] | None = None
            if not self._lock.acquire(blocking=False):
                # A call runs the loop now, in another thread: the pool closes in there, which
                # ends the call; the loop is ours once it returns.
                closing = asyncio.run_coroutine_threadsafe(self._close_pool(), self.loop)
                if not self._lock.acquire(timeout=-1 if deadline is None else _left(deadline)):
                    return  # the kernels see their stdin close when this process exits
            try:
                done = self._close_pool() if closing is None else asyncio.wrap_future(closing, loop=self.loop)
                with contextlib.suppress(Exception):  # a close that fails or times out: the kernels still go
                    self.loop.run_until_complete(
                        asyncio.wait_for(done, None if deadline is None else _left(deadline))
                    )
                self.loop.close()
            finally:
                self._lock.release()
        finally:
            with _Runner._registry_lock:
                _Runner.live.discard(self)
            self._closed.set()

    async def _close_pool(self) -> None:
        await self.pool.close()

    @staticmethod
    def close_all() -> None:
        with _Runner._registry_lock:
            _Runner.exiting = True
            runners = list(_Runner.live)
        for runner in runners:
            runner.close(wait=_EXIT_WAIT_SECONDS)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle_concurrent(future: Future[_T]) -> Callable[[_T | None, BaseException | None], None]:
    def settle(result: _T | None, error: BaseException | None) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    return settle


def _settle_asyncio(future: asyncio.Future[_T], result: _T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class PythonSandboxTool(BaseTool):
    """Runs Python code in a sandbox session that keeps its state across calls.

    One tool instance owns one session (variables, imports and files persist between calls)
    in a pool of its own; it chooses the Docker backend when an engine is reachable. The output
    is stdout, then stderr, then a status line when the run did not end ``ok``. Calls from
    several threads or event loops share the session and run one at a time.

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

    _runner: _Runner | None = PrivateAttr(default=None)
    _guard: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _current_runner(self) -> _Runner:
        with self._guard:
            if self._runner is None or self._runner.closed:
                self._runner = _Runner(SandboxPool(self.config))
            return self._runner

    async def _execute(self, runner: _Runner, code: str) -> str:
        for _ in range(_CATCH_UP_PASSES):
            await asyncio.sleep(0)
        if runner.session is None or runner.session.closed:
            runner.session = await runner.pool.open_session()
        result = await runner.session.exec(code, timeout=self.timeout_seconds)
        return result.text()

    def _run(self, code: str, run_manager: Any = None) -> str:
        while True:
            runner = self._current_runner()
            with contextlib.suppress(_RunnerClosed):  # closed meanwhile: a new one starts
                return runner.call(functools.partial(self._execute, runner, code))

    async def _arun(self, code: str, run_manager: Any = None) -> str:
        while True:
            runner = self._current_runner()
            with contextlib.suppress(_RunnerClosed):
                return await runner.acall(functools.partial(self._execute, runner, code))

    def reset(self) -> None:
        """Forget the session's variables and files."""
        with self._guard:
            runner = self._runner
        if runner is not None and runner.session is not None:
            session = runner.session
            with contextlib.suppress(_RunnerClosed):  # closed meanwhile: nothing left to forget
                runner.call(session.reset)

    def close(self) -> None:
        """Stop the session and its pool (containers are removed); a call in progress ends
        with them. The tool may be used again."""
        self._close(wait=None)

    def _close(self, *, wait: float | None) -> None:
        with self._guard:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.close(wait=wait)

    def __del__(self) -> None:
        # Never wait here: a collector may run this anywhere, and at interpreter exit the other
        # threads no longer run (the atexit hook closed what was open before that).
        with contextlib.suppress(Exception):
            self._close(wait=0)
