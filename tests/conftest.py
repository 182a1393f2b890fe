"""Shared fixtures (sandbox pools on the real Docker engine and on the local backend) and the
markers that follow from them. CI's rule on skips is the plugin ``skip_policy``."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import pytest

from critloop.sandbox import SandboxConfig, SandboxPool

pytest_plugins = ["model_fixtures", "skip_policy"]

# A test that requests one of these fixtures uses that real component, and is marked for it.
REAL_MODEL_FIXTURES = frozenset(
    {"embedded", "engine", "embedded_template", "llama_process", "llama_server", "llama_client"}
)
DOCKER_FIXTURES = frozenset({"docker_pool", "hostile_pool"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real components they use: ``model`` (and ``slow``), ``docker``."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        on_docker = callspec is not None and callspec.params.get("backend_pool") == "docker"
        if names & REAL_MODEL_FIXTURES and item.get_closest_marker("model") is None:
            item.add_marker(pytest.mark.model)
        if item.get_closest_marker("model") is not None:
            item.add_marker(pytest.mark.slow)
        if names & DOCKER_FIXTURES or on_docker:
            item.add_marker(pytest.mark.docker)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("docker") is not None:
        require_docker()


@functools.cache
def docker_problem() -> str | None:
    """Why Docker tests cannot run here, or None when the engine answers and the image exists
    (asked once per session: every Docker test checks it at set-up)."""
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
    """Skip when Docker cannot run the tests (a failure in CI, which starts the engine)."""
    problem = docker_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture(scope="session")
async def docker_pool() -> AsyncIterator[SandboxPool]:
    require_docker()
    pool = SandboxPool(SandboxConfig(backend="docker", pool_size=2, timeout_seconds=5))
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def local_pool() -> AsyncIterator[SandboxPool]:
    """A local-backend pool per test module: a module's leftovers never reach the next one."""
    pool = SandboxPool(SandboxConfig(backend="local", pool_size=2, timeout_seconds=5))
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture(params=["local", "docker"])
def backend_pool(request: pytest.FixtureRequest) -> SandboxPool:
    """The session pool of each backend in turn: the protocol suite runs on both."""
    return request.getfixturevalue(f"{request.param}_pool")
