"""The Docker pool under load, on the default configuration: 128 concurrent sessions with 3 forks
each. The pool grows to carry them (never past ``max_kernels``), no worker is OOM-killed, every
session finishes, and the kernels' memory stays within ``max_kernels * memory_mb``."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from critloop.sandbox import ExecResult, SandboxConfig, SandboxPool

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SESSIONS = 128
FORKS = 3
EXEC_TIMEOUT = 60.0
"""Per run: 512 workers share two cores here, and this test is about room, not speed (the pool's
own configuration stays the default)."""
SAMPLE_EVERY = 0.1
"""Seconds between two memory samples (each one ``pool.ping()``: a report from every kernel)."""


async def one_run(pool: SandboxPool, i: int) -> list[ExecResult]:
    """A critique chain in small: a session runs sympy, forks three snapshots, each runs more."""
    results = []
    async with await pool.open_session() as session:
        results.append(
            await session.exec(
                f"import sympy\nx = sympy.factor(sympy.Symbol('x')**{i % 9 + 2} - 1)\nx", timeout=EXEC_TIMEOUT
            )
        )
        forks = [await session.fork() for _ in range(FORKS)]
        try:
            results += await asyncio.gather(
                *(
                    fork.exec(f"y = sympy.expand(x * (x + {k}))\nlen(str(y))", timeout=EXEC_TIMEOUT)
                    for k, fork in enumerate(forks)
                )
            )
        finally:
            await asyncio.gather(*(fork.close() for fork in forks))
    return results


async def test_128_sessions_with_3_forks_each_fit_the_default_pool() -> None:
    config = SandboxConfig(backend="docker")
    cap = config.max_kernels * config.memory_mb << 20
    samples: list[list[dict[str, int] | None]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append([reply.get("memory") for reply in await pool.ping()])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), SAMPLE_EVERY)

    async with SandboxPool(config) as pool:
        began = time.monotonic()
        sampler = asyncio.create_task(sample())
        try:
            runs = await asyncio.wait_for(asyncio.gather(*(one_run(pool, i) for i in range(SESSIONS))), 170)
        finally:
            done.set()
            await sampler
        wall = time.monotonic() - began
        status = pool.status()

    results = [result for run in runs for result in run]
    assert len(results) == SESSIONS * (1 + FORKS)
    killed = [r for r in results if r.status == "killed"]
    oom = [r for r in killed if r.error and ("SIGKILL" in r.error or "out of memory" in r.error)]
    assert not oom, f"{len(oom)} workers OOM-killed, e.g. {oom[0].error}"
    assert not killed, f"{len(killed)} runs killed, e.g. {killed[0].error}"
    assert all(r.ok for r in results), [r.text() for r in results if not r.ok][:3]
    assert status.kernels_replaced == 0 and status.sessions == 0
    assert status.peak_kernels <= config.max_kernels

    # The kernels report their memory with every ping: a sample without reports proves nothing.
    reports = [[m for m in sample if m is not None] for sample in samples]
    assert samples and all(len(r) == len(s) for r, s in zip(reports, samples, strict=True)), (
        "the kernels sent no memory report"
    )
    peak = max(sum(m["used"] for m in sample) for sample in reports)
    fullest = max(m["used"] / m["limit"] for sample in reports for m in sample)
    assert peak <= cap and fullest < 1
    print(
        f"\n{SESSIONS} sessions x {FORKS} forks: {wall:.1f}s, peak kernels {status.peak_kernels} "
        f"(started {status.kernels_started}), peak memory {peak / (1 << 20):.0f} MiB of {cap >> 20} MiB, "
        f"fullest kernel {fullest:.0%} of its limit ({len(samples)} samples)"
    )
