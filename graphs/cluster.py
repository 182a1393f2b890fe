"""Batch methods on a Ray cluster: workers (Ray actors) open the method, this process hands out
the items and writes the one results file.

Each worker is an async Ray actor that opens the batch method itself (its own models, sandbox
pool and clients, on its node) and runs up to ``concurrency`` items at once on its event loop.
This process, the driver, sends each item to the worker with the fewest items in flight and
writes each record as it comes back, through the same runner as a local run
(:func:`~critloop.graphs.batch.run_records`): the same results file, the same resume.

A worker that dies (its node removed, its process killed) is set aside: the items it was
running go to another worker, and Ray restarts it (on any node with room) up to
:attr:`RayOptions.max_restarts` times, after which it rejoins. Records are written only here,
once each: an item that ran twice is still one line. A driver that dies takes its workers with
it (Ray ends the actors of a finished job); ``--resume`` skips what was written.

Example:
    >>> on_ray = RayOptions(address="auto")
    >>> async with RayWorkers(method, on_ray, concurrency=16) as workers:  # doctest: +SKIP
    ...     await run_records(problems, workers.record, "out.jsonl", concurrency=16 * workers.size)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from critloop.errors import ConfigError, CritloopError

if TYPE_CHECKING:
    from critloop.graphs.batch import BatchMethod, MakeRecord

__all__ = ["ClusterError", "RayOptions", "RayWorkers", "check_ray_address"]

_ADDRESS = re.compile(r"^(?:local|auto|ray://[\w.\-\[\]:]+|[\w.\-]+:\d+)$")


class ClusterError(CritloopError):
    """The Ray cluster cannot run the batch: none to join, or every worker lost for good."""


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where the Ray cluster is, and the workers a run starts on it."""

    address: str = "local"
    """``local``: start a Ray instance on this machine for the run; ``auto``: join the cluster this
    machine belongs to (``ray start``); else the head's address (``HOST:6379``, or
    ``ray://HOST:10001`` through Ray Client)."""
    workers: int | None = None
    """Workers to start; None: one per alive node."""
    worker_cpus: float = 1.0
    """CPUs each worker reserves in Ray's scheduler (its event loop; sandbox containers and model
    servers are outside Ray's accounting)."""
    max_restarts: int = 3
    """How often Ray restarts a lost worker before the run goes on without it."""
    max_attempts: int = 3
    """Tries of one item on workers lost while running it; then it is recorded as an error."""
    wait_seconds: float = 600.0
    """How long items wait for a worker while none is alive (restarting) before the run fails."""

    def __post_init__(self) -> None:
        check_ray_address(self.address)
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1, not {self.workers}")
        if self.worker_cpus <= 0:
            raise ConfigError(f"--ray-worker-cpus must be above 0, not {self.worker_cpus}")


def check_ray_address(address: str) -> str:
    """``address`` when it is one :attr:`RayOptions.address` takes.

    Raises:
        ConfigError: it is not (a data file taken for the address, say).
    """
    if not _ADDRESS.match(address):
        raise ConfigError(f"--ray takes local, auto, HOST:PORT or ray://HOST:PORT, not {address!r}")
    return address


class _Worker:
    """The Ray actor: opens the method once (again after a restart) and runs items."""

    def __init__(self, method: BatchMethod) -> None:
        self._method = method
        self._make: MakeRecord | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._opening: asyncio.Lock | None = None

    async def open(self) -> str:
        """Open the method (once); the worker's host and process, for messages."""
        self._opening = self._opening or asyncio.Lock()
        async with self._opening:
            if self._make is None:
                stack = contextlib.AsyncExitStack()
                self._make = await stack.enter_async_context(self._method.open())
                self._stack = stack
        return f"{socket.gethostname()} pid {os.getpid()}"

    async def record(self, item: Any) -> dict[str, Any]:
        if self._make is None:
            await self.open()  # a restarted worker opens on its first item
        assert self._make is not None
        return await self._make(item)

    async def close(self) -> None:
        stack, self._stack, self._make = self._stack, None, None
        if stack is not None:
            await stack.aclose()


@dataclass(eq=False)
class _Slot:
    """The driver's view of one worker."""

    name: str
    actor: Any
    running: int = 0
    alive: bool = True
    gone: bool = False
    """Lost for good (its restarts spent)."""
    rejoining: asyncio.Task[None] | None = field(default=None, repr=False)


