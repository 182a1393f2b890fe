"""The Docker backend: a kernel per container, stdio over the attach socket, no network."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from critloop.errors import SandboxImageError, SandboxUnavailableError
from critloop.sandbox._client import DockerAttachTransport, KernelClient
from critloop.sandbox.backend import OnKernelClose, SandboxBackend
from critloop.sandbox.config import SandboxConfig
from critloop.sandbox.image import image_tag

__all__ = ["DockerBackend", "LABEL", "OrphanReport", "docker_client", "reap_orphans"]

logger = logging.getLogger("critloop.sandbox")

LABEL = "io.critloop.sandbox"
"""Every container critloop starts carries this label (value ``"1"``): how orphans are found."""
_OWNER_HOST = "io.critloop.owner.host"
_OWNER_PID = "io.critloop.owner.pid"
_OWNER_START = "io.critloop.owner.start"
_SUPERVISOR_CAPS = ["SYS_ADMIN", "SETUID", "SETGID", "CHOWN", "KILL", "SETPCAP"]
"""What the kernel starts with. SYS_ADMIN serves two mounts at start-up (``/proc`` with
hidepid, a tmpfs per session slot) and is dropped before the first request; the supervisor keeps
the rest to give each session its own uid, and its workers keep none."""
_NO_IPC_OBJECTS = {
    # SysV message queues, semaphores and shared memory, and POSIX message queues outlive the
    # process that made them: no session may make any.
    "kernel.msgmni": "0",
    "kernel.sem": "0 0 0 0",
    "kernel.shmmni": "0",
    "fs.mqueue.queues_max": "0",
}


def docker_client(timeout: float = 10.0) -> Any:
    """A ``docker.DockerClient`` for the engine of the environment (``DOCKER_HOST`` or the
    default socket) that answered a ping; raises SandboxUnavailableError otherwise."""
    import docker

    try:
        client = docker.from_env(timeout=int(max(1, timeout)))
        client.ping()
    except docker.errors.DockerException as exc:
        raise SandboxUnavailableError(
            f"no Docker engine answers ({_short(exc)}); start one, or use the local backend "
            '(sandbox backend = "local", not isolation)'
        ) from exc
    return client


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot: with the pid, a unique identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def _owner_labels() -> dict[str, str]:
    return {
        LABEL: "1",
        _OWNER_HOST: socket.gethostname(),
        _OWNER_PID: str(os.getpid()),
        _OWNER_START: _process_start(os.getpid()) or "",
    }


def _owner_alive(labels: dict[str, str]) -> bool:
    if labels.get(_OWNER_HOST) != socket.gethostname():
        return True  # another machine's container: not ours to judge
    try:
        pid = int(labels.get(_OWNER_PID, ""))
    except ValueError:
        return False
    start = _process_start(pid)
    return start is not None and start == labels.get(_OWNER_START)


@dataclass(frozen=True, kw_only=True)
class OrphanReport:
    """Containers of critloop found by :func:`reap_orphans`."""

    ours: int
    """Containers carrying the critloop label."""
    removed: list[str]
    """Names of the containers removed (owner process gone, or ``everything`` was asked)."""


def reap_orphans(client: Any, *, everything: bool = False, dry_run: bool = False) -> OrphanReport:
    """Remove critloop containers whose owner process is gone (killed before it cleaned up).

    Args:
        client: a ``docker.DockerClient``.
        everything: remove every critloop container, live owners' too.
        dry_run: only report what would be removed.
    """
    import docker

    containers = client.containers.list(all=True, filters={"label": LABEL})
    removed = []
    for container in containers:
        if everything or not _owner_alive(container.labels):
            removed.append(container.name)
            if not dry_run:
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)
    return OrphanReport(ours=len(containers), removed=removed)


class DockerBackend(SandboxBackend):
    """Kernels in locked-down containers of the sandbox image.

    Each container: no network, read-only root (no shared ``/tmp``, no ``/dev/shm``), a size-capped
    tmpfs ``/work`` for the sessions' own directories,
    a non-root user, every capability dropped, ``no-new-privileges``, pids / memory / CPU /
    file-size / open-file limits, no core dumps, an init process, no logs, and labels that let
    :func:`reap_orphans` remove it if this process dies without cleaning up.
    """

    name = "docker"
    isolated = True

    def __init__(self, config: SandboxConfig | None = None, *, client: Any = None) -> None:
        import docker

        self.config = config or SandboxConfig()
        self.client = client or docker_client()
        self.image = self.config.image or image_tag()
        try:
            self.client.images.get(self.image)
        except docker.errors.ImageNotFound:
            raise SandboxImageError(
                f"the sandbox image {self.image} is not built: run `critloop sandbox build`"
            ) from None
        except docker.errors.DockerException as exc:
            raise SandboxUnavailableError(f"the Docker engine failed: {_short(exc)}") from exc
        report = reap_orphans(self.client)
        if report.removed:
            logger.info("removed %d orphaned sandbox containers", len(report.removed))
        self._containers: dict[KernelClient, Any] = {}
        self._sockets: dict[KernelClient, Any] = {}

    def container_options(self) -> dict[str, Any]:
        """The ``containers.create`` arguments of one kernel container."""
        from docker.types import LogConfig, Ulimit

        cfg = self.config
        memory = f"{cfg.memory_mb}m"
        slots_mb = cfg.max_sessions_per_kernel * cfg.session_disk_mb
        file_limit = cfg.max_file_mb << 20
        return {
            "image": self.image,
            "stdin_open": True,
            "tty": False,
            "detach": False,  # with stdin_open: StdinOnce, so the kernel sees EOF when we go away
            "auto_remove": True,
            "network_mode": "none",
            "read_only": True,
            # The sessions' own folders (cwd, HOME and TMPDIR) live under /work, which only root
            # may list or write; the kernel mounts a size-bounded tmpfs per session slot on it
            # (this tmpfs holds them where it cannot). No shared /tmp or /dev/shm: a file one
            # session left there would be seen by every later session of the container.
            "tmpfs": {"/work": f"rw,nosuid,nodev,noexec,size={slots_mb}m,mode=0711"},
            "user": "0:0",
            "cap_drop": ["ALL"],
            "cap_add": _SUPERVISOR_CAPS,
            "sysctls": _NO_IPC_OBJECTS,
            "security_opt": ["no-new-privileges"],
            "pids_limit": cfg.pids_limit,
            "mem_limit": memory,
            "memswap_limit": memory,
            "nano_cpus": int(cfg.cpus * 1e9),
            "init": True,
            "ipc_mode": "none",
            "ulimits": [
                Ulimit(name="nofile", soft=1024, hard=1024),
                Ulimit(name="fsize", soft=file_limit, hard=file_limit),
                Ulimit(name="core", soft=0, hard=0),
            ],
            "environment": {
                "CRITLOOP_KILL_GRACE": str(cfg.kill_grace_seconds),
                "CRITLOOP_ISOLATE": "1",
                "CRITLOOP_SLOTS": str(cfg.max_sessions_per_kernel),
                "CRITLOOP_SLOT_MB": str(cfg.session_disk_mb),
                # Each kernel its own range of session uids: no two containers' sessions share
                # the per-uid accounting of the host kernel.
                "CRITLOOP_UID_BASE": str(random.randrange(1 << 7, 1 << 11) << 20),
            },
            "log_config": LogConfig(type="none"),
            "labels": _owner_labels(),
            "hostname": "sandbox",
            "name": f"critloop-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        }

    async def start_kernel(self, on_close: OnKernelClose) -> KernelClient:
        import docker

        try:
            container, raw = await asyncio.to_thread(self._create_and_attach)
        except docker.errors.DockerException as exc:
            raise SandboxUnavailableError(f"could not start a sandbox container: {_short(exc)}") from exc
        # Our own duplicate of the attach connection, driven by asyncio.
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        kernel = KernelClient(DockerAttachTransport(reader, writer), name=container.name, on_close=on_close)
        self._containers[kernel] = container
        self._sockets[kernel] = raw
        try:
            await asyncio.to_thread(container.start)
            ready = await kernel.wait_ready(self.config.start_timeout_seconds)
        except BaseException as exc:
            await self.stop_kernel(kernel)
            if isinstance(exc, docker.errors.DockerException):
                raise SandboxUnavailableError(f"could not start a sandbox container: {_short(exc)}") from exc
            raise
        _warn_weaker_isolation(ready.get("isolation") or {})
        return kernel

    def _create_and_attach(self) -> tuple[Any, Any]:
        container = self.client.containers.create(**self.container_options())
        try:
            # Attach before start, so not one byte of the kernel's output can be missed.
            io = self.client.api.attach_socket(
                container.id, params={"stdin": 1, "stdout": 1, "stderr": 0, "stream": 1}
            )
        except BaseException:
            container.remove(force=True)
            raise
        return container, getattr(io, "_sock", io)

    async def stop_kernel(self, kernel: KernelClient) -> None:
        container = self._containers.pop(kernel, None)
        raw = self._sockets.pop(kernel, None)
        await kernel.close()
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.close()
        if container is not None:
            await asyncio.to_thread(_remove, container)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop_kernel(k) for k in list(self._containers)))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image": self.image}


_warned: set[str] = set()


def _warn_weaker_isolation(isolation: dict[str, Any]) -> None:
    """Say once (per cause) where this host kept the kernel from hiding /proc or giving each
    session its own disk (a security module that refuses mounts, say)."""
    for error in isolation.get("errors") or []:
        if error not in _warned:
            _warned.add(error)
            logger.warning("sandbox isolation is weaker on this host: %s", error)


def _remove(container: Any) -> None:
    import docker

    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        container.remove(force=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
