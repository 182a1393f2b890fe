"""The local backend: the kernel as a plain subprocess. NOT isolation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from critloop.errors import SandboxUnavailableError
from critloop.sandbox import kernel as _kernel_module
from critloop.sandbox._client import KernelClient, StreamTransport
from critloop.sandbox.backend import OnKernelClose, SandboxBackend
from critloop.sandbox.config import SandboxConfig

__all__ = ["LocalBackend"]

logger = logging.getLogger("critloop.sandbox")
_warned = False

THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}
"""Set in every kernel: one thread per numeric library, so a run cannot fan out over the host."""


def _warn_not_isolated() -> None:
    global _warned
    if not _warned:
        _warned = True
        message = (
            "critloop is running model-written code with the LOCAL sandbox backend: a plain "
            "subprocess with your user's rights, not isolation. Use a Docker engine for untrusted code."
        )
        logger.warning(message)


class LocalBackend(SandboxBackend):
    """Runs each kernel as a subprocess of this Python (same interpreter, same packages).

    For machines without a Docker engine: timeouts, output capture, sessions and forks behave
    as on Docker, but nothing stops code from reading your files or the network.
    """

    name = "local"
    isolated = False

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._processes: dict[KernelClient, asyncio.subprocess.Process] = {}
        self._count = 0
        _warn_not_isolated()

    async def start_kernel(self, on_close: OnKernelClose) -> KernelClient:
        env = {
            **os.environ,
            **THREAD_ENV,
            "CRITLOOP_KILL_GRACE": str(self.config.kill_grace_seconds),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-u",
                str(Path(_kernel_module.__file__)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal is not meant for user code
            )
        except OSError as exc:
            raise SandboxUnavailableError(f"could not start a local sandbox kernel: {exc}") from exc
        assert process.stdout is not None and process.stdin is not None
        self._count += 1
        transport = StreamTransport(process.stdout, process.stdin)
        kernel = KernelClient(transport, name=f"local-{process.pid}", on_close=on_close)
        self._processes[kernel] = process
        try:
            await kernel.wait_ready(self.config.start_timeout_seconds)
        except BaseException:
            await self.stop_kernel(kernel)
            raise
        return kernel

    async def stop_kernel(self, kernel: KernelClient) -> None:
        process = self._processes.pop(kernel, None)
        await kernel.close()
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            await process.wait()

    async def close(self) -> None:
        for kernel in list(self._processes):
            await self.stop_kernel(kernel)
