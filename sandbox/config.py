"""Configuration of the code sandbox."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SandboxBackendName", "SandboxConfig"]

SandboxBackendName = Literal["auto", "docker", "local"]
"""Where code runs: ``docker`` (isolated), ``local`` (a plain subprocess, NOT isolation), or
``auto``: Docker when an engine answers, else local with a warning."""


class SandboxConfig(BaseModel):
    """Options of the sandbox pool; the ``[sandbox]`` table of the configuration file.

    Example:
        >>> from critloop.sandbox import SandboxConfig
        >>> SandboxConfig(backend="docker", pool_size=2).timeout_seconds
        5.0
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: SandboxBackendName = "auto"
    """Which backend runs code (see :data:`SandboxBackendName`)."""

    pool_size: int = Field(default=2, ge=1, le=64)
    """Number of kernels (containers, or local processes) kept warm. Sessions are spread over
    them; each kernel hosts many sessions, one worker process each."""

    timeout_seconds: float = Field(default=5.0, gt=0, le=3600)
    """Default wall-clock limit of one exec; the supervisor interrupts, then kills, past it."""

    kill_grace_seconds: float = Field(default=0.5, ge=0, le=30)
    """Time between the interrupt (SIGINT) and SIGKILL of a run past its timeout."""

    max_output_bytes: int = Field(default=65536, ge=256, le=16 << 20)
    """Cap on the stdout and on the stderr kept from one exec; the rest is counted and dropped,
    with a visible truncation marker."""

    image: str | None = None
    """Docker image to run; ``None`` means the image built by ``critloop sandbox build`` for this
    version of the kernel."""

    memory_mb: int = Field(default=512, ge=64)
    """Memory limit of one container (memory and memory+swap alike, so it never swaps)."""

    cpus: float = Field(default=1.0, gt=0)
    """CPU quota of one container, in cores."""

    pids_limit: int = Field(default=256, ge=16)
    """Most processes and threads one container may hold (stops fork bombs)."""

    session_disk_mb: int = Field(default=16, ge=1, le=4096)
    """Docker backend: the disk of one session, a size-bounded tmpfs of its own (its cwd,
    ``HOME`` and ``TMPDIR``); a snapshot forked from it gets one of its own, with a copy of the
    files. The pages written count against the container's memory. One session filling its disk
    leaves every other one's untouched."""

    max_sessions_per_kernel: int = Field(default=64, ge=1, le=1024)
    """Docker backend: the most sessions (snapshots included) one kernel hosts at once, each with
    its own user id and disk. A kernel with none free refuses to open or fork."""

    max_file_mb: int = Field(default=32, ge=1)
    """Largest file a run may write (``RLIMIT_FSIZE``)."""

    local_bubblewrap: Literal["auto", "on", "off"] = "auto"
    """Local backend only: run the kernel under bubblewrap (``bwrap``: no network, read-only host
    filesystem, private /tmp, own pid namespace). ``auto`` uses it where ``bwrap`` is installed and
    works. Still not the Docker backend's isolation: no memory, CPU or pids limits."""

    start_timeout_seconds: float = Field(default=60.0, gt=0)
    """How long starting one kernel may take before it counts as failed."""
