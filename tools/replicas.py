"""Several replicas of one model behind one :class:`~critloop.tools.completion.CompletionModel`.

A role served by several vLLM replicas lists their URLs (``base_url = [A, B]``). The router sends
each request to one replica:

* ``sticky`` (default): to the replica that served the longest known prefix of this prompt,
  when the prompt extends an earlier prompt or shares at least half of itself with one, so that
  the replica's prefix cache already holds it. A critique chain's next prompt extends its
  previous one, and a solution's chains send the same first prompt, so a chain, and mostly a
  whole solution, stays on one replica. A prompt that shares little with what was sent before,
  or whose replica has many more requests in flight than the least busy one, goes to the
  replica with the fewest requests in flight.
* ``round_robin``: each request to the next replica in turn (what a generic load balancer does).

A replica that fails with :class:`~critloop.errors.ModelUnavailableError` (unreachable, or
failing after its own retries) is set aside and the request goes to another; the replica
returns once a health check (``GET /models``) answers, tried after ``health_interval_seconds``
and then at doubling intervals. A request fails only when every replica failed it.

Example:
    >>> from critloop.tools.openai_client import OpenAICompletionModel
    >>> urls = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    >>> router = ReplicaRouter([OpenAICompletionModel(u, "GenPRM/GenPRM-7B") for u in urls])
    >>> [s.name for s in router.status()]  # doctest: +SKIP
    ['http://127.0.0.1:8001/v1', 'http://127.0.0.1:8002/v1']
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from critloop.errors import ConfigError, ModelUnavailableError
from critloop.tools.completion import CompletionModel, CompletionResult, SamplingParams

__all__ = ["ReplicaRouter", "ReplicaStatus", "Routing"]

Routing = Literal["sticky", "round_robin"]
"""How a role's requests spread over its replicas (see :mod:`critloop.tools.replicas`)."""

_BLOCK = 128
"""Characters per prefix block: prompts are matched block by block (chained hashes)."""
_MIN_MATCH = 0.5
"""A prompt that extends no earlier prompt sticks to a replica only when the prefix it served
covers at least this share of it (a shared system prompt alone must not pull every new solution
onto one replica)."""
_SLACK = 16
"""A prompt leaves its replica when that one has this many more requests in flight than the
least busy healthy one."""
_MAX_BLOCKS = 1 << 16
"""Prefix blocks remembered, least recently used forgotten first: 8 MB of prompt text, for about
8 MB of memory (64 chains in flight with 20,000-character prompts need a sixth of it)."""


@dataclass(frozen=True, kw_only=True)
class ReplicaStatus:
    """One replica as the router sees it."""

    name: str
    healthy: bool
    """False while it is set aside after a failure."""
    outstanding: int
    """Requests in flight on it now."""
    requests: int
    """Requests sent to it, failed ones included."""
    sticky: int
    """Of those, the ones sent to it because it had served their prefix."""
    failures: int


class _Replica:
    def __init__(self, model: CompletionModel) -> None:
        self.model = model
        self.outstanding = 0
        self.requests = 0
        self.sticky = 0
        self.failures = 0
        self.down_until: float | None = None
        """Set aside until then (monotonic time), after a failure; None when healthy."""
        self.backoff = 0.0
        self.probe: asyncio.Task[None] | None = None


