"""The processes of a benchmark run: its own (SIGTERM), the servers it starts, and their CPU time.

Standard library only: the fake server (``_fake_server.py``), a process of its own, imports it too.
"""

from __future__ import annotations

import os
import signal
import subprocess


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """SIGTERM ends the run as Ctrl-C does: the ``finally`` blocks stop what the run started."""
    signal.signal(signal.SIGTERM, _sigterm)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate ``proc`` if it runs, and kill it if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of another process (Linux ``/proc``), None where unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
