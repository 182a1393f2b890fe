"""`critloop sandbox ...` as a user runs it, against the real engine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from critloop.sandbox.docker_backend import LABEL
from critloop.sandbox.image import image_tag

CRITLOOP = str(Path(sys.executable).with_name("critloop"))


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CRITLOOP, *args], capture_output=True, text=True, env=env, input=stdin, timeout=120, check=False
    )


def our_containers() -> list:
    import docker

    return docker.from_env().containers.list(all=True, filters={"label": LABEL})


@pytest.mark.docker
def test_status_reports_engine_and_image() -> None:
    done = run("sandbox", "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["engine"]["reachable"] is True
    assert report["image"] == {**report["image"], "name": image_tag(), "present": True}


def test_status_fails_when_no_engine_answers(tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    done = run("sandbox", "status", env=env)
    assert done.returncode == 1
    assert "unreachable" in done.stdout


@pytest.mark.docker
def test_exec_runs_code_in_docker() -> None:
    done = run(
        "sandbox", "exec", "import os\nprint(os.getuid() >= 1 << 20, open('/etc/hostname').read().strip())"
    )
    assert (done.returncode, done.stdout) == (0, "True sandbox\n"), done.stderr


def test_exec_reads_stdin_and_reports_failure_with_exit_1() -> None:
    done = run("sandbox", "exec", "--backend", "local", "--json", stdin="print('partial')\n1/0\n")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert (result["status"], result["stdout"]) == ("error", "partial\n")
    assert "not isolation" in done.stderr


def test_exec_rejects_a_bad_backend_name() -> None:
    done = run("sandbox", "exec", "--backend", "podman", "print(1)")
    assert done.returncode == 2
    assert "--backend must be auto, docker or local" in done.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_clean_removes_orphans_only() -> None:
    import docker

    client = docker.from_env()
    dead = subprocess.Popen(["true"])
    dead.wait()
    labels = {
        LABEL: "1",
        "io.critloop.owner.host": socket.gethostname(),
        "io.critloop.owner.pid": str(dead.pid),
        "io.critloop.owner.start": "1",
    }
    orphan = client.containers.create(
        image_tag(),
        entrypoint=["sleep", "600"],
        labels=labels,
        network_mode="none",
        name=f"critloop-test-orphan-{os.getpid()}",
    )
    try:
        status = json.loads(run("sandbox", "status", "--json").stdout)
        assert {"name": orphan.name, "orphan": True}.items() <= next(
            c for c in status["containers"] if c["name"] == orphan.name
        ).items()
        done = run("sandbox", "clean")
        assert done.returncode == 0, done.stderr
        assert orphan.name not in [c.name for c in our_containers()]
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            orphan.remove(force=True)


@pytest.mark.slow
@pytest.mark.docker
def test_a_killed_owner_leaves_no_container_behind(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(
        "import asyncio\n"
        "from critloop.sandbox import SandboxConfig, SandboxPool\n"
        "async def main():\n"
        "    pool = await SandboxPool(SandboxConfig(backend='docker', pool_size=2)).start()\n"
        "    s = await pool.open_session()\n"
        "    await s.exec('x = 1')\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
    pid = str(owner.pid)
    assert sum(c.labels.get("io.critloop.owner.pid") == pid for c in our_containers()) == 2
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [c for c in our_containers() if c.labels.get("io.critloop.owner.pid") == pid]
        if not left:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"containers of the killed owner remain: {[c.name for c in left]}")