class ReplicaRouter:
    """One model served by several replicas, as one :class:`CompletionModel`.

    Args:
        replicas: the replicas' models (usually one :class:`OpenAICompletionModel` per server).
        routing: ``sticky`` (prefix-cache aware) or ``round_robin``.
        health_interval_seconds: how long a failed replica waits before its first health check.
        name: what to call the router in logs and reports (default: the first replica's name).

    Raises:
        ConfigError: no replica was given.
    """

    def __init__(
        self,
        replicas: Sequence[CompletionModel],
        *,
        routing: Routing = "sticky",
        health_interval_seconds: float = 5.0,
        name: str | None = None,
    ) -> None:
        if not replicas:
            raise ConfigError("a replica router needs at least one replica")
        self._replicas = [_Replica(model) for model in replicas]
        self.routing: Routing = routing
        self.name = name or replicas[0].name
        self.health_interval_seconds = health_interval_seconds
        # Block hash -> (the replica that last served a prompt with that prefix, whether some
        # prompt's last whole block was that one: a prompt matching it extends that prompt).
        self._owners: OrderedDict[int, tuple[int, bool]] = OrderedDict()
        self._marks = [((i, False), (i, True)) for i in range(len(replicas))]  # shared, not per block
        self._turn = 0

    def status(self) -> list[ReplicaStatus]:
        """Each replica's health and counters, in the order given."""
        return [
            ReplicaStatus(
                name=str(getattr(r.model, "base_url", r.model.name)),
                healthy=r.down_until is None,
                outstanding=r.outstanding,
                requests=r.requests,
                sticky=r.sticky,
                failures=r.failures,
            )
            for r in self._replicas
        ]

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        """Continue ``prompt`` on one replica; on a replica's failure, on the next one.

        Raises:
            ModelUnavailableError: every replica failed the request.
            ModelEndpointError, ModelResponseError: a replica refused the request or answered
                garbage (another replica would not do better: not retried).
        """
        blocks = _blocks(prompt) if self.routing == "sticky" else []
        tried: set[int] = set()
        failures: list[str] = []
        while len(tried) < len(self._replicas):
            index, sticky = self._choose(prompt, blocks, tried)
            tried.add(index)
            replica = self._replicas[index]
            replica.requests += 1
            replica.sticky += sticky
            replica.outstanding += 1
            # Remembered at once: the same prompt sent meanwhile (the other Maj@N chains of a
            # solution) joins it there and shares its prefix in that replica's cache.
            self._remember(blocks, index)
            try:
                return await replica.model.complete(prompt, params)
            except ModelUnavailableError as exc:
                replica.failures += 1
                failures.append(str(exc))
                self._set_aside(replica)
            finally:
                replica.outstanding -= 1
        raise ModelUnavailableError(
            f"{self.name}: all {len(self._replicas)} replicas failed the request: " + "; ".join(failures)
        )

    async def aclose(self) -> None:
        for replica in self._replicas:
            if replica.probe is not None:
                replica.probe.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await replica.probe
            await replica.model.aclose()

    # ------------------------------------------------------------------ routing

    def _choose(self, prompt: str, blocks: list[int], tried: set[int]) -> tuple[int, bool]:
        """The replica for this attempt, and whether it was chosen for its cached prefix."""
        now = time.monotonic()
        for replica in self._replicas:
            if replica.down_until is not None and now >= replica.down_until and replica.probe is None:
                replica.probe = asyncio.create_task(self._check(replica))
        candidates = [i for i, r in enumerate(self._replicas) if i not in tried and r.down_until is None]
        if not candidates:
            # Every untried replica is set aside: try the one whose failure is oldest anyway.
            rest = [i for i in range(len(self._replicas)) if i not in tried]
            return min(rest, key=lambda i: self._replicas[i].down_until or 0.0), False
        if self.routing == "round_robin":
            turn, self._turn = self._turn, self._turn + 1
            return min(candidates, key=lambda i: (i - turn) % len(self._replicas)), False
        least = min(self._replicas[i].outstanding for i in candidates)
        owner = self._owner(prompt, blocks)
        if owner in candidates and self._replicas[owner].outstanding - least < _SLACK:
            return owner, True
        # Ties go round the replicas, so that an idle router does not favour the first one.
        turn, self._turn = self._turn, self._turn + 1
        idle = [i for i in candidates if self._replicas[i].outstanding == least]
        return min(idle, key=lambda i: (i - turn) % len(self._replicas)), False

    def _owner(self, prompt: str, blocks: list[int]) -> int | None:
        """The replica that served the longest known prefix of ``prompt``, when ``prompt``
        extends an earlier prompt or that prefix covers at least :data:`_MIN_MATCH` of it."""
        owner, matched, extends = None, 0, False
        for depth, block in enumerate(blocks, start=1):
            found = self._owners.get(block)
            if found is None:
                break
            (owner, ended), matched = found, depth
            extends = extends or ended
        if owner is None or not (extends or matched * _BLOCK >= _MIN_MATCH * len(prompt)):
            return None
        return owner

    def _remember(self, blocks: list[int], index: int) -> None:
        owners = self._owners
        for depth, block in enumerate(blocks, start=1):
            ended = depth == len(blocks) or owners.get(block, (index, False))[1]
            owners[block] = self._marks[index][ended]
            owners.move_to_end(block)
        while len(owners) > _MAX_BLOCKS:
            owners.popitem(last=False)

    # ------------------------------------------------------------------ health

    def _set_aside(self, replica: _Replica) -> None:
        if replica.down_until is None:
            replica.backoff = self.health_interval_seconds
            replica.down_until = time.monotonic() + replica.backoff

    async def _check(self, replica: _Replica) -> None:
        """Return the replica to the rotation if its health check passes, else wait longer."""
        check: Callable[[], Awaitable[None]] | None = getattr(replica.model, "check_health", None)
        try:
            if check is not None:
                await check()
        except Exception:  # noqa: BLE001 - any failure of the check keeps it aside
            replica.backoff = min(replica.backoff * 2, 60.0)
            replica.down_until = time.monotonic() + replica.backoff
        else:
            replica.down_until = None
        finally:
            replica.probe = None


def _blocks(prompt: str) -> list[int]:
    """Chained hashes of the prompt's whole blocks: block i stands for the prefix up to it."""
    hashes, previous = [], 0
    for start in range(0, len(prompt) - _BLOCK + 1, _BLOCK):
        previous = hash((previous, prompt[start : start + _BLOCK]))
        hashes.append(previous)
    return hashes