class RayWorkers:
    """Workers of a batch method on a Ray cluster, and :meth:`record`, the record maker that
    sends an item to one of them.

    Args:
        method: the batch method each worker opens (picklable: ``critloop.methods``).
        options: the cluster and the workers.
        concurrency: items in flight on each worker.

    Raises (on entry):
        ConfigError: Ray is not installed, the address is wrong, the cluster has too few free
            CPUs for the workers, or a worker could not open the method (its error).
        ClusterError: there is no cluster at the address.
    """

    def __init__(self, method: BatchMethod, options: RayOptions, *, concurrency: int) -> None:
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        self.method = method
        self.options = options
        self.concurrency = concurrency
        self._slots: list[_Slot] = []
        self._changed = asyncio.Condition()
        self._started_ray = False
        self._ray: Any = None
        self.losses: list[str] = []
        """Each loss of a worker seen while it ran an item: its name and Ray's error."""

    @property
    def size(self) -> int:
        """Workers started."""
        return len(self._slots)

    @property
    def hosts(self) -> list[str]:
        """The names of the workers (host and process), in order."""
        return [slot.name for slot in self._slots]

    async def __aenter__(self) -> RayWorkers:
        self._ray = ray = _import_ray()
        # In this thread, which Ray requires to install its SIGTERM handler (a few seconds of
        # start-up, before any item runs).
        self._connect()
        try:
            count = self.options.workers or sum(1 for node in ray.nodes() if node.get("Alive"))
            free = ray.available_resources().get("CPU", 0.0)
            if count * self.options.worker_cpus > free:
                raise ConfigError(
                    f"the Ray cluster has {free:g} free CPUs: {count} workers of "
                    f"{self.options.worker_cpus:g} CPUs do not fit (lower --ray-workers or "
                    "--ray-worker-cpus, or add nodes)"
                )
            actor = ray.remote(_Worker).options(
                num_cpus=self.options.worker_cpus,
                max_restarts=self.options.max_restarts,
                max_concurrency=self.concurrency + 4,  # the items, and open/close beside them
                scheduling_strategy="SPREAD",
            )
            self._slots = [_Slot(name=f"worker {i}", actor=actor.remote(self.method)) for i in range(count)]
            try:
                names = await asyncio.gather(*(slot.actor.open.remote() for slot in self._slots))
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            for slot, name in zip(self._slots, names, strict=True):
                slot.name = name
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    async def record(self, item: Any) -> dict[str, Any]:
        """The record of ``item``, made on a worker; an item whose workers were lost
        :attr:`RayOptions.max_attempts` times is recorded as an error (``method.failed``)."""
        ray = self._ray
        lost: list[str] = []
        for _ in range(self.options.max_attempts):
            slot = await self._take()
            try:
                return await slot.actor.record.remote(item)
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None  # the method's own failure: a bug, as in a local run
            except ray.exceptions.RayActorError as exc:
                lost.append(f"{slot.name} ({type(exc).__name__})")
                self.losses.append(lost[-1])
                self._set_aside(slot)
            finally:
                slot.running -= 1
                await self._notify()
        return self.method.failed(item, f"the Ray workers running it were lost: {', '.join(lost)}")

    # ------------------------------------------------------------------ internals

    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        address = self.options.address
        # Workers' output stays in Ray's logs (/tmp/ray/session_latest/logs), not over the progress.
        settings: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
        if address == "local":
            settings["include_dashboard"] = False
        try:
            # "local" starts a new instance even where this machine is part of a cluster.
            ray.init(address=address, **settings)
        except ConnectionError as exc:
            raise ClusterError(
                f"no Ray cluster at {address!r} ({exc}); start one with `ray start --head` "
                "(and `ray start --address=HEAD:6379` on the other nodes)"
            ) from None
        self._started_ray = True

    async def _take(self) -> _Slot:
        """The live worker with the fewest items in flight, once one has room."""
        async with self._changed:
            while True:
                live = [s for s in self._slots if s.alive and s.running < self.concurrency]
                if live:
                    slot = min(live, key=lambda s: s.running)
                    slot.running += 1
                    return slot
                if all(s.gone for s in self._slots):
                    raise ClusterError(
                        f"every Ray worker was lost for good ({len(self._slots)} workers, "
                        f"{self.options.max_restarts} restarts each); see the logs under /tmp/ray"
                    )
                waiting = None if any(s.alive for s in self._slots) else self.options.wait_seconds
                try:
                    await asyncio.wait_for(self._changed.wait(), waiting)
                except TimeoutError:
                    raise ClusterError(
                        f"no Ray worker came back within {self.options.wait_seconds:g} s; does the "
                        "cluster have room for the restarted workers?"
                    ) from None

    def _set_aside(self, slot: _Slot) -> None:
        if not slot.alive:
            return
        slot.alive = False
        slot.rejoining = asyncio.create_task(self._rejoin(slot))

    async def _rejoin(self, slot: _Slot) -> None:
        """Wait for Ray to restart the worker, open it, and take it back (or give it up)."""
        ray = self._ray
        try:
            # Retried until the actor is back: a call with no retries that meets it while Ray is
            # still restarting it fails as if it were dead. Ray gives up only once its restarts
            # are spent.
            slot.name = await slot.actor.open.options(max_task_retries=-1).remote()
            slot.alive = True
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            slot.gone = True  # its restarts are spent, or it restarted but cannot open the method
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _shutdown(self) -> None:
        ray = self._ray
        for slot in self._slots:
            if slot.rejoining is not None:
                slot.rejoining.cancel()
        live = [slot for slot in self._slots if slot.alive]
        if live:
            # Close each worker's method (its sandbox containers) before the actors end.
            closing = [asyncio.wrap_future(s.actor.close.remote().future()) for s in live]
            await asyncio.wait(closing, timeout=30)
        for slot in self._slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        self._slots = []
        if self._started_ray:
            await asyncio.to_thread(ray.shutdown)
            self._started_ray = False


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'critloop[ray]'") from None
    return ray


def _cause(error: Any) -> BaseException:
    """The exception a worker raised, as the driver re-raises it (its type kept)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error
