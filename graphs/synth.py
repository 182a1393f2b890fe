"""GenPRM-style training data: the labels of solution steps from Monte Carlo rollouts (Relative
Progress Estimation), and the consensus of those labels with a teacher's critique.

A step's Monte Carlo score MC_t is the fraction of completions from the solution's first t steps
that reach the right answer; MC_0 is the problem's Pass@1. Relative Progress Estimation labels a
step by how much of the previous prefix's chance it keeps, P_t = MC_t / MC_(t-1): label 1 when
P_t >= threshold (0.8 in the GenPRM paper). A path is kept for training when the first step
labelled 0 agrees with the earliest wrong step a teacher model names (the consensus filter).

Step indices here are 0-based, and -1 means "no wrong step", as in ProcessBench.

Example:
    >>> rpe_labels([0.6, 0.55, 0.1, 0.0], pass_at_1=0.5)
    [1, 1, 0, 0]
    >>> first_error([1, 1, 0, 0])
    2
    >>> rollouts_for(0.05), rollouts_for(0.5), rollouts_for(0.95)
    (128, 64, 32)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from critloop.errors import ConfigError

__all__ = [
    "LabelMode",
    "RolloutBuckets",
    "agrees",
    "first_error",
    "rollouts_for",
    "rpe_labels",
    "teacher_verdict",
]

LabelMode = Literal["ratio", "difference"]
"""How a step's progress is measured against the previous prefix:

- ``ratio``: P_t = MC_t / MC_(t-1), the paper's Relative Progress Estimation.
- ``difference``: MC_t - MC_(t-1), an absolute change (its threshold is usually at or below 0).
"""


def rpe_labels(
    mc: Sequence[float], pass_at_1: float, *, threshold: float = 0.8, mode: LabelMode = "ratio"
) -> list[int]:
    """The label (1: the step keeps the solution on track, 0: it does not) of every step.

    Args:
        mc: MC_1 ... MC_T, the Monte Carlo score of each step prefix (fractions in [0, 1]; the
            last one is usually the path's own answer graded, 1.0 or 0.0).
        pass_at_1: MC_0, the problem's Pass@1 under the completer.
        threshold: a step's label is 1 when its progress is at least this.
        mode: ``ratio`` (the paper's) or ``difference`` (see :data:`LabelMode`).

    Once a prefix's MC reaches 0, that step and every later one are labelled 0: nothing after a
    dead end counts as progress (a ratio over 0 is 0, whatever the later MCs are).

    Raises:
        ConfigError: an MC or ``pass_at_1`` outside [0, 1], or an unknown ``mode``.

    Examples:
        The chance halves at step 3 (0.5 -> 0.25 is a ratio of 0.5 < 0.8):

        >>> rpe_labels([0.5, 0.5, 0.25, 0.25], pass_at_1=0.5)
        [1, 1, 0, 1]

        A step may raise the chance above the problem's Pass@1 (a ratio over 1):

        >>> rpe_labels([0.9, 1.0], pass_at_1=0.3)
        [1, 1]

        After an MC of 0 every step is 0, even one whose own MC recovers:

        >>> rpe_labels([0.4, 0.0, 0.5], pass_at_1=0.5)
        [1, 0, 0]

        A problem the completer never solves gives no step a chance to keep:

        >>> rpe_labels([0.25, 0.5], pass_at_1=0.0)
        [0, 0]

        The difference variant, with its own threshold (a drop of at most 0.1 is kept):

        >>> rpe_labels([0.5, 0.45, 0.2], pass_at_1=0.5, threshold=-0.1, mode="difference")
        [1, 1, 0]
    """
    if mode not in get_args(LabelMode):
        raise ConfigError(f"mode must be {' or '.join(get_args(LabelMode))}, not {mode!r}")
    for name, value in (("pass_at_1", pass_at_1), *((f"mc[{i}]", v) for i, v in enumerate(mc))):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], not {value!r}")
    labels: list[int] = []
    previous = pass_at_1
    for current in mc:
        if previous == 0.0 or current == 0.0:
            labels.append(0)
            previous = 0.0  # a dead end: every later step is 0 too
            continue
        progress = current / previous if mode == "ratio" else current - previous
        labels.append(int(progress >= threshold))
        previous = current
    return labels


def first_error(labels: Sequence[int]) -> int:
    """The 0-based index of the first step labelled 0, or -1 when every step is 1.

    >>> first_error([1, 0, 1]), first_error([1, 1])
    (1, -1)
    """
    return next((i for i, label in enumerate(labels) if label == 0), -1)


def teacher_verdict(votes: Sequence[int | None]) -> int | None:
    """The teacher's earliest wrong step: the index most of its samples named (0-based, -1 for
    "no wrong step"); None when no index has more votes than every other, or no sample gave one
    (a sample whose answer could not be read votes None).

    >>> teacher_verdict([2, 2, -1, None]), teacher_verdict([2, -1]), teacher_verdict([None])
    (2, None, None)
    """
    counts = Counter(vote for vote in votes if vote is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def agrees(labels: Sequence[int], votes: Sequence[int | None]) -> bool:
    """Whether the consensus filter keeps a path: its RPE labels' first error equals the
    teacher's verdict (see :func:`teacher_verdict`; no verdict keeps nothing).

    >>> agrees([1, 0, 0], [1, 1, 2, 1]), agrees([1, 1], [-1, -1, 0, -1]), agrees([1, 0], [0, 0])
    (True, True, False)
    """
    verdict = teacher_verdict(votes)
    return verdict is not None and verdict == first_error(labels)


@dataclass(frozen=True, kw_only=True)
class RolloutBuckets:
    """How many Monte Carlo completions each step prefix gets, by the problem's Pass@1 (the
    paper's buckets: hard problems need more rollouts to see a rare success)."""

    hard: int = 128
    """Rollouts when Pass@1 is below :attr:`hard_below`."""
    hard_below: float = 0.1
    medium: int = 64
    """Rollouts when Pass@1 is below :attr:`medium_below` (and not hard)."""
    medium_below: float = 0.9
    easy: int = 32
    """Rollouts otherwise."""

    def __post_init__(self) -> None:
        if min(self.hard, self.medium, self.easy) < 1:
            raise ConfigError("every rollout bucket needs at least 1 rollout")
        if not 0.0 <= self.hard_below <= self.medium_below <= 1.0:
            raise ConfigError("the bucket bounds must satisfy 0 <= hard_below <= medium_below <= 1")


def rollouts_for(pass_at_1: float, buckets: RolloutBuckets = RolloutBuckets()) -> int:
    """K, the completions per step prefix of a problem with this Pass@1.

    >>> rollouts_for(0.0), rollouts_for(0.1), rollouts_for(0.9)
    (128, 64, 32)
    """
    if pass_at_1 < buckets.hard_below:
        return buckets.hard
    if pass_at_1 < buckets.medium_below:
        return buckets.medium
    return buckets.easy
