"""The kernel's wire protocol, spoken raw: bad requests get clear errors and never stop it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from critloop.sandbox import kernel

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
