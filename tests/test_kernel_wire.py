"""The kernel's wire protocol, spoken raw: bad requests get clear errors and never stop it."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from critloop.sandbox import kernel
from critloop.sandbox._client import KernelClient

KERNEL = Path(kernel.__file__)


class Wire:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-u", str(KERNEL)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.next_id = 0

    def send_raw(self, body: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(kernel.HEADER.pack(len(body)) + body)
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        (size,) = kernel.HEADER.unpack(self.proc.stdout.read(kernel.HEADER.size))
        return json.loads(self.proc.stdout.read(size))

    def call(self, **message: Any) -> dict[str, Any]:
        self.next_id += 1
        self.send_raw(json.dumps({"id": self.next_id, **message}).encode())
        return self.recv()


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    assert w.recv()["event"] == "ready"
    yield w
    assert w.proc.stdin is not None
    w.proc.stdin.close()
    assert w.proc.wait(timeout=10) == 0  # end of input: the kernel cleans up and exits


# --------------------------------------------------------------------------- the frame parser


def test_a_frame_split_across_feeds_comes_out_once_complete() -> None:
    frame = kernel.encode_frame({"id": 1, "text": "ünïcode"})
    reader = kernel.FrameReader()
    for i in range(len(frame) - 1):  # byte by byte: through the header, then the body
        reader.feed(frame[i : i + 1])
        assert list(reader) == []
    reader.feed(frame[-1:])
    assert list(reader) == [{"id": 1, "text": "ünïcode"}]
    assert list(reader) == []  # consumed


def test_several_frames_in_one_feed_come_out_in_order() -> None:
    messages = [{"id": i} for i in range(3)]
    tail = kernel.encode_frame({"id": 3})
    reader = kernel.FrameReader()
    reader.feed(b"".join(map(kernel.encode_frame, messages)) + tail[:5])
    assert list(reader) == messages
    reader.feed(tail[5:])
    assert list(reader) == [{"id": 3}]


def test_needed_says_how_many_bytes_complete_the_next_frame() -> None:
    frame = kernel.encode_frame({"id": 7})
    reader = kernel.FrameReader(max_size=64)
    assert reader.needed() == kernel.HEADER.size
    reader.feed(frame[:2])
    assert reader.needed() == kernel.HEADER.size - 2
    reader.feed(frame[2 : kernel.HEADER.size + 1])
    assert reader.needed() == len(frame) - kernel.HEADER.size - 1
    reader.feed(frame[kernel.HEADER.size + 1 :])
    assert reader.needed() == 0 and next(reader) == {"id": 7}
    reader.feed(kernel.HEADER.pack(65))
    with pytest.raises(kernel.FrameTooLarge):
        reader.needed()


def test_a_blocking_socket_reads_a_frame_with_its_file_descriptors() -> None:
    import os
    import socket

    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        frame = kernel.encode_frame({"op": "exec", "code": "x" * 100_000})
        socket.send_fds(ours, [frame[:3]], [write_end])
        ours.sendall(frame[3:])
        message, fds = kernel._recv_frame(theirs)
        assert message == {"op": "exec", "code": "x" * 100_000} and len(fds) == 1
        os.write(fds[0], b"!")
        assert os.read(read_end, 1) == b"!"  # the descriptor arrived, and works
        os.close(fds[0])
        ours.close()
        with pytest.raises(EOFError):
            kernel._recv_frame(theirs)
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        theirs.close()


def test_an_oversized_header_is_refused_before_its_body_arrives() -> None:
    reader = kernel.FrameReader(max_size=8)
    reader.feed(kernel.encode_frame({"a": 1}))  # 8 bytes of body: at the limit
    assert list(reader) == [{"a": 1}]
    reader.feed(kernel.HEADER.pack(9))
    with pytest.raises(kernel.FrameTooLarge):
        next(reader)
    with pytest.raises(kernel.FrameTooLarge):  # it stays: the stream cannot go on
        next(reader)
    unlimited = kernel.FrameReader()
    unlimited.feed(kernel.HEADER.pack(1 << 30))
    assert list(unlimited) == []  # without a limit: waiting for the body


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"42", b"null"],
    ids=["not-json", "not-utf8", "array", "string", "number", "null"],
)
def test_a_body_that_is_not_a_json_object_is_an_error_and_the_stream_goes_on(body: bytes) -> None:
    reader = kernel.FrameReader()
    reader.feed(kernel.HEADER.pack(len(body)) + body + kernel.encode_frame({"id": 2}))
    with pytest.raises(kernel.FrameError) as raised:
        next(reader)
    assert not isinstance(raised.value, kernel.FrameTooLarge)
    assert isinstance(raised.value, ValueError)  # what the client catches
    assert list(reader) == [{"id": 2}]


def test_a_malformed_frame_is_reported_as_json_reports_it() -> None:
    reader = kernel.FrameReader()
    reader.feed(kernel.HEADER.pack(9) + b"{not json")
    with pytest.raises(kernel.FrameError, match=r"^Expecting property name enclosed in double quotes"):
        next(reader)


def test_an_empty_feed_or_a_partial_header_yields_nothing() -> None:
    reader = kernel.FrameReader()
    reader.feed(b"")
    reader.feed(kernel.HEADER.pack(2)[:3])
    assert list(reader) == []
    reader.feed(kernel.HEADER.pack(2)[3:] + b"{}")
    assert list(reader) == [{}]


class ScriptedTransport:
    """The kernel's side of a client's channel, as a list of chunks it sends."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent: list[bytes] = []

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        return self.chunks.pop(0) if self.chunks else b""

    async def write(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self) -> None:
        self.chunks.clear()


