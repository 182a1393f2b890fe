"""Best-of-N: the baseline the refine loop is compared with.

The policy writes ``n`` solutions of a problem, the critic scores every step of each
(``scan="all"``), and the solution with the best aggregated score is the answer. Its records have
the refine batch's keys (so the same reports read both), plus ``method: "best_of_n"`` and what is
particular to Best-of-N: every sample, the pick, and the majority vote over the samples' answers.

Example:
    >>> aggregate([0.9, 0.5, 0.8], "min")
    0.5
    >>> majority_answer(["15", "14", " 14", None])
    '14'
    >>> record = await best_of_n_record(policy, critic, problem, n=8)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from typing_extensions import Unpack

from critloop.agent.budget import StopReason, Usage
from critloop.agent.critic import CritiqueReport, GenPRMCritic
from critloop.agent.policy import Draft, Policy
from critloop.agent.steps import extract_answer, join_steps
from critloop.errors import ConfigError
from critloop.graphs.batch import Problem, RunOptions, error_record, run_records
from critloop.tools._concurrency import all_or_nothing
from critloop.tools.grading import agrade

__all__ = [
    "Aggregation",
    "aggregate",
    "best_of_n_error_record",
    "best_of_n_record",
    "majority_answer",
    "run_best_of_n",
]

Aggregation = Literal["min", "last", "mean", "product"]
"""How a solution's step rewards make its score:

- ``min``: the weakest step (a solution is as good as its worst step; the usual PRM choice).
- ``last``: the last step's reward (the critic used as an outcome reward model).
- ``mean``: the average step reward (forgives one weak step among many good ones).
- ``product``: the product of the rewards (the chance that every step is right, were the rewards
  independent probabilities; penalises long solutions).
"""

_T = TypeVar("_T")


def aggregate(rewards: Sequence[float], aggregation: Aggregation) -> float:
    """The score of a solution with step ``rewards`` (see :data:`Aggregation`).

    A solution with no steps scores ``-inf``: it never beats one that has steps.

    Raises:
        ConfigError: ``aggregation`` is not one of :data:`Aggregation`.
    """
    if aggregation not in get_args(Aggregation):
        raise ConfigError(
            f"aggregation must be one of {', '.join(get_args(Aggregation))}, not {aggregation!r}"
        )
    if not rewards:
        return float("-inf")
    if aggregation == "min":
        return min(rewards)
    if aggregation == "last":
        return rewards[-1]
    if aggregation == "mean":
        return sum(rewards) / len(rewards)
    return math.prod(rewards)


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (compared as exact strings after ``strip``); a tie goes to the
    answer seen first; None answers do not vote. None when nothing voted."""
    votes = Counter(a.strip() for a in answers if a is not None)
    if not votes:
        return None
    # Counter keeps first-seen order and max() returns the first maximum: ties go to the earliest.
    return max(votes, key=lambda answer: votes[answer])


