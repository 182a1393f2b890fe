"""The one exception hierarchy of critloop.

Every error critloop raises on purpose derives from :class:`CritloopError`, so callers can catch
the whole family in one place. This module imports nothing from critloop: every layer may use it.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CritloopError",
    "ConfigError",
    "BudgetExceededError",
    "SandboxError",
    "SandboxUnavailableError",
    "SandboxCapacityError",
    "SandboxImageError",
    "SandboxClosedError",
    "SandboxProtocolError",
    "ModelError",
    "ModelEndpointError",
    "ModelUnavailableError",
    "ModelResponseError",
]


class CritloopError(Exception):
    """Base class of every error critloop raises on purpose."""


class ConfigError(CritloopError, ValueError):
    """A configuration value or file is invalid; the message names the key."""


class BudgetExceededError(CritloopError):
    """A limit of the run's budget is spent: no further model call may start. ``reason`` is the
    run's stop reason (``max_tokens`` or ``max_seconds``)."""

    def __init__(self, reason: Literal["max_tokens", "max_seconds"], message: str) -> None:
        super().__init__(message)
        self.reason: Literal["max_tokens", "max_seconds"] = reason


class SandboxError(CritloopError):
    """Base class of the code sandbox's errors (infrastructure, never the user's code)."""


class SandboxUnavailableError(SandboxError):
    """No sandbox backend can run code: the Docker engine is unreachable, or it failed to start."""


class SandboxCapacityError(SandboxUnavailableError):
    """Every kernel the pool may run (``max_kernels``) is full, and no room came within
    ``open_timeout_seconds``: a session could not be opened. The message names the limits and the
    ``[sandbox]`` keys to raise. Running sessions are never stopped to make room."""


class SandboxImageError(SandboxError):
    """The sandbox image is missing or could not be built."""


class SandboxClosedError(SandboxError):
    """The pool or session was closed before or during the call."""


class SandboxProtocolError(SandboxError):
    """The kernel answered something that breaks the protocol (a bug, or a version mismatch)."""


class ModelError(CritloopError):
    """Base class of model-layer failures (never raised for what a model *says*).

    ``role`` names the role whose call failed (``policy``, ``critic``, ``refiner``), set by the
    role that made the call; None where no role did."""

    role: str | None = None


class ModelEndpointError(ModelError):
    """A model endpoint could not be used: unreachable, or failing after every retry, or it
    refused the request. The message names the endpoint and the last failure."""


class ModelUnavailableError(ModelEndpointError):
    """A model endpoint is unreachable or kept failing (connection errors, timeouts, 5xx, 429)
    after every retry: another replica of the model may answer instead."""


class ModelResponseError(ModelError):
    """A model endpoint answered something that breaks the OpenAI completions schema."""
