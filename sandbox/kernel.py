"""The critloop sandbox kernel: a supervisor that owns one worker process per session.

This file runs *inside* the sandbox (a Docker container or a local subprocess) and uses the
standard library only. It is started as ``python3 -I -u kernel.py`` and speaks framed messages
on its stdio: each frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.

The supervisor is also the template: it imports math, numpy and sympy once, then forks a worker
per session, so opening a session costs a fork (milliseconds), not an interpreter start.
Workers never see the protocol file descriptors: user output goes to per-exec pipes that the
supervisor drains and caps, so printed text can never forge a protocol frame.

Requests (``id`` is echoed in the reply)::

    {"id": 1, "op": "ping"}
    {"id": 2, "op": "open",  "session": "s1"}
    {"id": 3, "op": "exec",  "session": "s1", "code": "print(1)", "timeout": 5.0,
     "max_output": 65536}
    {"id": 4, "op": "fork",  "session": "s1", "new_session": "s2"}
    {"id": 5, "op": "reset", "session": "s1"}
    {"id": 6, "op": "close", "session": "s1"}

Replies are ``{"id": N, "ok": true, ...}`` or ``{"id": N, "ok": false, "error": "..."}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
from itertools import count as _count

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
_MAX_REQUEST_BYTES = 16 << 20  # a client's request frame
_MAX_WORKER_FRAME_BYTES = 1 << 20  # a worker's frame to the supervisor (a status report)
_PREIMPORTS = ("math", "numpy", "sympy")
_SESSIONS_ROOT_ENV = "CRITLOOP_SESSIONS_ROOT"
_PR_SET_PDEATHSIG = 1
_WORKER_NICENESS = 10
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4
_TRUNCATION_MARKER = "\n[... output truncated: {n} more bytes not shown ...]\n"


# --------------------------------------------------------------------------- helpers


def _libc():
    """The C library, with errno kept for ``ctypes.get_errno()``."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int = 0) -> bool:
    """prctl(2) with the unused arguments zero (as full words: some options insist)."""
    try:
        import ctypes

        zero = ctypes.c_ulong(0)
        return _libc().prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero) == 0
    except Exception:  # noqa: BLE001 - prctl is best effort (non-Linux, no ctypes)
        return False


_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_HUGE = 1 << 21


def _collapse_heap() -> int:
    """Back the template's heap with transparent huge pages where the host allows it.

    Every session is a fork of the template, and a fork copies (and an exit tears down) one
    page-table entry per 4 KiB page mapped. The huge mappings are split again once processes
    write to them, but the memory stays in large folios, which the kernel copies and frees in
    batches: opening and closing a session costs about a fifth less CPU, a fork of one about a
    quarter less. Best effort: returns the bytes collapsed (0 on kernels before Linux 6.1, or
    with transparent huge pages off)."""
    try:
        import ctypes

        libc = _libc()
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except Exception:  # noqa: BLE001
        return 0
    collapsed = 0
    for line in maps:
        fields = line.split()
        # Private anonymous read-write memory only: the heap and the allocator's arenas.
        if not fields[1].startswith("rw") or (len(fields) > 5 and fields[5] != "[heap]"):
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        low, high = (low + _HUGE - 1) & ~(_HUGE - 1), high & ~(_HUGE - 1)
        if high > low:
            libc.madvise(low, high - low, _MADV_HUGEPAGE)
            if libc.madvise(low, high - low, _MADV_COLLAPSE) == 0:
                collapsed += high - low
    return collapsed


class FrameError(ValueError):
    """A frame that breaks the protocol: a body that is not a JSON object, or (the subclass
    :class:`FrameTooLarge`) a size past the reader's limit."""


class FrameTooLarge(FrameError):
    """A frame whose header announces more bytes than the reader accepts."""


class FrameReader:
    """The one parser of the frame stream: feed it bytes as they arrive, iterate over it for the
    complete messages (JSON objects), in order.

    Iteration stops at the first incomplete frame; the bytes wait for the next :meth:`feed`.
    A body that is not a JSON object raises :class:`FrameError` once it has been consumed, so
    iterating again goes on with the next frame. A header that announces more than ``max_size``
    bytes raises :class:`FrameTooLarge` at once (before its body arrives) and stays in the
    buffer: the stream cannot be resynchronised after it.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def needed(self) -> int:
        """Bytes still missing before the next frame is complete (0: it is). A blocking reader
        reads exactly this many. Raises :class:`FrameTooLarge` as iteration does."""
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            return HEADER.size - len(buffer)
        (size,) = HEADER.unpack_from(buffer)
        if self.max_size is not None and size > self.max_size:
            raise FrameTooLarge(f"frame of {size} bytes (at most {self.max_size})")
        return max(0, HEADER.size + size - len(buffer))

    def __iter__(self) -> FrameReader:
        return self

    def __next__(self) -> dict:
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            raise StopIteration
        (size,) = HEADER.unpack_from(buffer)
        if self.max_size is not None and size > self.max_size:
            raise FrameTooLarge(f"frame of {size} bytes (at most {self.max_size})")
        end = HEADER.size + size
        if len(buffer) < end:
            raise StopIteration
        body = bytes(buffer[HEADER.size : end])
        del buffer[:end]
        try:
            message = json.loads(body)
        except ValueError as exc:  # not JSON, or not UTF-8
            raise FrameError(str(exc)) from exc
        if not isinstance(message, dict):
            raise FrameError(f"frame body is a JSON {type(message).__name__}, not an object")
        return message


def encode_frame(payload: dict) -> bytes:
    """One frame: the header and the UTF-8 JSON of ``payload``."""
    body = json.dumps(payload).encode()
    return HEADER.pack(len(body)) + body


def _send_frame(sock: socket.socket, payload: dict, fds: list[int] | None = None) -> None:
    body = json.dumps(payload).encode()
    header = HEADER.pack(len(body))
    if fds:
        socket.send_fds(sock, [header], fds)
    else:
        sock.sendall(header)
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> tuple[dict, list[int]]:
    """The next frame of a blocking socket, with the file descriptors sent along with it."""
    header, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, 4)
    if not header:
        raise EOFError
    reader = FrameReader(_MAX_REQUEST_BYTES)
    reader.feed(header)
    while missing := reader.needed():
        reader.feed(_recv_exact(sock, missing))
    return next(reader), list(fds)


def _read_chunk(fd: int) -> bytes | None:
    """The next chunk of a non-blocking output pipe: None while it has nothing to read, ``b""``
    at its end (a read error counts as the end)."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _stat(pid: int | str) -> tuple[bytes, int] | None:
    """A process's state letter and parent pid from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (fields[0], int(fields[1])) if len(fields) > 1 else None


def _children_file(pid: int, tid: str) -> str:
    return f"/proc/{pid}/task/{tid}/children"


# Whether this kernel lists each thread's children (CONFIG_PROC_CHILDREN): reading those few
# files costs far less than the scan of every process in /proc that is the fallback.
_HAS_CHILDREN_FILES = os.path.exists(_children_file(os.getpid(), str(os.getpid())))


def _live(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        stat = _stat(pid)
        if stat is not None and stat[0] != b"Z":  # zombies hold nothing: skip them
            found.append(pid)
    return found


def _children_of(pid: int, known: frozenset[int] = frozenset()) -> list[int]:
    """Live (non-zombie) children of ``pid``, leaving out those in ``known`` (unchecked)."""
    if not _HAS_CHILDREN_FILES:
        return [child for child in _scan_children().get(pid, []) if child not in known]
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone
    pids: list[int] = []
    for tid in tids:
        try:
            with open(_children_file(pid, tid), "rb") as f:
                pids.extend(int(child) for child in f.read().split())
        except OSError:
            continue  # the thread exited meanwhile
    return _live([child for child in pids if child not in known])


def _scan_children() -> dict[int, list[int]]:
    """Parent pid -> live children, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _stat(name)
        if stat is not None and stat[0] != b"Z":
            children.setdefault(stat[1], []).append(int(name))
    return children


