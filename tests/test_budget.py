"""The budget: which limit a run has reached, the check before each model call, and a server's
cap on what a request asks for."""

from __future__ import annotations

import pytest

from critloop import Budget, BudgetExceededError, Usage, UsageMeter
from critloop.tools.completion import ModelUsage


def usage(policy: int = 0, critic: int = 0, refiner: int = 0) -> Usage:
    return Usage(
        policy=ModelUsage(completion_tokens=policy),
        critic=ModelUsage(completion_tokens=critic),
        refiner=ModelUsage(completion_tokens=refiner),
    )


def test_spent_names_the_first_limit_reached() -> None:
    budget = Budget(max_rounds=2, max_tokens=100, max_seconds=10)
    assert budget.spent(usage(50, 49), 9.9) is None
    assert budget.spent(usage(50, 30, 20), 1) == "max_tokens"  # all roles count together
    assert budget.spent(usage(), 10) == "max_seconds"
    assert budget.spent(usage(), 1, rounds=2) == "max_rounds"
    assert budget.spent(usage(), 1, rounds=1) is None
    assert budget.spent(usage(100), 10, rounds=2) == "max_rounds"  # rounds first, then tokens


def test_the_check_before_a_call_raises_with_the_stop_reason() -> None:
    budget = Budget(max_tokens=100, max_seconds=10)
    budget.check_before_call(usage(99), 9.0)
    with pytest.raises(BudgetExceededError, match="100 of 100 tokens") as tokens:
        budget.check_before_call(usage(critic=100), 0.0)
    assert tokens.value.reason == "max_tokens"
    with pytest.raises(BudgetExceededError, match="time budget") as seconds:
        budget.check_before_call(usage(), 10.5)
    assert seconds.value.reason == "max_seconds"


def test_a_meter_charges_each_role_and_counts_time_from_where_a_run_was() -> None:
    meter = UsageMeter(Budget(max_tokens=10, max_seconds=5), usage=usage(policy=4), seconds=4.0)
    assert 4.0 <= meter.seconds < 5.0 and 0.0 < meter.seconds_left <= 1.0
    meter.before_call()
    meter.charge("refiner", ModelUsage(calls=1, completion_tokens=6))
    assert meter.usage.refiner.calls == 1 and meter.usage.completion_tokens == 10
    with pytest.raises(BudgetExceededError):
        meter.before_call()


def test_a_request_is_capped_by_the_server_budget() -> None:
    server = Budget(max_rounds=2, max_tokens=1000, max_seconds=60, samples=4)
    asked = Budget(max_rounds=5, max_tokens=10, max_seconds=600, samples=8)
    assert server.capped(asked) == Budget(max_rounds=2, max_tokens=10, max_seconds=60, samples=4)
    assert server.capped(Budget(samples=None)).samples == 4
    open_samples = Budget(max_rounds=2, max_tokens=1000, max_seconds=60)
    assert open_samples.capped(Budget(samples=8)).samples == 8
    assert open_samples.capped(Budget()).samples is None