def _pick(scores: Sequence[float]) -> int:
    """The index of the highest score; ties go to the earliest."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


async def best_of_n_record(
    policy: Policy,
    critic: GenPRMCritic,
    problem: Problem,
    *,
    n: int,
    aggregation: Aggregation = "min",
    samples: int | None = None,
) -> dict[str, Any]:
    """One problem's Best-of-N record.

    ``n`` solutions are sampled concurrently, each non-empty one is critiqued with ``scan="all"``
    (``samples``: the critic's Maj@N chains; None: its own setting), and the highest score wins
    (ties: the earliest sample). A solution with no steps is not critiqued and scores ``-inf``.

    The record has the refine batch's keys, where ``correct_initial`` grades sample 0 (what one
    attempt gives), ``correct_final`` the pick, ``correct_majority`` the majority vote over the
    samples' answers, and ``stop_reason`` is ``all_steps_pass`` when no step of the pick was
    flagged, else ``no_progress``. Any failure (a model endpoint down, say) becomes an error
    record, so that a batch goes on.

    Raises:
        ConfigError: ``n`` is below 1, or ``aggregation`` is unknown.
    """
    if n < 1:
        raise ConfigError("n must be at least 1")
    aggregate([], aggregation)  # checks the name before any model call
    started = time.perf_counter()
    try:
        drafts = await all_or_nothing([policy.solve(problem.problem) for _ in range(n)])
        reports = await all_or_nothing(
            [_critique(critic, problem.problem, draft, samples) for draft in drafts]
        )
        graded: dict[str | None, bool] = {}

        async def grade(answer: str | None) -> bool:
            if answer not in graded:
                graded[answer] = await agrade(answer, problem.gold)
            return graded[answer]

        rewards = [report.rewards if report else [] for report in reports]
        scores = [aggregate(r, aggregation) for r in rewards]
        answers = [extract_answer(join_steps(d.steps)) for d in drafts]
        picked = _pick(scores)
        majority = majority_answer(answers)
        correct_initial = await grade(answers[0])
        correct_final = await grade(answers[picked])
        correct_majority = await grade(majority)
    except Exception as exc:  # noqa: BLE001 - one problem's failure is its record, the batch goes on
        return best_of_n_error_record(problem, f"{type(exc).__name__}: {exc}", aggregation)

    usage = Usage()
    for draft in drafts:
        for reply in draft.replies:
            usage = usage.add("policy", reply.usage)
    for report in reports:
        if report is not None:
            usage = usage.add("critic", report.usage)
    pick = reports[picked]
    stop_reason: StopReason = "all_steps_pass" if pick is not None and pick.all_pass else "no_progress"
    return {
        "id": problem.id,
        "method": "best_of_n",
        "problem": problem.problem,
        "gold": problem.gold,
        "answer": answers[picked],
        "initial_answer": answers[0],
        "majority_answer": majority,
        "correct_initial": correct_initial,
        "correct_final": correct_final,
        "correct_majority": correct_majority,
        "correct_by_round": [correct_initial, correct_final],
        "stop_reason": stop_reason,
        "rounds": [],
        "error": None,
        "aggregation": aggregation,
        "picked": picked,
        "samples": [
            {
                "answer": answer,
                "score": None if score == float("-inf") else score,  # JSON has no -Infinity
                "step_rewards": r,
                "steps": draft.steps,
            }
            for answer, score, r, draft in zip(answers, scores, rewards, drafts, strict=True)
        ],
        "final_steps": drafts[picked].steps,
        "initial_steps": drafts[0].steps,
        "step_rewards": rewards[picked],
        "critiqued": [
            [step.reward, step.flagged] for report in reports if report for step in report.step_reports
        ],
        "usage": usage.model_dump(mode="json"),
        "seconds": time.perf_counter() - started,
    }


def best_of_n_error_record(problem: Problem, error: str, aggregation: Aggregation) -> dict[str, Any]:
    """The Best-of-N record of a problem that could not be solved."""
    record = error_record(problem.id, error, problem=problem.problem, gold=problem.gold)
    return {**record, "method": "best_of_n", "correct_majority": False, "aggregation": aggregation}


async def _critique(
    critic: GenPRMCritic, problem: str, draft: Draft, samples: int | None
) -> CritiqueReport | None:
    """The critic's report on every step of ``draft``; None for a solution with no steps."""
    if not draft.steps:
        return None
    return await critic.critique(problem, draft.steps, scan="all", samples=samples)


async def run_best_of_n(
    policy: Policy,
    critic: GenPRMCritic,
    problems: Sequence[Problem],
    out: str | Path,
    *,
    n: int,
    aggregation: Aggregation = "min",
    samples: int | None = None,
    **options: Unpack[RunOptions],
) -> list[dict[str, Any]]:
    """Best-of-N over every problem, one record each appended to ``out``.

    The contract of :func:`critloop.graphs.batch.run_batch`: the same crash-safe results file,
    ``resume`` skips the ids already written (without it, a non-empty ``out`` is an error),
    ``bad`` error records are written first (once), ``on_record`` sees each record as it is
    written. ``concurrency`` counts problems in flight, each with ``n`` samples.

    Returns:
        The records written by this call.

    Raises:
        ConfigError: a bad ``n``, ``aggregation`` or ``concurrency``, or ``out`` holds results
            and ``resume`` is off.
    """
    if n < 1:
        raise ConfigError("n must be at least 1")
    aggregate([], aggregation)
    return await run_records(
        problems,
        lambda problem: best_of_n_record(
            policy, critic, problem, n=n, aggregation=aggregation, samples=samples
        ),
        out,
        **options,
    )
