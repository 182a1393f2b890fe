"""Host side of the kernel protocol: one connection to one running kernel."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from critloop.errors import SandboxProtocolError, SandboxUnavailableError
from critloop.sandbox.kernel import PROTOCOL_VERSION, FrameReader, encode_frame

logger = logging.getLogger("critloop.sandbox")

_DOCKER_MUX = struct.Struct(">BxxxI")  # Docker's stream header: stream id, 3 pad bytes, size


class KernelDied(Exception):
    """The kernel's channel closed (its process or container is gone). Internal."""


class Transport(Protocol):
    """A byte channel to a kernel's stdio."""

    async def read(self) -> bytes:
        """Next chunk of the kernel's stdout; ``b""`` at end of stream."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class StreamTransport:
    """The kernel's stdio as an asyncio stream pair (a local subprocess's pipes)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        return await self._reader.read(1 << 16)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class DockerAttachTransport(StreamTransport):
    """A container's attach socket (no TTY): stdout arrives in Docker's multiplexed frames."""

    async def read(self) -> bytes:
        while True:
            try:
                header = await self._reader.readexactly(_DOCKER_MUX.size)
                stream, size = _DOCKER_MUX.unpack(header)
                payload = await self._reader.readexactly(size)
            except asyncio.IncompleteReadError:
                return b""
            if stream == 1:
                return payload


class KernelClient:
    """Request/reply multiplexing over one kernel's channel.

    Replies are matched to requests by id, so many sessions of one kernel work concurrently.
    When the channel closes, every waiting request fails with :class:`KernelDied`.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        name: str,
        on_close: Callable[[KernelClient], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.sessions: set[str] = set()
        # The kernel's last memory report (a reply's ``memory``: its container's use and limit, in
        # bytes), recorded by the pool; None while unknown (the local backend never reports one).
        self.memory_used: int | None = None
        self.memory_limit: int | None = None
        self._transport = transport
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_loop(), name=f"critloop-kernel-{name}")
        self._write_lock = asyncio.Lock()
        self.alive = True

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise SandboxUnavailableError(
                f"sandbox kernel {self.name} did not start within {timeout:g}s"
            ) from None
        except KernelDied:
            raise SandboxUnavailableError(f"sandbox kernel {self.name} exited during start-up") from None
        if ready.get("protocol") != PROTOCOL_VERSION:
            raise SandboxProtocolError(
                f"sandbox kernel {self.name} speaks protocol {ready.get('protocol')!r}, "
                f"expected {PROTOCOL_VERSION}: rebuild the image (`critloop sandbox build`)"
            )
        return ready

    async def request(self, op: str, *, wait: float, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply (``ok`` false raises SandboxProtocolError)."""
        if not self.alive:
            raise KernelDied(self.name)
        req_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = future
        frame = encode_frame({"id": req_id, "op": op, **fields})
        try:
            async with self._write_lock:
                await self._transport.write(frame)
            reply = await asyncio.wait_for(future, wait)
        except TimeoutError:
            # The supervisor enforces every time limit itself; silence past it means the
            # kernel is wedged, and a wedged kernel is replaced.
            logger.warning("sandbox kernel %s did not answer %s within %.1fs", self.name, op, wait)
            await self.close()
            raise KernelDied(self.name) from None
        except (ConnectionError, OSError):
            await self.close()
            raise KernelDied(self.name) from None
        finally:
            self._waiting.pop(req_id, None)
        if not reply.get("ok"):
            raise SandboxProtocolError(f"sandbox kernel {self.name}: {reply.get('error')}")
        return reply

    async def _read_loop(self) -> None:
        frames = FrameReader()  # the kernel is trusted with the size of its replies
        try:
            while True:
                chunk = await self._transport.read()
                if not chunk:
                    break
                frames.feed(chunk)
                for message in frames:
                    self._deliver(message)
        except (OSError, ValueError) as exc:  # ValueError: a FrameError (not a JSON object)
            logger.warning("sandbox kernel %s channel failed: %s", self.name, exc)
        finally:
            self._mark_dead()
            if self._on_close is not None:
                await self._on_close(self)

    def _deliver(self, message: dict[str, Any]) -> None:
        if message.get("event") == "ready":
            if not self._ready.done():
                self._ready.set_result(message)
            return
        if message.get("event") == "fatal" and not self._ready.done():
            # The kernel refused to start (say, it could not lock its container down).
            self._ready.set_exception(
                SandboxUnavailableError(
                    f"sandbox kernel {self.name} refused to start: {message.get('error')}"
                )
            )
            return
        future = self._waiting.get(message.get("id"))  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(message)

    def _mark_dead(self) -> None:
        self.alive = False
        for future in [self._ready, *self._waiting.values()]:
            if not future.done():
                future.set_exception(KernelDied(self.name))
        # Nobody may be waiting on the ready future any more; do not warn about it.
        if self._ready.done() and not self._ready.cancelled():
            self._ready.exception()

    async def close(self) -> None:
        """Close the channel; the kernel sees end of input and exits."""
        self._mark_dead()
        await self._transport.close()
        if self._reader is not asyncio.current_task():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
