"""The labels of GenPRM's training data: Relative Progress Estimation from Monte Carlo scores,
the teacher's verdict, the consensus filter and the rollout buckets (``critloop.graphs.synth``)."""

from __future__ import annotations

import doctest

import pytest

from critloop.errors import ConfigError
from critloop.graphs import synth
from critloop.graphs.synth import (
    RolloutBuckets,
    agrees,
    first_error,
    rollouts_for,
    rpe_labels,
    teacher_verdict,
)


def test_the_worked_examples_in_the_docstrings_hold() -> None:
    results = doctest.testmod(synth, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 10 and results.failed == 0


@pytest.mark.parametrize(
    ("mc", "pass_at_1", "expected"),
    [
        # Hand-computed: ratios 0.8 (exactly the threshold: kept), 0.75, 1.0, then a dead end.
        ([0.4, 0.3, 0.3, 0.0], 0.5, [1, 0, 1, 0]),
        ([1.0, 1.0, 1.0], 1.0, [1, 1, 1]),
        ([0.0, 1.0], 0.7, [0, 0]),
        ([], 0.5, []),
    ],
)
def test_rpe_labels_by_hand(mc: list[float], pass_at_1: float, expected: list[int]) -> None:
    assert rpe_labels(mc, pass_at_1) == expected


def test_the_threshold_moves_the_labels_and_the_first_error() -> None:
    mc = [0.45, 0.3, 0.29]
    assert rpe_labels(mc, 0.5) == [1, 0, 1] and first_error(rpe_labels(mc, 0.5)) == 1
    assert rpe_labels(mc, 0.5, threshold=0.6) == [1, 1, 1] and first_error([1, 1, 1]) == -1


def test_bad_scores_and_modes_name_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"mc\[1\] must lie in \[0, 1\], not 1.5"):
        rpe_labels([0.5, 1.5], 0.5)
    with pytest.raises(ConfigError, match=r"pass_at_1 must lie in \[0, 1\], not -0.1"):
        rpe_labels([0.5], -0.1)
    with pytest.raises(ConfigError, match="mode must be ratio or difference, not 'log'"):
        rpe_labels([0.5], 0.5, mode="log")  # type: ignore[arg-type]


def test_the_consensus_keeps_only_paths_whose_first_error_the_teacher_names() -> None:
    assert teacher_verdict([1, 1, 3, None]) == 1
    assert teacher_verdict([1, 3]) is None  # a tie is no verdict
    assert agrees([1, 0, 1], [1, 1, 1, 1]) and not agrees([1, 0, 1], [2, 2, 2, 2])
    assert agrees([1, 1, 1], [-1, -1, 0, -1])
    assert not agrees([1, 1], [None, None, None, None])


def test_rollout_buckets_follow_pass_at_1_and_refuse_nonsense() -> None:
    assert [rollouts_for(p) for p in (0.0, 0.099, 0.1, 0.5, 0.899, 0.9, 1.0)] == [
        128,
        128,
        64,
        64,
        64,
        32,
        32,
    ]
    custom = RolloutBuckets(hard=16, medium=8, easy=4)
    assert (rollouts_for(0.05, custom), rollouts_for(0.5, custom), rollouts_for(0.95, custom)) == (16, 8, 4)
    with pytest.raises(ConfigError, match="at least 1 rollout"):
        RolloutBuckets(easy=0)
    with pytest.raises(ConfigError, match="hard_below <= medium_below"):
        RolloutBuckets(hard_below=0.95, medium_below=0.9)
