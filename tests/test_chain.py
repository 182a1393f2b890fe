"""A critique chain's sandbox sessions on the local backend: lazy opening, lazy snapshots, rewinds
and clean-up."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from critloop.agent._chain import Chain
from critloop.agent.critic import ChainCritique
from critloop.sandbox import SandboxPool, Session

CRITIQUE = ChainCritique(
    text="a critique", verdict="yes", reward=1.0, reward_source="hard_label", forced=False
)


@pytest.fixture
async def chain(local_pool: SandboxPool) -> AsyncIterator[Chain]:
    """A chain, closed after the test (whatever it left open)."""
    assert local_pool.status().sessions == 0
    chain = Chain()
    yield chain
    await chain.close()
    await local_pool.settle()


async def run_step(chain: Chain, code: str | None) -> None:
    """One critiqued step, as a critique run records it: its code (if any) runs in the working
    session, then the critique and the snapshot after the step are kept."""
    if code is not None:
        result = await (await chain.before_exec()).exec(code)
        assert result.status == "ok", result
    chain.critiques.append(CRITIQUE)
    chain.snapshot()


async def keep_snapshots_through(chain: Chain, pool: SandboxPool, *codes: str | None) -> None:
    """Open the chain's session and critique steps with ``codes`` (None: a step without code),
    keeping snapshots as a critique run does (the state after no step is a fresh session's)."""
    chain.snapshots.append(None)
    chain.open(pool)
    for code in codes:
        await run_step(chain, code)


async def defined(session: Session) -> list[str]:
    """Which of the variables the steps' code defines exist in ``session``."""
    result = await session.exec("print(' '.join(n for n in ('a', 'b', 'c') if n in globals()))")
    return result.stdout.split()


async def test_the_session_opens_in_the_background_until_code_needs_it(
    chain: Chain, local_pool: SandboxPool
) -> None:
    assert not chain.has_sandbox
    chain.open(local_pool)
    assert chain.has_sandbox and chain.session is None
    session = await chain.before_exec()
    assert chain.opening is None and chain.session is not None and chain.session.id == session.id
    assert (await session.exec("print(6 * 7)")).stdout.strip() == "42"
    assert local_pool.status().sessions == 1


async def test_a_snapshot_is_forked_only_before_the_session_next_runs_code(
    chain: Chain, local_pool: SandboxPool
) -> None:
    await keep_snapshots_through(chain, local_pool, "a = 1", None)
    # The working session still holds the states after steps 1 and 2: nothing is forked yet.
    assert chain.unforked == [1, 2] and chain.snapshots == [None, None, None]
    assert local_pool.status().sessions == 1
    await run_step(chain, "b = 2")
    assert chain.unforked == [3]
    forks = chain.snapshots[1:3]
    assert all(isinstance(fork, Session) for fork in forks) and local_pool.status().sessions == 3
    assert [await defined(fork) for fork in forks if fork is not None] == [["a"], ["a"]]


async def test_a_rewind_restores_the_state_after_the_kept_steps(
    chain: Chain, local_pool: SandboxPool
) -> None:
    await keep_snapshots_through(chain, local_pool, "a = 1", "b = 2", "c = 3")
    await chain.rewind(1, local_pool)
    assert chain.critiques == [CRITIQUE] and len(chain.snapshots) == 2
    # The snapshot after step 1 and the working session forked from it: the rest are closed.
    assert local_pool.status().sessions == 2
    assert await defined(await chain.before_exec()) == ["a"]
    # The working session's code does not reach the snapshot: a second rewind finds it intact.
    await (await chain.before_exec()).exec("b = 5")
    chain.critiques.append(CRITIQUE)
    await chain.rewind(1, local_pool)
    assert await defined(await chain.before_exec()) == ["a"]


async def test_a_rewind_to_an_unforked_step_keeps_the_working_session(
    chain: Chain, local_pool: SandboxPool
) -> None:
    await keep_snapshots_through(chain, local_pool, "a = 1", None)
    working = chain.session
    await chain.rewind(1, local_pool)
    assert chain.session is working and chain.unforked == [1] and len(chain.snapshots) == 2
    assert local_pool.status().sessions == 1
    assert await defined(await chain.before_exec()) == ["a"]


async def test_a_rewind_to_a_state_without_a_fork_opens_a_fresh_session(
    chain: Chain, local_pool: SandboxPool
) -> None:
    await keep_snapshots_through(chain, local_pool, "a = 1", "b = 2")
    await chain.rewind(0, local_pool)
    assert chain.critiques == [] and chain.snapshots == [None]
    assert local_pool.status().sessions == 1
    assert await defined(await chain.before_exec()) == []


async def test_without_snapshots_a_rewind_closes_the_session(chain: Chain, local_pool: SandboxPool) -> None:
    # A run that keeps no snapshots opens a fresh session for the next critique itself.
    chain.open(local_pool)
    for code in ("a = 1", "b = 2"):
        await (await chain.before_exec()).exec(code)
        chain.critiques.append(CRITIQUE)
    await chain.rewind(1, local_pool)
    assert chain.critiques == [CRITIQUE] and not chain.has_sandbox
    assert local_pool.status().sessions == 0


async def test_close_closes_every_session(chain: Chain, local_pool: SandboxPool) -> None:
    await keep_snapshots_through(chain, local_pool, "a = 1", "b = 2")
    sessions = [chain.session, *chain.snapshots]
    assert local_pool.status().sessions == 2
    await chain.close()
    assert all(session is None or session.closed for session in sessions)
    assert not chain.has_sandbox and local_pool.status().sessions == 0


async def test_close_waits_for_a_session_still_opening(chain: Chain, local_pool: SandboxPool) -> None:
    chain.open(local_pool)
    opening = chain.opening
    assert opening is not None
    await chain.close()
    assert opening.result().closed and local_pool.status().sessions == 0


async def test_release_closes_every_session_at_once(chain: Chain, local_pool: SandboxPool) -> None:
    await keep_snapshots_through(chain, local_pool, "a = 1", "b = 2")
    sessions = [chain.session, *chain.snapshots]
    chain.release()
    assert all(session is None or session.closed for session in sessions)
    assert not chain.has_sandbox and local_pool.status().sessions == 0
    await local_pool.settle()


async def test_release_closes_a_session_still_opening_when_it_arrives(
    chain: Chain, local_pool: SandboxPool
) -> None:
    chain.open(local_pool)
    opening = chain.opening
    assert opening is not None
    chain.release()
    assert not chain.has_sandbox
    # The release was the first to wait on the opening: it has run by the time this await returns.
    session = await opening
    assert session.closed and local_pool.status().sessions == 0
    await local_pool.settle()
