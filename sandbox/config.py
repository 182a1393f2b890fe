"""Configuration of the code sandbox."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    """Number of kernels (containers, or local processes) kept warm: the pool starts this many and
    never stops below it. Each kernel hosts many sessions, one worker process each; the pool grows
    past ``pool_size`` with load, up to ``max_kernels``."""

    max_kernels: int = Field(default=8, ge=1, le=256)
    """Most kernels the pool runs at once (at least ``pool_size``). A new kernel starts when no
    running one has room for a new session; at this ceiling, opening a session waits for room
    (``open_timeout_seconds``). Memory on Docker is at most ``max_kernels * memory_mb``."""

    sessions_per_kernel: int = Field(default=16, ge=1, le=1024)
    """New sessions go to a kernel only while it hosts fewer than this many sessions, snapshots
    counted; forks always go to their parent's kernel (so one kernel may host more)."""

    memory_threshold: float = Field(default=0.75, gt=0, le=1)
    """Fraction of ``memory_mb``: a kernel whose last reported memory use is above it takes no new
    session (its sessions' forks still go there). Kernels that report no memory (the local
    backend) count as below it."""

    kernel_idle_seconds: float = Field(default=60.0, ge=0)
    """Kernels beyond ``pool_size`` that host no session for this long are stopped."""

    open_timeout_seconds: float = Field(default=30.0, ge=0)
    """At the ``max_kernels`` ceiling, how long opening a session waits for room (a session
    closing, a kernel's memory falling) before it fails with ``SandboxCapacityError``. A running
    session is never stopped to make room."""

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

    max_sessions_per_kernel: int = Field(default=256, ge=1, le=1024)
    """Docker backend: the most sessions (snapshots included) one kernel hosts at once, each with
    its own user id and disk; a kernel with none free refuses to open or fork. Each is a process
    too, so ``pids_limit`` bounds them as well. (A refine run holds a snapshot per passed step of
    each critique chain: long solutions need many.)"""

    max_file_mb: int = Field(default=32, ge=1)
    """Largest file a run may write (``RLIMIT_FSIZE``)."""

    local_bubblewrap: Literal["auto", "on", "off"] = "auto"
    """Local backend only: run the kernel under bubblewrap (``bwrap``: no network, read-only host
    filesystem, private /tmp, own pid namespace). ``auto`` uses it where ``bwrap`` is installed and
    works. Still not the Docker backend's isolation: no memory, CPU or pids limits."""

    start_timeout_seconds: float = Field(default=60.0, gt=0)
    """How long starting one kernel may take before it counts as failed."""

    @model_validator(mode="after")
    def _ceiling_holds_the_warm_kernels(self) -> SandboxConfig:
        if self.max_kernels < self.pool_size:
            raise ValueError(
                f"max_kernels ({self.max_kernels}) must be at least pool_size ({self.pool_size}): "
                "pool_size kernels are kept warm, max_kernels is the ceiling the pool grows to"
            )
        return self