def _descendants(root: int, keep: frozenset[int] = frozenset()) -> list[int]:
    """All live descendants of ``root`` (by parent links in /proc), deepest last, leaving out
    the processes in ``keep`` and everything below them."""
    scanned = None if _HAS_CHILDREN_FILES else _scan_children()  # one scan serves the walk
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        if scanned is None:
            children = _children_of(pid, keep)
        else:
            children = [child for child in scanned.get(pid, []) if child not in keep]
        found.extend(children)
        queue.extend(children)
    return found


def _kill_tree(root: int, keep: frozenset[int] = frozenset()) -> None:
    """Kill a process tree (:func:`_send_kill`) and wait (briefly) until the processes are gone,
    so a caller told "closed" finds them gone."""
    _wait_gone(_send_kill(root, keep), 1.0)


def _send_kill(root: int, keep: frozenset[int] = frozenset()) -> set[int]:
    """Stop the whole process tree first (so nothing forks away), then SIGKILL it; returns the
    pids signalled. The subtrees of the processes in ``keep`` (other sessions: a fork is a child
    of its parent session) live on."""
    stopped: set[int] = set()
    for _ in range(50):
        tree = [root, *_descendants(root, keep)]
        fresh = [pid for pid in tree if pid not in stopped]
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
            stopped.add(pid)
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return stopped


def _open_pidfds(pids: set[int]) -> list[int] | None:
    """Pidfds of those of ``pids`` that still exist; None where the kernel has no pidfds (or no
    file descriptors are left), with none left open."""
    fds: list[int] = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(pid))
    except (AttributeError, OSError):
        for fd in fds:
            os.close(fd)
        return None
    return fds


def _wait_gone(pids: set[int], timeout: float) -> None:
    """Wait until the processes have exited (zombies count as gone), at most ``timeout`` s:
    on their pidfds where the kernel has them (woken by the exit itself), else by polling."""
    deadline = time.monotonic() + timeout
    fds = _open_pidfds(pids)
    if fds is not None:
        try:
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            waiting = set(fds)
            while waiting and (left := deadline - time.monotonic()) > 0:
                for fd, _ in poller.poll(left * 1000):
                    waiting.discard(fd)
                    poller.unregister(fd)
            return
        except OSError:
            pass  # polling the pidfds failed: poll /proc instead
        finally:
            for fd in fds:
                os.close(fd)
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if _alive(pid)}
        if pids:
            time.sleep(0.001)


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != b"Z"


def _preimport() -> list[str]:
    loaded = []
    for name in _PREIMPORTS:
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - a missing library is reported by ping, not fatal
            continue
        loaded.append(name)
        if name == "sympy":
            # Pay sympy's lazy first-use costs once, in the template.
            x = module.Symbol("x")
            module.simplify((x**2 - 1) / (x - 1))
    return loaded


# --------------------------------------------------------------------------- isolation
#
# With ``CRITLOOP_ISOLATE=1`` (the Docker backend sets it; the container starts as root with
# CAP_SYS_ADMIN and the few capabilities listed in _SUPERVISOR_CAPS), the supervisor locks the
# container down before it reads a single request:
#   - /proc is remounted with hidepid=invisible: a session sees its own processes only (the
#     supervisor sees all through the exempt group _PROC_GID);
#   - each session slot under /work is a size-bounded tmpfs of its own (one session filling its
#     disk leaves the others' untouched);
#   - CAP_SYS_ADMIN leaves the bounding, permitted and effective sets: the supervisor keeps only
#     what it needs to switch uids, chown, kill and drop the bounding set of its workers.
# Each worker then takes a user id of its own (never reused within the kernel) and keeps no
# capability, and a seccomp filter refuses it the namespace and mount calls that the container's
# profile allows because the container started with CAP_SYS_ADMIN.

_ISOLATE_ENV = "CRITLOOP_ISOLATE"
_PROC_GID = 10000
_CAP_CHOWN, _CAP_KILL, _CAP_SETGID, _CAP_SETUID, _CAP_SETPCAP = 0, 5, 6, 7, 8
_SUPERVISOR_CAPS = (_CAP_CHOWN, _CAP_KILL, _CAP_SETGID, _CAP_SETUID, _CAP_SETPCAP)
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 2, 4, 8, 32
_SLOT_INODES = 4096  # files and folders one session may hold: bounds the clean-up at close


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> str | None:
    """mount(2); None on success, else the error's name."""
    import ctypes

    args = (source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data.encode())
    if _libc().mount(*args) == 0:
        return None
    return os.strerror(ctypes.get_errno())


def _set_capabilities(keep: tuple[int, ...]) -> bool:
    """Drop every capability but ``keep`` from the bounding set, then make ``keep`` the permitted
    and effective sets (none inheritable)."""
    import ctypes

    libc = _libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        if cap not in keep and not _prctl(_PR_CAPBSET_DROP, cap) and ctypes.get_errno() != 22:
            return False  # (EINVAL: not a capability of this kernel)

    class _Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class _Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

    data = (_Data * 2)()
    mask = sum(1 << cap for cap in keep)
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    return libc.capset(ctypes.byref(_Header(0x20080522, 0)), data) == 0


