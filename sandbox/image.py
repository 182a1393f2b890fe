"""The sandbox image: its tag, and the two routes that build it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Literal

from critloop.errors import SandboxImageError

__all__ = ["BuildRoute", "IMAGE_REPOSITORY", "OFFLINE_BASE", "ONLINE_BASE", "build_image", "image_tag"]

BuildRoute = Literal["auto", "dockerfile", "debootstrap"]
"""``dockerfile``: pull ``python:3.12-slim`` and pip-install sympy and numpy. ``debootstrap``:
build a minimal Debian rootfs offline and ``docker import`` it. ``auto``: the first that works."""

IMAGE_REPOSITORY = "critloop-sandbox"
ONLINE_BASE = "python:3.12-slim"
OFFLINE_BASE = "critloop-sandbox-base:bookworm"
_FILES = ("Dockerfile", "kernel.py")


def _source(name: str) -> bytes:
    package = resources.files("critloop.sandbox")
    path = package / "kernel.py" if name == "kernel.py" else package / "image" / name
    return path.read_bytes()


def image_tag() -> str:
    """The image this version of critloop runs: tagged by a hash of the kernel and Dockerfile,
    so a changed kernel never runs against a stale image."""
    digest = hashlib.sha256()
    for name in _FILES:
        digest.update(_source(name))
    return f"{IMAGE_REPOSITORY}:k{digest.hexdigest()[:12]}"


def build_image(
    client: object,
    *,
    route: BuildRoute = "auto",
    force: bool = False,
    progress: Callable[[str], None] = lambda _line: None,
) -> str:
    """Build the sandbox image (if missing or ``force``) and return its tag.

    Args:
        client: a ``docker.DockerClient``.
        route: which route to take (see :data:`BuildRoute`).
        force: rebuild even when the image exists (the offline base is rebuilt too).
        progress: called with one line of text per step.
    """
    import docker

    assert isinstance(client, docker.DockerClient)
    tag = image_tag()
    if not force and _exists(client, tag):
        progress(f"image {tag} is present")
        return tag
    base = _base_image(client, route, force, progress)
    with tempfile.TemporaryDirectory(prefix="critloop-image-") as context:
        for name in _FILES:
            Path(context, name).write_bytes(_source(name))
        progress(f"building {tag} from {base}")
        try:
            client.images.build(
                path=context, tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True, pull=False
            )
        except docker.errors.DockerException as exc:
            raise SandboxImageError(f"building the sandbox image {tag} failed: {exc}") from exc
    progress(f"built {tag}")
    return tag


def _exists(client, name: str) -> bool:
    import docker

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _base_image(client, route: BuildRoute, force: bool, progress: Callable[[str], None]) -> str:
    import docker

    if route in ("auto", "debootstrap") and not force and _exists(client, OFFLINE_BASE):
        return OFFLINE_BASE
    if route in ("auto", "dockerfile"):
        try:
            progress(f"pulling {ONLINE_BASE}")
            client.images.pull(ONLINE_BASE)
            return ONLINE_BASE
        except docker.errors.DockerException as exc:
            if route == "dockerfile":
                raise SandboxImageError(f"cannot pull {ONLINE_BASE}: {exc}") from exc
            progress(f"cannot pull {ONLINE_BASE} ({_first_line(exc)}); building offline instead")
    _debootstrap_base(client, progress)
    return OFFLINE_BASE


def _debootstrap_base(client, progress: Callable[[str], None]) -> None:
    if shutil.which("debootstrap") is None:
        raise SandboxImageError(
            "the offline sandbox build needs debootstrap (apt-get install debootstrap), "
            f"or a registry to pull {ONLINE_BASE} from"
        )
    if os.geteuid() != 0:
        raise SandboxImageError("the offline sandbox build (debootstrap) must run as root")
    script = resources.files("critloop.sandbox") / "image" / "build-rootfs.sh"
    with tempfile.TemporaryDirectory(prefix="critloop-rootfs-") as tmp:
        tarball = Path(tmp, "rootfs.tar")
        runnable = Path(tmp, "build-rootfs.sh")
        runnable.write_bytes(script.read_bytes())
        progress("building a minimal Debian bookworm rootfs with debootstrap (about a minute)")
        done = subprocess.run(
            ["sh", str(runnable), str(tarball)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise SandboxImageError(f"debootstrap failed (exit {done.returncode}):\n{tail}")
        progress(f"importing the rootfs as {OFFLINE_BASE}")
        repository, tag = OFFLINE_BASE.split(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
