"""Shared fixtures: sandbox pools on the real Docker engine and on the local backend."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from critloop.sandbox import SandboxConfig, SandboxPool

pytest_plugins = ["model_fixtures"]

REQUIRE_DOCKER = os.environ.get("CRITLOOP_REQUIRE_DOCKER") == "1"


def docker_problem() -> str | None:
    """Why Docker tests cannot run here, or None when the engine answers and the image exists."""
    try:
        import docker

        from critloop.sandbox.image import image_tag

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no engine
        return f"no Docker engine answers: {exc}"
    try:
        client.images.get(image_tag())
    except Exception:  # noqa: BLE001
        return f"sandbox image {image_tag()} is missing: run `critloop sandbox build`"
    return None


def require_docker() -> None:
    """Skip (or, under CRITLOOP_REQUIRE_DOCKER=1, fail) when Docker cannot run the tests."""
    problem = docker_problem()
    if problem is not None:
        if REQUIRE_DOCKER:
            pytest.fail(f"CRITLOOP_REQUIRE_DOCKER=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
async def docker_pool() -> AsyncIterator[SandboxPool]:
    require_docker()
    pool = SandboxPool(SandboxConfig(backend="docker", pool_size=2, timeout_seconds=5))
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def local_pool() -> AsyncIterator[SandboxPool]:
    pool = SandboxPool(SandboxConfig(backend="local", pool_size=2, timeout_seconds=5))
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture(params=["local", "docker"])
def pool(request: pytest.FixtureRequest) -> SandboxPool:
    """The protocol suite runs on both backends."""
    if request.param == "docker":
        require_docker()
    return request.getfixturevalue(f"{request.param}_pool")