async def test_the_client_reads_split_frames_and_fails_on_a_malformed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ready = kernel.encode_frame({"event": "ready", "protocol": kernel.PROTOCOL_VERSION})
    transport = ScriptedTransport([ready[:2], ready[2:7], ready[7:], kernel.HEADER.pack(3) + b"[1]"])
    client = KernelClient(transport, name="scripted")
    assert (await client.wait_ready(5))["event"] == "ready"
    with caplog.at_level(logging.WARNING, logger="critloop.sandbox"):
        await asyncio.wait_for(client._reader, 5)
    assert not client.alive
    assert "sandbox kernel scripted channel failed: frame body is a JSON list" in caplog.text


# --------------------------------------------------------------------------- the kernel, raw


def test_ping_reports_the_kernel(wire: Wire) -> None:
    reply = wire.call(op="ping")
    assert reply["ok"] and reply["protocol"] == kernel.PROTOCOL_VERSION
    assert set(reply["modules"]) == {"math", "numpy", "sympy"}
    assert reply["sessions"] == []


def test_malformed_requests_get_errors_and_the_kernel_goes_on(wire: Wire) -> None:
    wire.send_raw(b"{not json")
    assert wire.recv() == {"id": None, "ok": False, "error": "request is not a JSON object"}
    wire.send_raw(b"[1, 2]")
    assert wire.recv()["error"] == "request is not a JSON object"
    assert wire.call(op="teleport")["error"] == "ValueError: unknown op 'teleport'"
    assert "no session 'ghost'" in wire.call(op="exec", session="ghost", code="1")["error"]
    assert wire.call(op="open", session="a/b")["error"] == "ValueError: invalid session id 'a/b'"
    assert wire.call(op="open", session="s")["ok"]
    assert wire.call(op="open", session="s")["error"] == "ValueError: session 's' exists already"
    assert wire.call(op="exec", session="s", code=42)["error"] == "TypeError: code must be a string"
    assert wire.call(op="exec", session="s", code="print('fine')")["result"]["stdout"] == "fine\n"


def test_an_oversized_request_is_fatal() -> None:
    w = Wire()
    assert w.recv()["event"] == "ready"
    assert w.proc.stdin is not None
    w.proc.stdin.write(kernel.HEADER.pack(kernel._MAX_REQUEST_BYTES + 1))  # the body never comes
    w.proc.stdin.flush()
    assert w.recv() == {"event": "fatal", "error": "request frame too large"}
    assert w.proc.wait(timeout=10) == 0


def test_a_busy_session_refuses_a_second_request(wire: Wire) -> None:
    wire.call(op="open", session="s")
    wire.send_raw(
        json.dumps({"id": 100, "op": "exec", "session": "s", "code": "import time\ntime.sleep(0.3)"}).encode()
    )
    wire.send_raw(json.dumps({"id": 101, "op": "exec", "session": "s", "code": "1"}).encode())
    replies = {r["id"]: r for r in (wire.recv(), wire.recv())}
    assert replies[101] == {"id": 101, "ok": False, "error": "RuntimeError: session 's' is busy"}
    assert replies[100]["result"]["status"] == "ok"


