"""The local backend: the kernel as a plain subprocess. NOT isolation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
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


def _warn_not_isolated(bubblewrap: bool) -> None:
    global _warned
    if not _warned:
        _warned = True
        how = (
            "a subprocess under bubblewrap (no network, read-only host files, but no resource limits)"
            if bubblewrap
            else "a plain subprocess with your user's rights"
        )
        message = (
            f"critloop is running model-written code with the LOCAL sandbox backend: {how}, "
            "not isolation. Use a Docker engine for untrusted code."
        )
        logger.warning(message)


def _bubblewrap_works() -> bool:
    """Whether ``bwrap`` is installed and can run this Python in its namespaces (cached)."""
    global _bwrap_ok
    if _bwrap_ok is None:
        _bwrap_ok = False
        if shutil.which("bwrap") is not None:
            try:
                done = subprocess.run(
                    [*_bwrap_prefix(), sys.executable, "-I", "-c", "import math"],
                    capture_output=True,
                    timeout=20,
                    check=False,
                )
                _bwrap_ok = done.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                _bwrap_ok = False
    return _bwrap_ok


_bwrap_ok: bool | None = None


def _bwrap_prefix() -> list[str]:
    """The bwrap command line before the kernel's: the host read-only, a private /tmp, no network,
    own pid/ipc/uts namespaces. What the kernel needs from under /tmp (a virtual environment or a
    checkout living there) is bound back in, read-only, over the private /tmp."""
    args = [
        shutil.which("bwrap") or "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox",
        "--die-with-parent", "--new-session",
    ]  # fmt: skip
    needed = {
        sys.prefix,
        sys.base_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.realpath(_kernel_module.__file__)),
        *(p for p in sys.path if p),
    }
    under_tmp = sorted(
        os.path.realpath(p) for p in needed if os.path.realpath(p).startswith("/tmp/") and os.path.exists(p)
    )
    for path in under_tmp:
        if not any(path.startswith(outer + "/") for outer in under_tmp if outer != path):
            args += ["--ro-bind", path, path]
    return args


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
        mode = self.config.local_bubblewrap
        self.bubblewrap = mode == "on" or (mode == "auto" and _bubblewrap_works())
        # Built here (create_backend runs in a worker thread): path lookups must not run in the
        # event loop, where start_kernel runs.
        self._prefix = _bwrap_prefix() if self.bubblewrap else []
        if mode == "on" and not _bubblewrap_works():
            raise SandboxUnavailableError(
                "local_bubblewrap = 'on', but bwrap is missing or cannot create namespaces"
            )
        _warn_not_isolated(self.bubblewrap)

    async def start_kernel(self, on_close: OnKernelClose) -> KernelClient:
        env = {
            **os.environ,
            **THREAD_ENV,
            "CRITLOOP_KILL_GRACE": str(self.config.kill_grace_seconds),
        }
        command = [sys.executable, "-I", "-u", str(Path(_kernel_module.__file__))]
        command = [*self._prefix, *command]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
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

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "bubblewrap": self.bubblewrap}

    async def close(self) -> None:
        for kernel in list(self._processes):
            await self.stop_kernel(kernel)
