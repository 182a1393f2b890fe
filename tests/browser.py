"""A small headless Chromium, driven over the Chrome DevTools Protocol (CDP), for page tests.

Example:
    >>> async with await Chromium.open() as browser:  # doctest: +SKIP
    ...     await browser.navigate(page.as_uri())
    ...     await browser.evaluate("document.title")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from model_fixtures import stop_process

WIDTH, HEIGHT = 1280, 900


def chromium_binary() -> str | None:
    """The Chromium on this machine's PATH; None when there is none."""
    return next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)


class BrowserError(Exception):
    """Chromium did not start, or a DevTools call failed."""


class Chromium:
    """One headless Chromium with one page (a fixed 1280x900 viewport), and its DevTools socket.

    Use :meth:`open` (an async context manager closes it).
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        profile: Path,
        session: aiohttp.ClientSession,
        socket: aiohttp.ClientWebSocketResponse,
    ) -> None:
        self._process = process
        self._profile = profile
        self._session = session
        self._socket = socket
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, binary: str | None = None, *, timeout: float = 30.0) -> Chromium:
        """Start Chromium headless, on a fresh profile, and connect to its page.

        Raises:
            BrowserError: there is no Chromium, or it did not come up within ``timeout`` seconds.
        """
        binary = binary or chromium_binary()
        if binary is None:
            raise BrowserError("no chromium binary on PATH")
        profile = Path(tempfile.mkdtemp(prefix="critloop-chromium-"))
        log = (profile / "stderr.log").open("wb")
        process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        session = aiohttp.ClientSession()
        try:
            port = await _devtools_port(process, profile, timeout)
            socket_url = await _page_socket(session, port, timeout)
            socket = await session.ws_connect(socket_url, max_msg_size=0)
        except BaseException:
            await session.close()
            _stop(process, profile)
            raise
        browser = cls(process, profile, session, socket)
        try:
            await browser.call("Page.enable")
            await browser.call("Runtime.enable")
            await browser.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
            )
        except BaseException:
            await browser.close()
            raise
        return browser

    async def __aenter__(self) -> Chromium:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
        """One DevTools command; its result.

        Raises:
            BrowserError: the command failed, or the browser went away.
        """
        number = next(self._ids)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[number] = reply
        await self._socket.send_json({"id": number, "method": method, "params": params or {}})
        try:
            return await asyncio.wait_for(reply, timeout)
        finally:
            self._pending.pop(number, None)

    async def navigate(self, url: str, *, timeout: float = 30.0) -> float:
        """Load ``url`` and wait for its load event; the seconds it took."""
        loaded = self._expect("Page.loadEventFired")
        started = time.perf_counter()
        result = await self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        await asyncio.wait_for(loaded, timeout)
        return time.perf_counter() - started

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited, when it is a promise).

        Raises:
            BrowserError: it threw.
        """
        result = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]!r} threw: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout: float = 10.0) -> Any:
        """Poll until ``expression`` is truthy; its value.

        Raises:
            TimeoutError: it stayed falsy for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: str | Path) -> Path:
        """Save the viewport (1280x900) as a PNG at ``path``."""
        result = await self.call("Page.captureScreenshot", {"format": "png"})
        target = Path(path)
        target.write_bytes(base64.b64decode(result["data"]))
        return target

    async def close(self) -> None:
        """Stop Chromium and remove its profile."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._socket.close()
        await self._session.close()
        _stop(self._process, self._profile)

    def _expect(self, event: str) -> asyncio.Future[dict[str, Any]]:
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(event, []).append(waiter)
        return waiter

    async def _read(self) -> None:
        error: BaseException = BrowserError("the DevTools socket closed")
        try:
            async for message in self._socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = message.json()
                if "id" in data:
                    reply = self._pending.get(data["id"])
                    if reply is None or reply.done():
                        continue
                    if "error" in data:
                        reply.set_exception(BrowserError(str(data["error"])))
                    else:
                        reply.set_result(data.get("result", {}))
                else:
                    for waiter in self._waiters.pop(data.get("method", ""), []):
                        if not waiter.done():
                            waiter.set_result(data.get("params", {}))
        except asyncio.CancelledError:
            error = BrowserError("the browser was closed")
            raise
        finally:
            for future in [*self._pending.values(), *(w for ws in self._waiters.values() for w in ws)]:
                if not future.done():
                    future.set_exception(error)


async def _devtools_port(process: subprocess.Popen[bytes], profile: Path, timeout: float) -> int:
    """The DevTools port, from the ``DevToolsActivePort`` file Chromium writes in its profile."""
    deadline = time.monotonic() + timeout
    marker = profile / "DevToolsActivePort"
    while True:
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        if process.poll() is not None or time.monotonic() > deadline:
            log = (profile / "stderr.log").read_text(errors="replace")[-2000:]
            raise BrowserError(f"chromium did not open its DevTools port (exit {process.poll()}): {log}")
        await asyncio.sleep(0.05)


async def _page_socket(session: aiohttp.ClientSession, port: int, timeout: float) -> str:
    """The DevTools socket of Chromium's first page."""
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        if time.monotonic() > deadline:
            raise BrowserError("chromium opened no page")
        await asyncio.sleep(0.05)


def _stop(process: subprocess.Popen[bytes], profile: Path) -> None:
    if process.poll() is None:
        stop_process(process)
    shutil.rmtree(profile, ignore_errors=True)