def test_protocol_frames_printed_by_user_code_stay_output(wire: Wire) -> None:
    wire.call(op="open", session="s")
    forged = json.dumps({"id": 999, "ok": True, "result": {"status": "ok"}}).encode()
    code = f"import os, struct\nbody = {forged!r}\n_ = os.write(1, struct.pack('>I', len(body)) + body)"
    reply = wire.call(op="exec", session="s", code=code)
    assert reply["id"] == wire.next_id
    assert reply["result"]["stdout"].endswith(forged.decode())


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfd", "polling"])
def test_waiting_for_killed_processes_ends_at_their_exit(
    pidfds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfds:
        monkeypatch.delattr(kernel.os, "pidfd_open")  # a kernel before Linux 5.3
    live = subprocess.Popen(["sleep", "60"])
    killed = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        for proc in killed:
            proc.kill()  # zombies until reaped: they count as gone
        started = time.monotonic()
        kernel._wait_gone({p.pid for p in killed}, 5.0)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        kernel._wait_gone({live.pid}, 0.2)  # a live process: the wait ends at the timeout
        assert 0.2 <= time.monotonic() - started < 1.0
    finally:
        live.kill()
        for proc in [live, *killed]:
            proc.wait()


@pytest.mark.parametrize("children_files", [True, False], ids=["children-files", "proc-scan"])
def test_the_tree_walk_finds_descendants_and_steps_around_kept_ones(
    children_files: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "_HAS_CHILDREN_FILES", children_files and kernel._HAS_CHILDREN_FILES)
    # root -> middle -> a, b -> b1: the kept b and everything below it stay out of the walk.
    script = "sleep 60 & a=$!; (sleep 60 & wait) & b=$!; echo $a $b; wait"
    root = subprocess.Popen(["sh", "-c", f"(sh -c '{script}') & echo $!; wait"], stdout=subprocess.PIPE)
    try:
        assert root.stdout is not None
        middle = int(root.stdout.readline())
        a, b = (int(x) for x in root.stdout.readline().split())
        deadline = time.monotonic() + 5
        while len(kernel._descendants(root.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        everything = kernel._descendants(root.pid)
        assert {middle, a, b} <= set(everything) and len(everything) == 4
        kept = kernel._descendants(root.pid, frozenset({b}))
        assert set(kept) == {middle, a}
    finally:
        kernel._kill_tree(root.pid)
        root.wait()


# --------------------------------------------------------------------------- the worker's seccomp filter

_FILTER_PROBE = """
import ctypes, errno, json, os, subprocess, sys, threading
from critloop.sandbox import kernel
assert kernel._install_seccomp()
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(fn, *args):
    result = fn(*args)
    return [result, errno.errorcode.get(ctypes.get_errno()) if result == -1 else None]
out = {
    "unshare_user": call(libc.unshare, 0x10000000),
    "unshare_net": call(libc.unshare, 0x40000000),
    "setns": call(libc.setns, 0, 0),
    "mount": call(libc.mount, b"none", b"/", b"tmpfs", 0, None),
    "clone3": call(libc.syscall, 435, None, 0),
    "open_tree": call(libc.syscall, 428, -100, b"/", 0),
}
box = []
thread = threading.Thread(target=lambda: box.append(1))
thread.start()
thread.join()
out["thread"] = box
out["subprocess"] = subprocess.run(["true"]).returncode
pid = os.fork()
if pid == 0:
    os._exit(3)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(out))
"""


def test_the_worker_filter_refuses_namespaces_and_mounts_and_keeps_threads_and_forks() -> None:
    """The worker's seccomp filter (installed here in a child interpreter): new namespaces, setns
    and the mount calls fail with EPERM, clone3 with ENOSYS (libc then falls back to clone);
    threads, subprocesses and forks still work."""
    import platform

    if platform.machine() not in kernel._AUDIT_ARCH:
        pytest.skip(f"machine limit: no filter for {platform.machine()}")
    done = subprocess.run([sys.executable, "-c", _FILTER_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for name in ("unshare_user", "unshare_net", "setns", "mount", "open_tree"):
        assert out[name] == [-1, "EPERM"], (name, out)
    assert out["clone3"] == [-1, "ENOSYS"]
    assert out["thread"] == [1] and out["subprocess"] == 0 and out["fork"] == 3


def test_the_filter_program_jumps_stay_inside_it() -> None:
    """Every jump of the program lands on one of its rows, on both architectures."""
    for machine in kernel._AUDIT_ARCH:
        program = kernel._seccomp_program(machine)
        assert program is not None
        for index, (code, jt, jf, _k) in enumerate(program):
            if code & 0x07 == 0x05:  # a jump
                assert index + 1 + max(jt, jf) < len(program), (machine, index)
            assert 0 <= jt < 256 and 0 <= jf < 256
        assert program[-1][0] == 0x06  # the program ends in a return
    assert kernel._seccomp_program("sparc") is None
