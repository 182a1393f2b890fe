"""The local backend under bubblewrap: no network, a read-only host, a private /tmp."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from skip_policy import MACHINE_LIMIT

from critloop.errors import SandboxUnavailableError
from critloop.sandbox import SandboxConfig, SandboxPool
from critloop.sandbox.local_backend import LocalBackend, _bubblewrap_works

# Not installed is an install step missing (CI installs bubblewrap); installed but unable to make
# its namespaces is the machine's kernel, which no install step changes.
pytestmark = [
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="bwrap is not installed (apt-get install bubblewrap)"
    ),
    pytest.mark.skipif(
        shutil.which("bwrap") is not None and not _bubblewrap_works(),
        reason=f"{MACHINE_LIMIT}bwrap cannot create its namespaces here (no unprivileged user namespaces)",
    ),
]


async def test_bubblewrap_confines_the_local_kernel() -> None:
    async with SandboxPool(SandboxConfig(backend="local", local_bubblewrap="on", pool_size=1)) as pool:
        assert pool.backend.describe()["bubblewrap"] is True
        async with await pool.open_session() as session:
            # A host file in /tmp: the sandbox has a /tmp of its own, so it must not see it.
            marker = Path(tempfile.gettempdir(), f"critloop-bwrap-marker-{uuid.uuid4().hex}")
            marker.write_text("host")
            # A host path outside /tmp (inside, /tmp is the sandbox's own): this test's folder.
            target = Path(__file__).with_name(f"escape-{uuid.uuid4().hex}.txt")
            escape = str(target)
            code = (
                "import os, socket\n"
                "def errno_of(action):\n"
                "    try:\n        action()\n    except OSError as e:\n        return e.errno\n"
                "print(errno_of(lambda: socket.create_connection(('1.1.1.1', 53), timeout=2)))\n"
                f"print(errno_of(lambda: open({escape!r}, 'w')))\n"
                f"print(os.path.exists({str(marker)!r}))\n"
                "print(sum(1 for p in os.listdir('/proc') if p.isdigit()) < 10)"
            )
            result = await session.exec(code)
    lines = result.stdout.splitlines()
    assert lines[:2] == ["101", "30"], result  # ENETUNREACH, EROFS
    assert lines[2] == "False"  # a private /tmp
    marker.unlink()
    assert lines[3] == "True"  # its own pid namespace
    assert not target.exists()


async def test_without_bubblewrap_the_local_backend_is_a_plain_subprocess(tmp_path: Path) -> None:
    async with SandboxPool(SandboxConfig(backend="local", local_bubblewrap="off", pool_size=1)) as pool:
        assert pool.backend.describe()["bubblewrap"] is False
        async with await pool.open_session() as session:
            await session.exec(f"open({str(tmp_path / 'written.txt')!r}, 'w').write('x')")
    assert (tmp_path / "written.txt").read_text() == "x"  # not isolation, as the warning says


def test_asking_for_bubblewrap_where_it_cannot_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import critloop.sandbox.local_backend as local

    monkeypatch.setattr(local, "_bwrap_ok", False)
    with pytest.raises(SandboxUnavailableError, match="bwrap"):
        LocalBackend(SandboxConfig(backend="local", local_bubblewrap="on"))
