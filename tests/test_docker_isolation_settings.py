"""The containers really carry every isolation setting (read back from the engine)."""

from __future__ import annotations

from critloop.sandbox import SandboxPool
from critloop.sandbox.docker_backend import LABEL


async def test_container_settings(docker_pool: SandboxPool) -> None:
    import docker

    backend = docker_pool.backend
    names = [k.name for k in docker_pool._kernels]
    client = docker.from_env()
    for name in names:
        attrs = client.containers.get(name).attrs
        host, config = attrs["HostConfig"], attrs["Config"]
        cfg = backend.config  # type: ignore[attr-defined]
        assert host["NetworkMode"] == "none"
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        # SYS_ADMIN for the kernel's two mounts at start-up (dropped before its first request);
        # the rest for a uid per session.
        assert sorted(host["CapAdd"]) == ["CHOWN", "KILL", "SETGID", "SETPCAP", "SETUID", "SYS_ADMIN"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["Privileged"] is False
        assert host["PidsLimit"] == cfg.pids_limit
        assert host["Memory"] == host["MemorySwap"] == cfg.memory_mb << 20
        assert host["NanoCpus"] == int(cfg.cpus * 1e9)
        assert host["Init"] is True
        assert host["LogConfig"]["Type"] == "none"
        assert set(host["Tmpfs"]) == {"/work"}  # no shared /tmp: sessions write only to their own dir
        assert host["IpcMode"] == "none"
        slots_mb = cfg.max_sessions_per_kernel * cfg.session_disk_mb
        assert all("noexec" in opts and f"size={slots_mb}m" in opts for opts in host["Tmpfs"].values())
        assert host["Sysctls"] == {
            "kernel.msgmni": "0",
            "kernel.sem": "0 0 0 0",
            "kernel.shmmni": "0",
            "fs.mqueue.queues_max": "0",
        }
        ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
        assert ulimits["core"] == (0, 0)
        assert ulimits["fsize"] == (cfg.max_file_mb << 20,) * 2
        assert ulimits["nofile"][1] <= 4096
        assert not host.get("Binds"), "no host path may be mounted"
        assert all(m["Type"] == "tmpfs" for m in attrs["Mounts"])
        assert config["User"] == "0:0"  # the supervisor; every session runs under a uid of its own
        assert config["Labels"][LABEL] == "1"
        assert config["Env"] and "OMP_NUM_THREADS=1" in config["Env"]


async def test_user_code_sees_the_limits(docker_pool: SandboxPool) -> None:
    async with await docker_pool.open_session() as session:
        result = await session.exec(
            "import os, resource\n"
            "print(os.getuid() == os.getgid() >= 1 << 20, os.getgroups())\n"
            "print(resource.getrlimit(resource.RLIMIT_CORE))\n"
            "status = open('/proc/self/status').read()\n"
            "print([l.split()[1] for l in status.splitlines() if l.startswith(('CapEff', 'NoNewPrivs'))])\n"
            "print(sorted(os.listdir('/sys/class/net')))"
        )
        assert result.stdout == "True []\n(0, 0)\n['0000000000000000', '1']\n['lo']\n"
