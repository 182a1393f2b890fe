"""One critique chain of a critique run: its history of critiques and its sandbox sessions.

A chain's working session is where the critic's code of the current step runs. Snapshots keep
the session's state after earlier steps, so that a re-critique from a changed step goes on from
the state after the unchanged prefix (:meth:`Chain.rewind`) instead of from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from critloop.sandbox import SandboxPool, Session

if TYPE_CHECKING:
    from critloop.agent._critique import ChainCritique, StepCritique

__all__ = ["Chain"]


class Chain:
    """One critique chain of a run: its history of critiques and its sandbox sessions."""

    def __init__(self) -> None:
        self.critiques: list[ChainCritique] = []
        self.draft: StepCritique | None = None
        """The critique of the next step as a lower tier of the cascade left it."""
        self.session: Session | None = None
        # A session still opening: it opens while the first analysis is generated, off the
        # critical path, and is awaited only when the critique first runs code.
        self.opening: asyncio.Task[Session] | None = None
        # snapshots[j]: a fork of the session's state after j steps; None at j = 0 (a fresh
        # session opens instead: cheaper than a fork) and after a step no rewind can target
        # (a fresh session then stands in). Forks are what a batch's sandbox spends most on,
        # so they are taken lazily: ``unforked`` holds the indices of snapshots the working
        # session itself still stands for (it has run no code since), forked only before the
        # session next runs code: never after the last step, nor for steps without code.
        self.snapshots: list[Session | None] = []
        self.unforked: list[int] = []

    @property
    def has_sandbox(self) -> bool:
        """Whether the chain has a working session (open, or still opening)."""
        return self.session is not None or self.opening is not None

    def open(self, sandbox: SandboxPool) -> None:
        """Start opening the working session in the background (:meth:`ready` awaits it)."""
        self.opening = asyncio.create_task(sandbox.open_session())

    async def ready(self) -> Session:
        """The working session, once it has opened."""
        if self.opening is not None:
            task, self.opening = self.opening, None
            self.session = await task
        assert self.session is not None
        return self.session

    def snapshot(self) -> None:
        """Mark the working session's current state as the state after the latest step."""
        self.unforked.append(len(self.snapshots))
        self.snapshots.append(None)

    async def before_exec(self) -> Session:
        """The working session, once the snapshot it still stands for (if any) is forked."""
        session = await self.ready()
        while self.unforked:
            self.snapshots[self.unforked[0]] = await session.fork()
            del self.unforked[0]
        return session

    async def rewind(self, keep: int, sandbox: SandboxPool | None) -> None:
        """Forget everything after ``keep`` steps; the working session restarts from there.

        Args:
            keep: how many steps' critiques (and sandbox state) to keep.
            sandbox: where a fresh session opens when no fork holds the state after ``keep``
                steps; None leaves the chain without a session.
        """
        del self.critiques[keep:]
        self.draft = None
        if keep in self.unforked:
            # The working session has run no code since that step: it is the state wanted.
            del self.snapshots[keep + 1 :]
            self.unforked = [j for j in self.unforked if j <= keep]
            return
        self.unforked = []
        if self.opening is not None:
            await self.ready()
        if self.session is not None:
            await self.session.close()
            self.session = None
        if keep < len(self.snapshots):
            for snapshot in self.snapshots[keep + 1 :]:
                if snapshot is not None:
                    await snapshot.close()
            del self.snapshots[keep + 1 :]
            base = self.snapshots[keep]
            if base is not None:
                self.session = await base.fork()
            elif sandbox is not None:
                self.session = await sandbox.open_session()

    async def close(self) -> None:
        """Close every session of the chain (a session still opening once it has opened)."""
        if self.opening is not None:
            with contextlib.suppress(Exception):
                await self.ready()
        for session in [self.session, *self.snapshots]:
            if session is not None:
                await session.close()
        self.session, self.snapshots, self.unforked = None, [], []

    def release(self) -> None:
        """Close without waiting (:meth:`Session.release`); a session still opening is
        released when it arrives."""
        if self.opening is not None:
            self.opening.add_done_callback(_release_opened)
            self.opening = None
        for session in [self.session, *self.snapshots]:
            if session is not None:
                session.release()
        self.session, self.snapshots, self.unforked = None, [], []


def _release_opened(task: asyncio.Task[Session]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().release()
