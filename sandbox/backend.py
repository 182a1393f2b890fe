"""What a sandbox backend does: start and stop kernels."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from critloop.sandbox._client import KernelClient

__all__ = ["SandboxBackend", "OnKernelClose"]

OnKernelClose = Callable[[KernelClient], Awaitable[None]]


class SandboxBackend(abc.ABC):
    """Starts kernels (the supervisor of ``critloop.sandbox.kernel``) somewhere.

    A backend knows nothing about sessions: the pool drives the kernels it returns.
    """

    name: ClassVar[str]
    isolated: ClassVar[bool]
    """Whether code is isolated from the host (Docker: yes; a local subprocess: no)."""

    @abc.abstractmethod
    async def start_kernel(self, on_close: OnKernelClose) -> KernelClient:
        """Start one kernel and return a ready connection to it."""

    @abc.abstractmethod
    async def stop_kernel(self, kernel: KernelClient) -> None:
        """Stop one kernel and free what it held. Safe to call twice."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend-wide resources."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "isolated": self.isolated}
