"""Best-of-N with scripted roles: aggregation, the pick, majority vote, failures, resume."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from refine_script import BAD, GOOD, critic_by_content

from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.policy import Policy
from critloop.agent.writer import CompletionWriter
from critloop.errors import ConfigError, ModelEndpointError
from critloop.graphs.batch import Problem, ResultsFile, load_problems
from critloop.graphs.bon import aggregate, best_of_n_record, majority_answer, run_best_of_n
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel

BAD_AGAIN = ["First, 3 * 4 = 12.", "So 2 + 12 = 15 here.", "Hence $\\boxed{15}$."]
GOOD_AGAIN = ["3 * 4 = 12 comes first.", "Adding 2 gives 14.", "So the result is $\\boxed{14}$."]
WRONG_16 = ["First, 3 * 4 = 12.", "Then 2 + 12 = 16.", "The answer is $\\boxed{16}$."]


def flags_15_or_16(step: str) -> bool:
    return "15" in step or "16" in step


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [("min", 0.5), ("last", 0.8), ("mean", (0.9 + 0.5 + 0.8) / 3), ("product", 0.9 * 0.5 * 0.8)],
)
def test_aggregation_on_hand_numbers(aggregation, expected) -> None:  # type: ignore[no-untyped-def]
    assert aggregate([0.9, 0.5, 0.8], aggregation) == pytest.approx(expected)
    assert aggregate([0.7], aggregation) == pytest.approx(0.7)
    assert aggregate([], aggregation) == -math.inf


def test_an_unknown_aggregation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        aggregate([0.5], "max")  # type: ignore[arg-type]


def test_majority_by_exact_answer_ties_to_the_earliest_and_none_does_not_vote() -> None:
    assert majority_answer(["15", " 14", "14 ", "15", None, None, None]) == "15"  # 2-2: 15 came first
    assert majority_answer([None, "14", "15", "14"]) == "14"
    assert majority_answer(["\\frac{1}{2}", "0.5"]) == "\\frac{1}{2}"  # strings, not values
    assert majority_answer([None, None]) is None


# --------------------------------------------------------------------------- scripted roles


def cycling_policy(template: ChatTemplate, solutions: Sequence[Sequence[str]]) -> Policy:
    """A policy whose k-th solve of a problem writes ``solutions[k % len(solutions)]`` (counted per
    prompt, so that problems solved concurrently each see the same sequence)."""
    counters: dict[str, int] = defaultdict(int)

    def respond(prompt: str, params: SamplingParams) -> str:
        k = counters[prompt]
        counters[prompt] += 1
        return "\n\n".join(solutions[k % len(solutions)])

    model = ScriptedCompletionModel(respond, name="policy")
    return Policy(CompletionWriter(model, template, SamplingParams(max_tokens=128)))


def critic(
    template: ChatTemplate, pool: SandboxPool, is_bad: Callable[[str], bool] = flags_15_or_16
) -> GenPRMCritic:
    model = critic_by_content(is_bad)
    return GenPRMCritic(model, template, pool, CriticConfig(profile="genprm", samples=1))


def problem(pid: str = "p", gold: str = "14") -> Problem:
    return Problem(id=pid, problem=f"What is 2 + 3 * 4? ({pid})", gold=gold, line=1)


async def test_the_critic_picks_the_right_sample_over_the_first_and_the_majority(
    template, local_pool
) -> None:  # type: ignore[no-untyped-def]
    policy = cycling_policy(template, [BAD, BAD_AGAIN, GOOD])
    record = await best_of_n_record(policy, critic(template, local_pool), problem(), n=3)
    assert record["method"] == "best_of_n" and record["error"] is None and record["rounds"] == []
    assert [s["answer"] for s in record["samples"]] == ["15", "15", "14"]
    assert record["picked"] == 2 and record["answer"] == "14" and record["final_steps"] == GOOD
    assert record["initial_answer"] == "15" and record["initial_steps"] == BAD
    # By hand: 15 has two votes, 14 one: the vote is wrong where the critic's pick is right.
    assert record["majority_answer"] == "15"
    assert (record["correct_initial"], record["correct_final"], record["correct_majority"]) == (
        False,
        True,
        False,
    )
    assert record["correct_by_round"] == [False, True]
    assert record["stop_reason"] == "all_steps_pass"
    wrong, right = record["samples"][0], record["samples"][2]
    assert right["score"] == min(right["step_rewards"]) > 0.5 > wrong["score"] == min(wrong["step_rewards"])
    assert record["step_rewards"] == right["step_rewards"] and len(right["step_rewards"]) == 3
    # Every step of every sample was critiqued (scan="all" goes on past a flagged step).
    assert [flagged for _, flagged in record["critiqued"]] == [False, True, True] * 2 + [False] * 3
    usage = record["usage"]
    assert usage["policy"]["calls"] == 3 and usage["critic"]["calls"] > 0 and usage["refiner"]["calls"] == 0
    assert record["aggregation"] == "min" and record["seconds"] > 0
    json.dumps(record, allow_nan=False)  # a strict JSON record


async def test_majority_can_be_right_when_the_pick_is_not(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    # The critic flags nothing: every score ties, so the pick is sample 0 (wrong); 14 wins 2-1.
    policy = cycling_policy(template, [BAD, GOOD, GOOD_AGAIN])
    record = await best_of_n_record(policy, critic(template, local_pool, lambda step: False), problem(), n=3)
    assert record["picked"] == 0 and record["majority_answer"] == "14"
    assert (record["correct_final"], record["correct_majority"]) == (False, True)
    assert record["stop_reason"] == "all_steps_pass"


async def test_ties_go_to_the_earliest_sample(template: ChatTemplate, local_pool: SandboxPool) -> None:
    policy = cycling_policy(template, [WRONG_16, GOOD, GOOD_AGAIN, GOOD])
    record = await best_of_n_record(policy, critic(template, local_pool), problem(), n=4, aggregation="mean")
    scores = [s["score"] for s in record["samples"]]
    assert scores[1] == scores[2] == scores[3] > scores[0]
    assert record["picked"] == 1 and record["final_steps"] == GOOD
    assert scores[1] == pytest.approx(sum(record["step_rewards"]) / 3)


async def test_an_empty_sample_is_never_picked(template: ChatTemplate, local_pool: SandboxPool) -> None:
    policy = cycling_policy(template, [[], WRONG_16, []])
    record = await best_of_n_record(policy, critic(template, local_pool), problem(), n=3)
    assert record["picked"] == 1 and record["answer"] == "16"
    assert record["samples"][0] == {"answer": None, "score": None, "step_rewards": [], "steps": []}
    assert record["stop_reason"] == "no_progress"  # the pick has a flagged step
    assert len(record["critiqued"]) == 3  # only the non-empty sample was critiqued
    # product: a non-empty sample whose every step is flagged still beats an empty one.
    policy = cycling_policy(template, [[], ["$\\boxed{15}$"]])
    zero = critic_by_content(lambda step: True)
    critic_zero = GenPRMCritic(zero, template, local_pool, CriticConfig(profile="genprm", samples=1))
    record = await best_of_n_record(policy, critic_zero, problem(), n=2, aggregation="product")
    assert record["picked"] == 1


async def test_all_empty_samples_pick_the_first_and_call_no_critic(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    judge = critic(template, local_pool)
    record = await best_of_n_record(cycling_policy(template, [[]]), judge, problem(), n=2)
    assert record["picked"] == 0 and record["answer"] is None and record["stop_reason"] == "no_progress"
    assert record["correct_final"] is record["correct_majority"] is False and record["critiqued"] == []
    assert judge.model.calls == []  # type: ignore[attr-defined]


async def test_critic_samples_are_passed_on(template: ChatTemplate, local_pool: SandboxPool) -> None:
    one = await best_of_n_record(
        cycling_policy(template, [GOOD]), critic(template, local_pool), problem(), n=1
    )
    two = await best_of_n_record(
        cycling_policy(template, [GOOD]), critic(template, local_pool), problem(), n=1, samples=2
    )
    assert two["usage"]["critic"]["calls"] == 2 * one["usage"]["critic"]["calls"]


async def test_bad_arguments_raise_before_any_model_call(template, local_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    policy, judge = cycling_policy(template, [GOOD]), critic(template, local_pool)
    with pytest.raises(ConfigError, match="n must be at least 1"):
        await best_of_n_record(policy, judge, problem(), n=0)
    with pytest.raises(ConfigError, match="aggregation"):
        await run_best_of_n(policy, judge, [problem()], tmp_path / "r.jsonl", n=2, aggregation="max")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="concurrency"):
        await run_best_of_n(policy, judge, [problem()], tmp_path / "r.jsonl", n=2, concurrency=0)
    assert not (tmp_path / "r.jsonl").exists()


async def test_an_endpoint_failure_is_one_error_record_and_the_batch_goes_on(
    template, local_pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    judge = critic_by_content(flags_15_or_16)

    def respond(prompt: str, params: SamplingParams) -> str:
        if "(p1)" in prompt:
            raise ModelEndpointError("critic endpoint http://critic:8000/v1: connection refused")
        return judge._script(prompt, params)  # type: ignore[operator,return-value]

    model = ScriptedCompletionModel(respond, name="critic", alternatives=judge.alternatives)
    failing = GenPRMCritic(model, template, local_pool, CriticConfig(profile="genprm", samples=1))
    problems = [problem(f"p{i}") for i in range(3)]
    out = tmp_path / "r.jsonl"
    written = await run_best_of_n(
        cycling_policy(template, [BAD, GOOD]), failing, problems, out, n=2, concurrency=3
    )
    records = {r["id"]: r for r in ResultsFile(out).records()}
    assert sorted(records) == ["p0", "p1", "p2"] and len(written) == 3
    broken = records["p1"]
    assert broken["stop_reason"] == "error" and broken["method"] == "best_of_n"
    assert broken["error"] == "ModelEndpointError: critic endpoint http://critic:8000/v1: connection refused"
    assert broken["correct_final"] is broken["correct_majority"] is False and broken["gold"] == "14"
    for pid in ("p0", "p2"):
        assert records[pid]["error"] is None and records[pid]["correct_final"] is True


async def test_resume_appends_only_the_missing_problems(template, local_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "p.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is 2 + 3 * 4? (copy {i})", "answer": "14"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    problems, bad = load_problems(data)
    out = tmp_path / "results.jsonl"
    policy, judge = cycling_policy(template, [BAD, GOOD]), critic(template, local_pool)
    seen: list[str] = []
    first = await run_best_of_n(
        policy, judge, problems[:2], out, n=2, bad=bad, on_record=lambda r: seen.append(r["id"])
    )
    assert sorted(r["id"] for r in first) == sorted(seen) == ["p0", "p1", "p:5"]
    with pytest.raises(ConfigError, match="already holds results"):
        await run_best_of_n(policy, judge, problems, out, n=2)
    before = out.read_bytes()
    calls = len(policy.writer.model.calls)  # type: ignore[attr-defined]
    more = await run_best_of_n(policy, judge, problems, out, n=2, resume=True, bad=bad)
    assert sorted(r["id"] for r in more) == ["p2", "p3"]
    assert len(policy.writer.model.calls) == calls + 4  # type: ignore[attr-defined]  # 2 problems x 2
    assert out.read_bytes().startswith(before)  # the finished records byte-identical
    records = ResultsFile(out).records()
    assert sorted(r["id"] for r in records) == ["p0", "p1", "p2", "p3", "p:5"]
    assert all(r["correct_final"] and not r["correct_initial"] for r in records if r["id"] != "p:5")
    assert await run_best_of_n(policy, judge, problems, out, n=2, resume=True, bad=bad) == []