# The calls a worker may not make: new namespaces (an unprivileged user namespace would hand its
# code every capability inside it) and the mount family. Numbers per architecture.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED_CALLS = {
    "x86_64": {"unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155},
    "aarch64": {"unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41},
}
_CLONE = {"x86_64": 56, "aarch64": 220}
_NEW_MOUNT_API = range(428, 443)  # open_tree .. mount_setattr, the same on both; clone3 is 435
_CLONE3 = 435
_CLONE_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_EPERM, _ENOSYS = 1, 38


def _seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The classic-BPF program of the worker filter, as ``(code, jt, jf, k)`` rows; None on an
    architecture the filter does not know."""
    if machine not in _AUDIT_ARCH:
        return None
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    rows: list[list] = []  # [code, jump if true, jump if false, k]; jumps are labels or None
    labels: dict[str, int] = {}

    def emit(code: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        rows.append([code, jt, jf, k])

    emit(load, 4)  # seccomp_data.arch
    emit(jeq, _AUDIT_ARCH[machine], jf="deny")  # another architecture's numbers: refused
    emit(load, 0)  # seccomp_data.nr
    emit(jge, 0x40000000, jt="deny")  # x32 numbers on x86_64
    for nr in sorted(set(_DENIED_CALLS[machine].values())):
        emit(jeq, nr, jt="deny")
    emit(jeq, _CLONE3, jt="enosys")  # its flags live in memory a filter cannot read: libc falls back to clone
    emit(jge, _NEW_MOUNT_API.start, jf="clone")
    emit(jge, _NEW_MOUNT_API.stop, jf="deny")
    labels["clone"] = len(rows)
    emit(jeq, _CLONE[machine], jf="allow")
    emit(load, 16)  # clone's flags: the low half of its first argument
    emit(jset, _CLONE_NAMESPACES, jt="deny")
    labels["allow"] = len(rows)
    emit(ret, 0x7FFF0000)
    labels["deny"] = len(rows)
    emit(ret, 0x00050000 | _EPERM)
    labels["enosys"] = len(rows)
    emit(ret, 0x00050000 | _ENOSYS)
    return [
        (code, 0 if jt is None else labels[jt] - i - 1, 0 if jf is None else labels[jf] - i - 1, k)
        for i, (code, jt, jf, k) in enumerate(rows)
    ]


def _install_seccomp() -> bool:
    import ctypes
    import platform

    program = _seccomp_program(platform.machine())
    if program is None:
        return False

    class _Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class _Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]

    filters = (_Filter * len(program))(*(_Filter(*row) for row in program))
    fprog = _Program(len(program), filters)
    if not _prctl(_PR_SET_NO_NEW_PRIVS, 1):  # what lets a process without CAP_SYS_ADMIN filter itself
        return False
    mode_filter, zero = ctypes.c_ulong(2), ctypes.c_ulong(0)
    return _libc().prctl(ctypes.c_int(_PR_SET_SECCOMP), mode_filter, ctypes.byref(fprog), zero, zero) == 0


def _wipe(top: str) -> None:
    """Empty the folder ``top`` (kept), whoever owns what is in it: each folder is taken over
    (chown to us, mode 0700) before it is read, so no capability to bypass permissions is
    needed. Iterative: a session may nest folders deeper than any recursion limit."""
    folders, stack = [], [top]
    while stack:
        folder = stack.pop()
        with contextlib.suppress(OSError):
            os.chown(folder, os.getuid(), os.getgid(), follow_symlinks=False)
            os.chmod(folder, 0o700)
        folders.append(folder)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    for folder in reversed(folders[1:]):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


class _Homes:
    """The sessions' own folders (cwd, HOME and TMPDIR).

    Isolated: a fixed set of slots under the root, each its own tmpfs of ``slot_mb`` (where the
    mounts succeed), taken by one session (and its snapshots, which share its uid) at a time
    and emptied when it is given back. Otherwise: a folder per session, made on demand."""

    def __init__(self, root: str, *, slots: int = 0, slot_mb: int = 0) -> None:
        self.root = root
        self.slots = slots
        self.slot_mb: int | None = None
        self.free: list[str] = []
        self.error: str | None = None
        os.makedirs(root, mode=0o700, exist_ok=True)
        if not slots:
            return
        os.chmod(root, 0o711)  # sessions may pass through to their own folder, not list the others
        mounted = True
        for i in range(slots):
            path = os.path.join(root, str(i))
            os.makedirs(path, mode=0o700, exist_ok=True)
            if mounted and slot_mb:
                error = _mount(
                    "tmpfs",
                    path,
                    "tmpfs",
                    _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                    f"size={slot_mb}m,nr_inodes={_SLOT_INODES},mode=0700",
                )
                if error is not None:
                    mounted, self.error = False, f"no tmpfs per session ({error})"
            self.free.append(path)
        if mounted and slot_mb:
            self.slot_mb = slot_mb
        self.free.reverse()  # hand out 0, 1, 2, ... first

    def take(self, name: str, uid: int | None) -> str:
        """A clean folder for a session, owned by ``uid`` (None: ours) and closed to others."""
        if not self.slots:
            path = os.path.join(self.root, name)
            os.makedirs(path, mode=0o700, exist_ok=True)
            return path
        if not self.free:
            raise RuntimeError(f"no free session slot ({self.slots} in use)")
        path = self.free.pop()
        os.chmod(path, 0o700)  # (while it is still ours: a chmod needs the owner)
        if uid is not None:
            os.chown(path, uid, uid)
        return path

    def give_back(self, path: str) -> None:
        if not self.slots:
            shutil.rmtree(path, ignore_errors=True)
            return
        _wipe(path)
        self.free.append(path)

    def usage(self) -> dict:
        """Free and total bytes of the sessions' disks (every slot's, where each has its own)."""
        paths = [os.path.join(self.root, str(i)) for i in range(self.slots)] if self.slot_mb else [self.root]
        free = total = 0
        for path in paths:
            try:
                usage = shutil.disk_usage(path)
            except OSError:
                continue
            free, total = free + usage.free, total + usage.total
        return {"free": free, "total": total}

    def clear(self) -> None:
        if not self.slots:
            shutil.rmtree(self.root, ignore_errors=True)


def _lock_down(root: str, *, slots: int, slot_mb: int) -> tuple[_Homes, dict]:
    """The privileged start of an isolated kernel (see the section comment): the session
    folders, /proc, then the capabilities. Returns the folders and what was achieved."""
    facts: dict = {"uid_per_session": False, "proc_hidden": False, "session_disk_mb": None, "errors": []}
    error = _mount(
        "proc",
        "/proc",
        "proc",
        _MS_REMOUNT | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
        f"hidepid=invisible,gid={_PROC_GID}",
    )
    if error is None:
        facts["proc_hidden"] = True
    else:
        facts["errors"].append(f"/proc not hidden ({error})")
    homes = _Homes(root, slots=slots, slot_mb=slot_mb)
    facts["session_disk_mb"] = homes.slot_mb
    if homes.error:
        facts["errors"].append(homes.error)
    try:
        os.setgroups([_PROC_GID])
        if not _set_capabilities(_SUPERVISOR_CAPS):
            raise OSError("capset failed")
        facts["uid_per_session"] = True
    except OSError as exc:
        facts["errors"].append(f"no uid per session ({exc})")
    return homes, facts


def _drop_privileges(uid: int) -> None:
    """In a new worker of an isolated kernel: the namespace filter, no capability left (not even
    in the bounding set), then the session's own uid and gid, no supplementary group."""
    if not _install_seccomp():
        raise OSError("the seccomp filter could not be installed")
    for cap in _SUPERVISOR_CAPS:
        _prctl(_PR_CAPBSET_DROP, cap)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # leaving uid 0 for good clears the permitted and effective sets


_CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.max"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def _memory() -> dict | None:
    """The container's memory use and limit in bytes (from its cgroup), or None."""
    for used_path, limit_path in _CGROUP_MEMORY:
        try:
            with open(used_path) as f:
                used = int(f.read())
            with open(limit_path) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        limit = int(text) if text.isdigit() else None
        return {"used": used, "limit": limit if limit and limit < 1 << 60 else None}
    return None


# --------------------------------------------------------------------------- worker


class _Worker:
    """Runs inside a forked worker process: executes code for exactly one session."""

    def __init__(self, sock: socket.socket, session_dir: str, uid: int | None = None) -> None:
        self.sock = sock
        self.session_dir = session_dir
        self.uid = uid  # the session's own user id (isolated kernels), None: the kernel's
        self.namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.in_user_code = False

    def _on_sigint(self, signum, frame) -> None:
        # The supervisor's timeout signal interrupts user code only, never the worker's own
        # bookkeeping (a SIGINT racing the end of a run is dropped).
        if self.in_user_code:
            raise KeyboardInterrupt

    def setup(self, clone: bool = False) -> None:
        os.setpgid(0, 0)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, self._on_sigint)
        if not clone:
            self._adjust_oom()
            if self.uid is not None:
                _drop_privileges(self.uid)  # a clone has the uid of the session it copies
            # A clone is the child of the session it copies and must outlive it: it has no
            # death signal. If the supervisor dies, the container (or bubblewrap's pid
            # namespace) goes with it, and an idle clone exits at the end of its channel.
            # (Set after the uid change, which clears it.)
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            # A CPU-hungry session must not starve the supervisor of its deadlines. (A clone
            # inherits this; lowering it again would leave forks of forks nearly no CPU.)
            try:
                os.nice(_WORKER_NICENESS)
            except OSError:
                pass
        # Orphans of this session's processes stay in this worker's tree, so that closing the
        # session can find and kill every one of them (setsid and double forks included).
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        _prctl(_PR_SET_DUMPABLE, 0)  # no ptrace or /proc/<pid>/mem access, even by its own uid
        self.enter_dir()
        os.dup2(self.devnull, 0)
        os.dup2(self.devnull, 1)
        os.dup2(self.devnull, 2)

    @staticmethod
    def _adjust_oom() -> None:
        _prctl(_PR_SET_DUMPABLE, 1)  # /proc/self is root-owned while not dumpable
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # under memory pressure, user code dies before the supervisor
        except OSError:
            pass
        _prctl(_PR_SET_DUMPABLE, 0)

    def enter_dir(self) -> None:
        os.makedirs(self.session_dir, mode=0o700, exist_ok=True)
        os.chdir(self.session_dir)
        os.environ["HOME"] = os.environ["TMPDIR"] = self.session_dir
        import tempfile

        tempfile.tempdir = None

    def serve(self) -> None:
        _send_frame(self.sock, {"hello": os.getpid()})
        while True:
            try:
                msg, fds = _recv_frame(self.sock)
            except (EOFError, OSError, ValueError):
                os._exit(0)
            op = msg.get("op")
            if op == "exec":
                try:
                    reply = self.exec(msg.get("code", ""), fds)
                except KeyboardInterrupt:
                    reply = {"status": "interrupted", "error": "KeyboardInterrupt"}
                self._after_exec()
            elif op == "fork":
                reply = self.fork(msg["session_dir"], fds[0])
            else:
                reply = {"status": "error", "error": f"unknown worker op {op!r}"}
            self._reap_orphans()
            try:
                _send_frame(self.sock, reply)
            except OSError:
                os._exit(0)

    def exec(self, code: str, fds: list[int]) -> dict:
        out_fd, err_fd = fds
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        sys.stdout = self._stream(1, "__stdout__")
        sys.stderr = self._stream(2, "__stderr__")
        sys.stdin = self._stream(0, "__stdin__", mode="r")
        signal.signal(signal.SIGINT, self._on_sigint)  # user code may have replaced it
        reply = {"status": "ok"}
        self.in_user_code = True
        try:
            self._run(code)
        except KeyboardInterrupt:
            reply = {"status": "interrupted", "error": "KeyboardInterrupt"}
            self._print_traceback()
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            reply = {"status": "error", "error": self._summary(exc)}
            self._print_traceback()
        finally:
            self.in_user_code = False
        return reply

    def _after_exec(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a user-replaced stream may be broken
                pass
        # Late writers (threads, children) now write to /dev/null, so the pipes reach EOF.
        os.dup2(self.devnull, 1)
        os.dup2(self.devnull, 2)

    def _run(self, code: str) -> None:
        import ast

        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body[-1].value)
            tree.body.pop()
        exec(compile(tree, "<cell>", "exec"), self.namespace)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), self.namespace)
            if value is not None:
                print(repr(value))

    @staticmethod
    def _stream(fd: int, name: str, mode: str = "w"):
        stream = getattr(sys, name)
        try:
            reusable = stream is not None and not stream.closed and stream.fileno() == fd
        except Exception:  # noqa: BLE001 - user code may have replaced it with anything
            reusable = False
        if not reusable:
            stream = open(fd, mode, closefd=False, errors="backslashreplace")  # noqa: SIM115
            setattr(sys, name, stream)
        return stream

    @staticmethod
    def _summary(exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text[:500]

    @staticmethod
    def _print_traceback() -> None:
        import traceback

        value = sys.exc_info()[1]
        if value is None:
            return
        try:
            report = traceback.TracebackException(type(value), value, value.__traceback__)
            # The user sees only the frames of their own code, never the kernel's.
            report.stack = traceback.StackSummary.from_list(
                [frame for frame in report.stack if frame.filename != __file__]
            )
            sys.stderr.write("".join(report.format()))
        except BaseException:  # noqa: BLE001
            pass

    @staticmethod
    def _reap_orphans() -> None:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass

    def fork(self, new_dir: str, new_sock_fd: int) -> dict:
        # One fork: the clone stays this worker's child (the supervisor's tree walks step
        # around registered sessions), and goes to the supervisor, a subreaper, when this
        # session is closed. A double fork to re-parent it at once costs a second copy and
        # tear-down of the page tables, the largest cost of a snapshot.
        try:
            if os.fork() == 0:
                self._become_clone(new_dir, new_sock_fd)
        finally:
            os.close(new_sock_fd)
        return {"status": "ok"}

    def _become_clone(self, new_dir: str, new_sock_fd: int) -> None:
        try:
            self.sock.close()
            self.sock = socket.socket(fileno=new_sock_fd)
            # Another thread may have held a stream's lock at fork time: start with fresh ones.
            sys.stdout = sys.stderr = None
            try:
                shutil.copytree(self.session_dir, new_dir, symlinks=True, dirs_exist_ok=True)
            except OSError:
                pass
            self.session_dir = new_dir
            self.setup(clone=True)
            self.serve()
        finally:
            os._exit(0)


# --------------------------------------------------------------------------- supervisor


class _Exec:
    """An exec request in flight: its output pipes, deadlines and the client request id."""

    def __init__(self, req_id: object, timeout: float, max_output: int, grace: float) -> None:
        self.req_id = req_id
        self.started = time.monotonic()
        self.timeout = timeout
        self.deadline = self.started + timeout
        self.grace = grace
        self.kill_at: float | None = None
        self.interrupted = False
        self.max_output = max_output
        # Open pipe read ends -> stream (1 stdout, 2 stderr). A pipe that reached its end is
        # closed and forgotten at once: its fd number may be reused by another session's run.
        self.pipes: dict[int, int] = {}
        self.buffers: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.dropped: dict[int, int] = {1: 0, 2: 0}


class _Fork:
    def __init__(self, req_id: object, parent: str) -> None:
        self.req_id = req_id
        self.parent = parent
        self.acked = False


class _Closing:
    """A close whose processes are dying: answered when their pidfds say they are gone."""

    def __init__(self, req_id: object, sid: str, pidfds: set[int], deadline: float) -> None:
        self.req_id = req_id
        self.sid = sid
        self.pidfds = pidfds
        self.deadline = deadline


class _Session:
    def __init__(
        self, sid: str, pid: int, sock: socket.socket, session_dir: str | None, uid: int | None
    ) -> None:
        self.sid = sid
        self.pid = pid  # 0 until a clone says hello
        self.sock = sock
        self.session_dir = session_dir  # None once given back
        self.uid = uid
        self.frames = FrameReader(_MAX_WORKER_FRAME_BYTES)
        self.pending: _Exec | None = None
        self.pending_fork: str | None = None  # the clone this worker is forking
        self.lost_state = False  # the worker died while idle: the next exec reports it
        self.pidfd = -1


class Supervisor:
    def __init__(
        self,
        proto_in: int,
        proto_out: int,
        modules: list[str],
        huge_bytes: int = 0,
        *,
        homes: _Homes,
        isolation: dict | None = None,
    ) -> None:
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.modules = modules
        self.huge_bytes = huge_bytes
        self.homes = homes
        self.isolation = isolation or {"uid_per_session": False}
        # Session uids are never reused within a kernel: nothing a uid may have left behind
        # (a process that escaped, an IPC object) can reach a later session.
        base = int(os.environ.get("CRITLOOP_UID_BASE", "100000"))
        self.uids = (base + (n % (1 << 20)) for n in _count())
        self.waiting_homes: dict[int, list[str]] = {}  # uid -> folders of its closed sessions
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[str, _Session] = {}
        self.by_fd: dict[int, _Session] = {}
        self.pipes: dict[int, _Session] = {}
        self.requests = FrameReader(_MAX_REQUEST_BYTES)
        self.exits: dict[int, int] = {}  # reaped pid -> wait status
        self.grace = float(os.environ.get("CRITLOOP_KILL_GRACE", "0.5"))
        # Forks in progress, by clone session id. A fork is answered once the parent has
        # acknowledged it AND the clone has said hello, so both are usable at the reply.
        self.forks: dict[str, _Fork] = {}
        self.by_pidfd: dict[int, _Session] = {}
        # Closes waiting for their killed processes to exit, by pidfd: the supervisor serves
        # other sessions meanwhile (a dying process's exit can take long on a busy machine).
        self.closing: dict[int, _Closing] = {}

    # ---- client channel

    def reply(self, payload: dict) -> None:
        data = memoryview(encode_frame(payload))
        while data:
            try:
                data = data[os.write(self.proto_out, data) :]
            except InterruptedError:
                continue

    def run(self) -> None:
        os.set_blocking(self.proto_in, False)
        self.sel.register(self.proto_in, selectors.EVENT_READ, "proto")
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        _prctl(_PR_SET_DUMPABLE, 0)  # no ptrace or /proc/<pid>/mem access by user code
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for name in [name for name in os.environ if name.startswith("CRITLOOP_")]:
            del os.environ[name]  # the kernel's own settings, read by now: no business of the sessions
        self.reply(
            {"event": "ready", "pid": os.getpid(), "protocol": PROTOCOL_VERSION, "isolation": self.isolation}
        )
        while True:
            for key, _ in self.sel.select(self._next_timeout()):
                if key.data == "proto":
                    if not self._read_proto():
                        self.shutdown()
                        return
                    continue
                try:
                    if key.data == "worker":
                        self._read_worker(key.fd)
                    elif key.data == "closing":
                        self._closing_ready(key.fd)
                    elif key.data == "pidfd":
                        self._pidfd_ready(key.fd)
                    else:
                        self._read_pipe(key.fd)
                except Exception:  # noqa: BLE001 - one session's trouble must not stop the kernel
                    self._log_bug()
            try:
                self._check_deadlines()
                self._reap()
            except Exception:  # noqa: BLE001
                self._log_bug()

    @staticmethod
    def _log_bug() -> None:
        import traceback

        try:
            os.write(2, ("critloop kernel: " + traceback.format_exc()).encode())
        except OSError:
            pass

    def shutdown(self) -> None:
        for session in list(self.sessions.values()):
            self._destroy(session)
        self.homes.clear()

    def _next_timeout(self) -> float:
        now, timeout = time.monotonic(), 1.0
        for closing in self.closing.values():
            timeout = min(timeout, max(0.0, closing.deadline - now))
        for session in self.sessions.values():
            pending = session.pending
            if pending is not None:
                at = pending.kill_at if pending.kill_at is not None else pending.deadline
                timeout = min(timeout, max(0.0, at - now))
        return timeout

    def _read_proto(self) -> bool:
        try:
            data = os.read(self.proto_in, 1 << 20)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.requests.feed(data)
        while True:
            try:
                for msg in self.requests:
                    self._dispatch(msg)
                return True
            except FrameTooLarge:
                self.reply({"event": "fatal", "error": "request frame too large"})
                return False
            except FrameError:  # that frame is consumed: go on with the next
                self.reply({"id": None, "ok": False, "error": "request is not a JSON object"})

    # ---- requests

    def _dispatch(self, msg: dict) -> None:
        req_id = msg.get("id")
        handler = getattr(self, f"_op_{msg.get('op')}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown op {msg.get('op')!r}")
            result = handler(req_id, msg)
        except Exception as exc:  # noqa: BLE001 - a bad request must never stop the kernel
            self.reply({"id": req_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        if result is not None:
            self.reply({"id": req_id, "ok": True, **result})

    def _session(self, msg: dict, key: str = "session") -> _Session:
        sid = msg.get(key)
        session = self.sessions.get(sid) if isinstance(sid, str) else None
        if session is None:
            raise KeyError(f"no session {sid!r}")
        if session.pending is not None or session.pending_fork is not None:
            raise RuntimeError(f"session {sid!r} is busy")
        return session

    def _new_id(self, msg: dict, key: str) -> str:
        sid = msg.get(key)
        if not isinstance(sid, str) or not sid or "/" in sid or sid.startswith("."):
            raise ValueError(f"invalid session id {sid!r}")
        if sid in self.sessions:
            raise ValueError(f"session {sid!r} exists already")
        return sid

    def _op_ping(self, req_id, msg) -> dict:
        return {
            "pid": os.getpid(),
            "protocol": PROTOCOL_VERSION,
            "python": sys.version.split()[0],
            "modules": self.modules,
            "template_huge_pages_mb": self.huge_bytes >> 20,
            "sessions": sorted(self.sessions),
            "processes": len(_descendants(os.getpid())),
            "disk": self.homes.usage(),
            "isolation": self.isolation,
            "slots_free": len(self.homes.free) if self.homes.slots else None,
            "memory": self._memory(),
        }

    def _memory(self) -> dict | None:
        # Only a container's cgroup is the kernel's own; a local kernel's is the host's.
        return _memory() if self.isolation["uid_per_session"] else None

    def _op_open(self, req_id, msg) -> dict:
        sid = self._new_id(msg, "session")
        self._spawn(sid)
        return {"session": sid, "memory": self._memory()}

    def _op_exec(self, req_id, msg) -> None:
        session = self._session(msg)
        code = msg.get("code")
        if not isinstance(code, str):
            raise TypeError("code must be a string")
        pending = _Exec(
            req_id, float(msg.get("timeout", 10.0)), int(msg.get("max_output", 65536)), self.grace
        )
        write_ends = []
        for stream in (1, 2):
            r, w = os.pipe()
            os.set_blocking(r, False)
            pending.pipes[r] = stream
            self.pipes[r] = session
            self.sel.register(r, selectors.EVENT_READ, "pipe")
            write_ends.append(w)
        session.pending = pending
        try:
            _send_frame(session.sock, {"op": "exec", "code": code}, write_ends)
        except OSError:
            self._worker_died(session, "the worker did not accept the request")
        finally:
            for w in write_ends:
                os.close(w)
        return None

    def _op_fork(self, req_id, msg) -> None:
        parent = self._session(msg)
        new_sid = self._new_id(msg, "new_session")
        new_dir = self.homes.take(new_sid, parent.uid)  # a snapshot shares its session's uid
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self.homes.give_back(new_dir)
            raise
        try:
            _send_frame(parent.sock, {"op": "fork", "session_dir": new_dir}, [theirs.fileno()])
        except OSError:
            mine.close()
            self.homes.give_back(new_dir)
            raise RuntimeError(f"session {parent.sid!r} is not answering") from None
        finally:
            theirs.close()
        self._register(_Session(new_sid, 0, mine, new_dir, parent.uid))
        parent.pending_fork = new_sid
        self.forks[new_sid] = _Fork(req_id, parent.sid)
        return None

    def _op_reset(self, req_id, msg) -> dict:
        session = self._session(msg)
        self._destroy(session)
        self._spawn(session.sid)
        return {"session": session.sid}

    def _op_close(self, req_id, msg) -> dict | None:
        sid = msg.get("session")
        session = self.sessions.get(sid) if isinstance(sid, str) else None
        if session is None:
            raise KeyError(f"no session {sid!r}")
        if session.pending is not None:
            self._finish(session, "killed", "the session was closed", state_survived=False)
        dying = self._destroy(session, wait=False)
        pidfds = _open_pidfds(dying)
        if pidfds is None:  # no pidfds here (or no fds left): wait in place
            _wait_gone(dying, 1.0)
            return {"session": sid}
        if not pidfds:
            return {"session": sid}
        closing = _Closing(req_id, sid, set(pidfds), time.monotonic() + 1.0)
        for fd in pidfds:
            self.closing[fd] = closing
            self.sel.register(fd, selectors.EVENT_READ, "closing")
        return None

    def _closing_ready(self, fd: int, expired: bool = False) -> None:
        """A dying process of a close has exited (or, ``expired``, the close waited long
        enough): the close is answered once none is left."""
        closing = self.closing.pop(fd, None)
        if closing is None:
            return
        for done in [*closing.pidfds] if expired else [fd]:
            self.closing.pop(done, None)
            self.sel.unregister(done)
            os.close(done)
            closing.pidfds.discard(done)
        if not closing.pidfds:
            self.reply({"id": closing.req_id, "ok": True, "session": closing.sid})

    # ---- workers

    def _spawn(self, sid: str) -> _Session:
        uid = next(self.uids) if self.isolation["uid_per_session"] else None
        session_dir = self.homes.take(sid, uid)
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self.homes.give_back(session_dir)
            raise
        for attempt in range(400):
            try:
                pid = os.fork()
                break
            except BlockingIOError:  # zombies or strays still hold the container's pids
                if attempt == 399:
                    mine.close()
                    theirs.close()
                    self.homes.give_back(session_dir)
                    raise
                self._reap()
                time.sleep(0.005)
        if pid == 0:
            try:
                mine.close()
                keep = theirs.fileno()
                os.closerange(3, keep)
                os.closerange(keep + 1, 1 << 16)
                worker = _Worker(theirs, session_dir, uid)
                worker.setup()
                worker.serve()
            finally:
                os._exit(1)
        theirs.close()
        session = _Session(sid, pid, mine, session_dir, uid)
        self._register(session)
        return session

    def _register(self, session: _Session) -> None:
        # Blocking with a timeout: a stopped worker cannot hang the supervisor on a send.
        session.sock.settimeout(5.0)
        self.sessions[session.sid] = session
        self.by_fd[session.sock.fileno()] = session
        self.sel.register(session.sock, selectors.EVENT_READ, "worker")
        self._watch(session)

    def _watch(self, session: _Session) -> None:
        if session.pid and session.pidfd < 0:
            try:
                session.pidfd = os.pidfd_open(session.pid)
            except (OSError, AttributeError):
                return
            self.by_pidfd[session.pidfd] = session
            self.sel.register(session.pidfd, selectors.EVENT_READ, "pidfd")

    def _pidfd_ready(self, fd: int) -> None:
        session = self.by_pidfd.get(fd)
        if session is not None and self.sessions.get(session.sid) is session and not _alive(session.pid):
            self._worker_died(session)

    def _unregister(self, session: _Session) -> None:
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]
        fd = session.sock.fileno()
        if fd >= 0:
            self.by_fd.pop(fd, None)
            try:
                self.sel.unregister(session.sock)
            except (KeyError, ValueError):
                pass
        session.sock.close()
        if session.pidfd >= 0:
            self.by_pidfd.pop(session.pidfd, None)
            try:
                self.sel.unregister(session.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(session.pidfd)
            session.pidfd = -1

    def _destroy(self, session: _Session, *, wait: bool = True) -> set[int]:
        """Kill the worker and everything it started; remove its files. Without ``wait``,
        returns the pids killed, which may not have exited yet."""
        # Kill before closing the channel: a worker that sees the channel close exits at once,
        # and its children would be re-parented out of reach of the tree walk.
        dying = _send_kill(session.pid, self._other_sessions(session)) if session.pid else set()
        if wait:
            _wait_gone(dying, 1.0)
        self._unregister(session)
        self._kill_strays()
        if session.pending is not None:
            self._close_pipes(session.pending)
            session.pending = None
        self._give_back_home(session)
        return dying

    def _give_back_home(self, session: _Session) -> None:
        """Give a closed session's folder back; on an isolated kernel, only once no process of
        its uid is left. A snapshot shares its session's uid and outlives it: while one lives, a
        process of it could hold a descriptor into the folder (write into a file there, which
        would fill the next tenant's disk) or race the clean-up. Such folders wait, untouched
        and closed to every other uid, until the last session of that uid is gone."""
        path, session.session_dir = session.session_dir, None
        if path is None:
            return
        uid = session.uid
        if uid is not None and any(s.uid == uid for s in self.sessions.values()):
            self.waiting_homes.setdefault(uid, []).append(path)
            return
        self.homes.give_back(path)
        for held in self.waiting_homes.pop(uid, []) if uid is not None else []:
            self.homes.give_back(held)

    def _read_worker(self, fd: int) -> None:
        session = self.by_fd.get(fd)
        if session is None:
            return
        try:
            data = session.sock.recv(1 << 16)
        except (TimeoutError, BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._worker_died(session)
            return
        session.frames.feed(data)
        try:
            for msg in session.frames:
                self._worker_message(session, msg)
                if self.sessions.get(session.sid) is not session:
                    return
        except FrameTooLarge:
            self._worker_died(session, "the worker sent an oversized frame")
        except FrameError:
            self._worker_died(session, "the worker sent a malformed frame")

    def _worker_message(self, session: _Session, msg: dict) -> None:
        if "hello" in msg:
            fork = self.forks.get(session.sid)
            if fork is not None and not session.pid and isinstance(msg["hello"], int):
                session.pid = msg["hello"]
                self._watch(session)
                self._fork_progress(session.sid)
            return
        if session.pending_fork is not None:
            clone_sid = session.pending_fork
            session.pending_fork = None
            fork = self.forks.get(clone_sid)
            if fork is None:
                return
            if msg.get("status") == "ok":
                fork.acked = True
                self._fork_progress(clone_sid)
            else:
                self._fail_fork(clone_sid, "the fork failed in the worker")
            return
        pending = session.pending
        if pending is None:
            return  # unsolicited (user code writing to the control socket): ignore
        status = msg.get("status")
        error = msg.get("error") if isinstance(msg.get("error"), str) else None
        if pending.interrupted:
            status, error = "timeout", f"timed out after {pending.timeout:g}s"
        elif status not in ("ok", "error"):
            status = "error"
        self._finish(session, status, error, state_survived=not session.lost_state)

    def _finish(self, session: _Session, status: str, error: str | None, state_survived: bool) -> None:
        pending = session.pending
        if pending is None:
            return
        session.pending = None
        session.lost_state = False
        self._drain(pending)
        self._close_pipes(pending)
        out = {1: "", 2: ""}
        for stream, buf in pending.buffers.items():
            text = buf.decode("utf-8", errors="replace")
            if pending.dropped[stream]:
                text += _TRUNCATION_MARKER.format(n=pending.dropped[stream])
            out[stream] = text
        result = {
            "status": status,
            "stdout": out[1],
            "stderr": out[2],
            "error": error,
            "duration": time.monotonic() - pending.started,
            "state_survived": state_survived,
            "truncated": any(pending.dropped.values()),
        }
        self.reply({"id": pending.req_id, "ok": True, "result": result})

    def _worker_died(self, session: _Session, why: str | None = None) -> None:
        """The worker is gone or misbehaved: replace it with a fresh one (state lost)."""
        cause = why or self._exit_cause(session.pid)
        self._unregister(session)
        if session.pid:
            _kill_tree(session.pid, self._other_sessions(session))
        self._kill_strays()  # orphans of a worker that died first are our children now
        self._reap()  # killed processes are zombies that still count against the pids limit
        self._give_back_home(session)
        if session.sid in self.forks:
            self._fail_fork(session.sid, "the clone died before it started")
            return
        try:
            fresh = self._spawn(session.sid)
        except OSError as exc:  # the container's pids are still exhausted: report, do not die
            if session.pending is not None:
                self._finish(session, "killed", f"the worker died and could not be restarted: {exc}", False)
            return
        fresh.lost_state = True
        if session.pending_fork is not None:
            self._fail_fork(session.pending_fork, "the session died during the fork")
        pending = session.pending
        if pending is not None:
            fresh.pending = pending
            if pending.interrupted:
                self._finish(
                    fresh, "timeout", f"timed out after {pending.timeout:g}s; the worker was killed", False
                )
            else:
                self._finish(fresh, "killed", f"the worker died: {cause}", False)
        self._kill_strays()

    def _fork_progress(self, clone_sid: str) -> None:
        fork = self.forks[clone_sid]
        clone = self.sessions.get(clone_sid)
        if fork.acked and clone is not None and clone.pid:
            del self.forks[clone_sid]
            self.reply({"id": fork.req_id, "ok": True, "session": clone_sid, "memory": self._memory()})

    def _fail_fork(self, clone_sid: str, error: str) -> None:
        fork = self.forks.pop(clone_sid, None)
        if fork is None:
            return
        parent = self.sessions.get(fork.parent)
        if parent is not None and parent.pending_fork == clone_sid:
            parent.pending_fork = None
        clone = self.sessions.get(clone_sid)
        if clone is not None:
            self._destroy(clone)
        self.reply({"id": fork.req_id, "ok": False, "error": error})

    def _exit_cause(self, pid: int) -> str:
        if not pid:
            return "cause unknown"
        for _ in range(20):  # an EOF usually means the process is exiting right now
            self._reap()
            if pid in self.exits:
                break
            time.sleep(0.0025)
        code = self.exits.pop(pid, None)
        if code is None:
            return "it closed its channel"
        if os.WIFSIGNALED(code):
            sig = os.WTERMSIG(code)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            hint = " (out of memory, or killed)" if sig == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exit code {os.WEXITSTATUS(code)}"

    def _other_sessions(self, session: _Session) -> frozenset[int]:
        """Worker pids of every session but this one (forks live in their parent's tree)."""
        return frozenset(s.pid for s in self.sessions.values() if s.pid and s is not session)

    def _kill_strays(self) -> None:
        """Kill our direct children that belong to no session (orphans of dead workers)."""
        if self.forks:
            return  # a clone's pid is not known yet: it must not be mistaken for a stray
        known = frozenset(s.pid for s in self.sessions.values())
        for pid in _children_of(os.getpid(), known):  # checking only the others: O(strays)
            _kill_tree(pid, known)

    # ---- output pipes

    def _read_pipe(self, fd: int) -> None:
        session = self.pipes.get(fd)
        pending = session.pending if session is not None else None
        if pending is None or fd not in pending.pipes:
            return
        data = _read_chunk(fd)
        if data is None:
            return
        if data:
            self._keep(pending, pending.pipes[fd], data)
        else:
            self._close_pipe(pending, fd)

    @staticmethod
    def _keep(pending: _Exec, stream: int, data: bytes) -> None:
        buf = pending.buffers[stream]
        room = max(0, pending.max_output - len(buf))
        buf += data[:room]
        pending.dropped[stream] += max(0, len(data) - room)

    def _drain(self, pending: _Exec) -> None:
        """Read what the pipes hold now, without waiting for writers that outlive the run."""
        for fd, stream in list(pending.pipes.items()):
            while (data := _read_chunk(fd)) is not None:
                if not data:
                    self._close_pipe(pending, fd)
                    break
                self._keep(pending, stream, data)

    def _close_pipe(self, pending: _Exec, fd: int) -> None:
        del pending.pipes[fd]
        del self.pipes[fd]
        self.sel.unregister(fd)
        os.close(fd)

    def _close_pipes(self, pending: _Exec) -> None:
        for fd in list(pending.pipes):
            self._close_pipe(pending, fd)

    # ---- time

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for fd, closing in list(self.closing.items()):
            if now >= closing.deadline and fd in self.closing:
                self._closing_ready(fd, expired=True)
        for session in list(self.sessions.values()):
            pending = session.pending
            if pending is None:
                continue
            if pending.kill_at is None and now >= pending.deadline:
                pending.interrupted = True
                pending.kill_at = now + pending.grace
                try:
                    os.kill(session.pid, signal.SIGINT)
                except OSError:
                    pass
            elif pending.kill_at is not None and now >= pending.kill_at:
                self._worker_died(session)

    def _reap(self) -> None:
        # Clones and orphans are re-parented to us (we are a subreaper): collect their exits.
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            self.exits[pid] = code
            if len(self.exits) > 4096:
                self.exits.pop(next(iter(self.exits)))


def main() -> None:
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    root = os.environ.get(_SESSIONS_ROOT_ENV) or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"critloop-sessions-{os.getpid()}"
    )
    if os.environ.get(_ISOLATE_ENV) == "1":
        # Before anything else, while nothing has been read from the client.
        homes, isolation = _lock_down(
            root,
            slots=int(os.environ.get("CRITLOOP_SLOTS", "256")),  # max_sessions_per_kernel's default
            slot_mb=int(os.environ.get("CRITLOOP_SLOT_MB", "16")),
        )
        if not isolation["uid_per_session"]:
            # Workers would run as root with the container's start-up capabilities: refuse.
            os.write(proto_out, encode_frame({"event": "fatal", "error": "; ".join(isolation["errors"])}))
            sys.exit(1)
    else:
        homes, isolation = _Homes(root), None
    modules = _preimport()
    import gc

    gc.collect()
    gc.freeze()  # what the template holds stays out of every session's collections (and pages)
    huge = _collapse_heap()
    try:
        Supervisor(proto_in, proto_out, modules, huge, homes=homes, isolation=isolation).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    main()
