"""The events of a refine run, as :meth:`critloop.Solver.astream` yields them.

Each is a frozen model with a ``type`` literal; match on the class (or on ``type``). Their JSON
form (``to_json()``; what the server's progress chunks and the graph's LangGraph ``custom``
stream carry, and what :func:`parse_event` reads back) has the type under the key ``"event"``::

    {"event": "step", "index": 0, "reward": 0.93, "verdict": "yes", "flagged": false,
     "reused": false, "critique": "...", "tier": "code"}

Example:
    >>> event = parse_event({"event": "refining", "round": 1, "index": 2, "step": "2 + 2 = 5"})
    >>> isinstance(event, RefiningEvent), event.type, event.index
    (True, 'refining', 2)
    >>> event.to_json()["event"]
    'refining'
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from critloop.agent.critic import CodeRun, CritiqueTier
from critloop.graphs.result import SolveResult

__all__ = [
    "CODE_PREVIEW",
    "CRITIQUE_PREVIEW",
    "DoneEvent",
    "RefinedEvent",
    "RefiningEvent",
    "RunEvent",
    "SolutionEvent",
    "StepEvent",
    "parse_event",
    "preview",
]

CRITIQUE_PREVIEW = 280
"""Characters of a critique's analysis carried by a :class:`StepEvent`."""
CODE_PREVIEW = 1000
"""Characters of each code block, and of its output, carried by a :class:`StepEvent`."""


def preview(text: str, limit: int) -> str:
    """The first ``limit`` characters of ``text``, with ``...`` when it was longer.

    >>> preview("2 + 2 = 4", 5), preview("4", 5)
    ('2 + 2...', '4')
    """
    return text[:limit] + ("..." if len(text) > limit else "")


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True)

    def to_json(self) -> dict[str, Any]:
        """The event as JSON data, its type under ``"event"``."""
        return self.model_dump(mode="json", by_alias=True)


class SolutionEvent(_Event):
    """A new solution: the policy's first (round 0), or the one a refinement gave."""

    type: Literal["solution"] = Field(default="solution", alias="event")
    steps: list[str]
    round: int
    """0 for the policy's first solution, else the refinement round that wrote it."""


class StepEvent(_Event):
    """The critic's verdict on one step, as soon as it is ready."""

    type: Literal["step"] = Field(default="step", alias="event")
    index: int
    """0-based index of the step."""
    reward: float
    """Mean reward over the Maj@N chains."""
    verdict: str
    """The verdict most chains gave: ``yes``, ``no`` or ``none``."""
    flagged: bool
    """The reward is below the critic's threshold: this step will be refined."""
    reused: bool = False
    """Carried over from the critique of an earlier solution with the same prefix."""
    critique: str = ""
    """The start of the analysis of the chain most sure the step is wrong."""
    tier: CritiqueTier = "code"
    """The tier of the critic's cascade that decided the step (``code``: the full protocol)."""
    code_runs: tuple[CodeRun, ...] = ()
    """The code that chain ran to check the step and what it printed, each cut to
    :data:`CODE_PREVIEW` characters."""


class RefiningEvent(_Event):
    """A refinement starts: step ``index`` was flagged and is being rewritten."""

    type: Literal["refining"] = Field(default="refining", alias="event")
    round: int
    index: int
    step: str
    """The flagged step's text."""


class RefinedEvent(_Event):
    """A refinement ended: ``rewrite`` is the rewritten step (or solution, in ``full`` mode)."""

    type: Literal["refined"] = Field(default="refined", alias="event")
    round: int
    index: int
    rewrite: str


class DoneEvent(_Event):
    """The run ended; always the last event."""

    type: Literal["done"] = Field(default="done", alias="event")
    result: SolveResult


RunEvent = Annotated[
    SolutionEvent | StepEvent | RefiningEvent | RefinedEvent | DoneEvent, Field(discriminator="type")
]
"""Any event of a run."""

_ADAPTER: TypeAdapter[RunEvent] = TypeAdapter(RunEvent)


def parse_event(data: dict[str, Any]) -> RunEvent:
    """An event from its JSON form (raises pydantic's ``ValidationError`` on anything else)."""
    return _ADAPTER.validate_python(data)
