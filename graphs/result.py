"""What a refine run gives: :class:`SolveResult`, with one :class:`RoundRecord` per refinement."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypedDict

from critloop.agent.budget import StopReason, Usage
from critloop.errors import ModelError, SandboxError

__all__ = ["ErrorSource", "RoundRecord", "SolveResult", "error_source"]

ErrorSource = Literal["policy", "critic", "refiner", "sandbox"]
"""What failed in a run that stopped with ``error``: a role's model endpoint, or the sandbox."""


def error_source(error: BaseException) -> ErrorSource | None:
    """The part of a run that ``error`` came from: the role that made the failing model call
    (:attr:`~critloop.errors.ModelError.role`), or the sandbox; None for anything else."""
    if isinstance(error, ModelError) and error.role in ("policy", "critic", "refiner"):
        return error.role  # type: ignore[return-value]
    return "sandbox" if isinstance(error, SandboxError) else None


class RoundRecord(TypedDict):
    """One refinement."""

    round: int
    """1-based."""
    index: int
    """0-based index of the step that was flagged and rewritten."""
    flagged_step: str
    reward: float
    """The flagged step's reward."""
    critique: str
    """The analysis shown to the refiner (from the chain most sure the step is wrong)."""
    rewrite: str
    """The rewritten step (``step`` mode) or the new solution (``full`` mode)."""
    steps: list[str]
    """The solution after this round."""


class SolveResult(BaseModel):
    """What a refine run gave. JSON-serialisable (``model_dump_json()``); the refine graph's
    output is this model's JSON form."""

    model_config = ConfigDict(frozen=True)

    problem: str
    answer: str | None
    """The content of the final solution's last ``\\boxed{}``; None when it has none."""
    final_steps: list[str]
    """The best solution seen (all-pass wins, then the longest passing prefix, then the mean
    reward), not merely the last one."""
    initial_steps: list[str]
    """The policy's first solution."""
    step_rewards: list[float]
    """Rewards of the final steps, as far as the critic went (first-error scan)."""
    rounds: list[RoundRecord]
    """One entry per refinement: the flagged step, the critique used, the rewrite."""
    stop_reason: StopReason
    error: str | None = None
    """What failed, when ``stop_reason`` is ``error`` (the trace up to there is kept)."""
    error_source: ErrorSource | None = None
    """Which part failed, when ``stop_reason`` is ``error``: a role's model, or the sandbox."""
    last_report: dict[str, Any] | None = None
    """The critic's last full report (:class:`~critloop.agent.critic.CritiqueReport` as JSON)."""
    usage: Usage
    seconds: float
