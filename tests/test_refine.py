"""The refine loop with scripted models: every path of the graph, budgets, failures, resume."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from critic_script import paragraph
from langchain_core.language_models import FakeListChatModel
from model_fixtures import TOKENIZER_DIR
from refine_script import BAD, GOOD, PROBLEM, Gate, critic_by_content, policy_script, wrong_15

from critloop import (
    Budget,
    CompletionWriter,
    DoneEvent,
    RefinedEvent,
    RefiningEvent,
    SolutionEvent,
    Solver,
    StepEvent,
    extract_answer,
    join_steps,
    split_steps,
)
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.errors import ModelEndpointError
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionResult, SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel


def solver(
    template: ChatTemplate,
    pool: SandboxPool,
    policy: Any,
    critic_model: Any,
    *,
    refiner: Any = None,
    samples: int = 2,
    **options: Any,
) -> Solver:
    critic = GenPRMCritic(critic_model, template, pool, CriticConfig(profile="genprm", samples=samples))
    if isinstance(policy, ScriptedCompletionModel):
        policy = CompletionWriter(policy, template, SamplingParams(max_tokens=256))
    refine_writer = CompletionWriter(refiner, template, SamplingParams(max_tokens=64)) if refiner else None
    return Solver(policy=policy, critic=critic, refiner=refine_writer, **options)


def paragraphs(model: ScriptedCompletionModel) -> list[int]:
    return [paragraph(prompt) for prompt, _ in model.calls]


# --------------------------------------------------------------------------- steps and answers


def test_steps_split_on_blank_lines_and_join_back() -> None:
    text = "First line.\nstill step one.\n\n  \nStep two.\n\n\n\nStep three."
    assert split_steps(text) == ["First line.\nstill step one.", "Step two.", "Step three."]
    assert split_steps(join_steps(GOOD)) == GOOD
    assert split_steps("") == [] and split_steps("\n\n \n") == []


def test_blank_lines_inside_code_or_display_math_do_not_split() -> None:
    text = "Compute:\n```python\nx = 1\n\ny = 2\n```\n\nThen $$a\n\nb$$ holds.\n\nDone."
    assert split_steps(text) == [
        "Compute:\n```python\nx = 1\n\ny = 2\n```",
        "Then $$a\n\nb$$ holds.",
        "Done.",
    ]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so $\\boxed{14}$.", "14"),
        ("\\boxed{\\frac{1}{2}} and later \\boxed{ \\dfrac{3}{4} }", "\\dfrac{3}{4}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {x^{2}}", "x^{2}"),
        ("no box at all", None),
        ("truncated \\boxed{12", None),
        ("\\fbox{7}", "7"),
    ],
)
def test_the_answer_is_the_last_boxed_content_with_nested_braces(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


# --------------------------------------------------------------------------- the loop


async def test_a_solution_that_passes_first_time(template: ChatTemplate, local_pool: SandboxPool) -> None:
    policy, critic = policy_script(initial=GOOD), critic_by_content(wrong_15)
    result = await solver(template, local_pool, policy, critic).asolve(PROBLEM)
    assert result.stop_reason == "all_steps_pass" and result.error is None
    assert result.final_steps == result.initial_steps == GOOD
    assert result.answer == "14" and result.rounds == []
    assert len(result.step_rewards) == 3 and all(r > 0.5 for r in result.step_rewards)
    assert result.usage.policy.calls == 1 and result.usage.refiner.calls == 0
    assert result.usage.critic.calls == len(critic.calls) == 3 * 2 * 3  # steps x chains x stages
    assert local_pool.status().sessions == 0
    result.model_dump_json()


async def test_an_error_at_step_k_is_fixed_in_one_round_reusing_the_prefix(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    policy, critic = policy_script(), critic_by_content(wrong_15)
    events = [e async for e in solver(template, local_pool, policy, critic).astream(PROBLEM)]
    assert isinstance(events[-1], DoneEvent)
    result = events[-1].result
    assert result.stop_reason == "all_steps_pass"
    assert result.initial_steps == BAD and result.final_steps == GOOD and result.answer == "14"
    (record,) = result.rounds
    assert record["index"] == 1 and record["flagged_step"] == BAD[1]
    assert record["rewrite"] == "Then 2 + 12 = 14." and record["steps"] == GOOD
    assert "Checking the claim: Then 2 + 12 = 15." in record["critique"] and record["reward"] < 0.5
    # Step 1 was critiqued once; after the rewrite only steps 2 and 3 were.
    assert paragraphs(critic).count(1) == 2 * 3
    assert paragraphs(critic).count(2) == 2 * 2 * 3 and paragraphs(critic).count(3) == 2 * 3
    # The policy continued after the rewritten step from the kept prefix, as a true continuation.
    continuation_prompt = policy.calls[-1][0]
    assert continuation_prompt.endswith("First, 3 * 4 = 12.\n\nThen 2 + 12 = 14.\n\n")
    kinds = [type(e) for e in events]
    assert kinds[0] is SolutionEvent and kinds[-1] is DoneEvent
    assert kinds.index(RefiningEvent) < kinds.index(RefinedEvent)
    assert [(e.round, e.steps) for e in events if isinstance(e, SolutionEvent)] == [(0, BAD), (1, GOOD)]
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [(e.index, e.verdict, e.flagged, e.reused) for e in steps] == [
        (0, "yes", False, False),
        (1, "no", True, False),
        (0, "yes", False, True),  # the unchanged prefix of the new solution, not critiqued again
        (1, "yes", False, False),
        (2, "yes", False, False),
    ]
    assert result.usage.refiner.calls == 1 and result.usage.policy.calls == 2


async def test_never_fixed_stops_at_max_rounds_with_the_best_solution(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    tries = iter(range(1, 10))
    policy = policy_script(continuation=["So it is 15."])
    inner = policy._script

    def respond(prompt: str, params: SamplingParams) -> str:
        if "Write a corrected version of that one step" in prompt:
            return f"Then 2 + 12 = 15 (try {next(tries)})."  # wrong every time, never the same
        return inner(prompt, params)  # type: ignore[operator]

    policy._script = respond
    critic = critic_by_content(lambda step: "15" in step)
    result = await solver(template, local_pool, policy, critic, budget=Budget(max_rounds=2)).asolve(PROBLEM)
    assert result.stop_reason == "max_rounds" and result.error is None
    assert [r["rewrite"] for r in result.rounds] == ["Then 2 + 12 = 15 (try 1).", "Then 2 + 12 = 15 (try 2)."]
    # Every solution failed at step 2 with the same rewards: the earliest one is kept.
    assert result.final_steps == BAD and result.step_rewards[1] < 0.5
    assert result.answer == "15"


async def test_a_rewrite_that_changes_nothing_stops_with_no_progress(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    policy = policy_script(rewrite=BAD[1], continuation=[BAD[2]])
    result = await solver(template, local_pool, policy, critic_by_content(wrong_15)).asolve(PROBLEM)
    assert result.stop_reason == "no_progress" and "already critiqued" in (result.error or "")
    assert len(result.rounds) == 1


async def test_the_token_budget_stops_the_loop(template: ChatTemplate, local_pool: SandboxPool) -> None:
    policy = policy_script(rewrite="Then 2 + 12 = 15 again.", continuation=["So it is 15."])
    critic = critic_by_content(lambda step: "15" in step)
    result = await solver(template, local_pool, policy, critic, budget=Budget(max_tokens=50)).asolve(PROBLEM)
    assert result.stop_reason == "max_tokens" and result.rounds == []
    assert result.usage.completion_tokens >= 50


class _Stalled(ScriptedCompletionModel):
    """Answers its first ``answers`` calls, then never (until cancelled)."""

    def __init__(self, inner: ScriptedCompletionModel, answers: int) -> None:
        super().__init__(inner._script)  # type: ignore[arg-type]
        self._answers = answers
        self.never = asyncio.Event()

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        if len(self.calls) >= self._answers:
            self.calls.append((prompt, params))
            await self.never.wait()
        return await super().complete(prompt, params)


async def test_the_time_budget_cancels_a_stalled_call_and_keeps_the_trace(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    policy = _Stalled(policy_script(), answers=1)  # writes the first solution, then stalls
    budget = Budget(max_seconds=1.0)
    result = await solver(template, local_pool, policy, critic_by_content(wrong_15), budget=budget).asolve(
        PROBLEM
    )
    assert result.stop_reason == "max_seconds"
    assert result.initial_steps == BAD and result.final_steps == BAD
    assert 1.0 <= result.seconds < 10
    assert local_pool.status().sessions == 0


async def test_an_empty_policy_answer_stops_with_an_error(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    policy = ScriptedCompletionModel(["\n\n  \n"])
    critic = critic_by_content(wrong_15)
    result = await solver(template, local_pool, policy, critic).asolve(PROBLEM)
    assert result.stop_reason == "error" and "empty solution" in (result.error or "")
    assert result.final_steps == [] and critic.calls == []


async def test_an_unsplittable_answer_is_one_step(template: ChatTemplate, local_pool: SandboxPool) -> None:
    policy = ScriptedCompletionModel(["3 * 4 = 12 and 2 + 12 = 14, so the answer is $\\boxed{14}$."])
    result = await solver(template, local_pool, policy, critic_by_content(wrong_15)).asolve(PROBLEM)
    assert result.stop_reason == "all_steps_pass"
    assert len(result.final_steps) == 1 and result.answer == "14"


async def test_a_critic_infrastructure_failure_stops_with_error_and_keeps_the_trace(
    template, local_pool
) -> None:  # type: ignore[no-untyped-def]
    critic = critic_by_content(wrong_15)
    inner = critic._script

    def failing(prompt: str, params: SamplingParams) -> str:
        if paragraph(prompt) == 2:
            raise ModelEndpointError("http://127.0.0.1:9/v1: gave up after 5 attempts; last failure: refused")
        return inner(prompt, params)  # type: ignore[operator]

    critic._script = failing
    result = await solver(template, local_pool, policy_script(), critic).asolve(PROBLEM)
    assert result.stop_reason == "error"
    assert result.error is not None and "ModelEndpointError" in result.error and "127.0.0.1:9" in result.error
    assert result.error_source == "critic"
    assert result.initial_steps == BAD and result.final_steps == BAD
    assert result.usage.policy.calls == 1
    assert local_pool.status().sessions == 0


async def test_full_mode_rewrites_the_whole_solution(template: ChatTemplate, local_pool: SandboxPool) -> None:
    policy = policy_script()
    result = await solver(template, local_pool, policy, critic_by_content(wrong_15), mode="full").asolve(
        PROBLEM
    )
    assert result.stop_reason == "all_steps_pass" and result.final_steps == GOOD
    prompt = policy.calls[1][0]
    assert "There might be some problem in this paragraph of your reasoning" in prompt
    assert "\n>Then 2 + 12 = 15.\n\nChecking the claim" in prompt
    assert result.rounds[0]["rewrite"] == join_steps(GOOD)


async def test_a_langchain_chat_model_as_policy_continues_by_instruction(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    chat = FakeListChatModel(responses=[join_steps(BAD), "Then 2 + 12 = 14.", "The answer is $\\boxed{14}$."])
    result = await solver(template, local_pool, chat, critic_by_content(wrong_15)).asolve(PROBLEM)
    assert result.stop_reason == "all_steps_pass" and result.final_steps == GOOD


async def test_abandoning_a_run_cancels_the_node_in_flight_and_frees_its_sessions(
    template, local_pool
) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(critic_by_content(wrong_15))
    run = asyncio.create_task(solver(template, local_pool, policy_script(), gate).asolve(PROBLEM))
    await gate.entered.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    # LangGraph would let the node run on; critloop cancels it where it waits.
    await asyncio.wait_for(gate.cancelled.wait(), timeout=10)
    async with asyncio.timeout(10):
        while local_pool.status().sessions:  # a session still opening is released when it arrives
            await asyncio.sleep(0.01)


async def test_no_blocking_call_inside_the_graph(template: ChatTemplate, local_pool: SandboxPool) -> None:
    from blockbuster import blockbuster_ctx

    runner = solver(template, local_pool, policy_script(), critic_by_content(wrong_15))
    with blockbuster_ctx():
        result = await runner.asolve(PROBLEM)
    assert result.stop_reason == "all_steps_pass"


async def test_the_blocking_checker_does_catch_a_blocking_call(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    import time

    from blockbuster import BlockingError, blockbuster_ctx

    policy = policy_script(initial=GOOD)
    inner = policy._script

    def blocking(prompt: str, params: SamplingParams) -> str:
        time.sleep(0.001)  # what the test above would catch inside a node
        return inner(prompt, params)  # type: ignore[operator]

    policy._script = blocking
    runner = solver(template, local_pool, policy, critic_by_content(wrong_15))
    with blockbuster_ctx(), pytest.raises(BlockingError):
        await runner.asolve(PROBLEM)


async def test_a_killed_run_resumes_from_its_sqlite_checkpoint_without_repeating_calls(  # type: ignore[no-untyped-def]
    template, local_pool, tmp_path: Path
) -> None:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    db = str(tmp_path / "runs.sqlite")

    class Killed(Exception):
        pass

    def dies(prompt: str, params: SamplingParams) -> str:
        raise Killed("the process was killed here")

    first_policy, first_critic = policy_script(), critic_by_content(wrong_15)
    async with AsyncSqliteSaver.from_conn_string(db) as saver:
        runner = solver(
            template,
            local_pool,
            first_policy,
            first_critic,
            refiner=ScriptedCompletionModel(dies),
            checkpointer=saver,
        )
        with pytest.raises(Killed):
            await runner.asolve(PROBLEM, thread_id="problem-1")
    assert len(first_policy.calls) == 1 and len(first_critic.calls) == 2 * 3 * 2

    # A new process: new models, the same database and thread.
    policy, critic = policy_script(), critic_by_content(wrong_15)
    async with AsyncSqliteSaver.from_conn_string(db) as saver:
        runner = solver(template, local_pool, policy, critic, checkpointer=saver)
        result = await runner.asolve(PROBLEM, thread_id="problem-1")
        assert result.stop_reason == "all_steps_pass" and result.final_steps == GOOD
        # Nothing finished before the kill ran again: no first solution, no critique of step 1,
        # no second critique of the flagged step 2's old text.
        assert [p for p, _ in policy.calls if p.endswith("\n\n")] == [p for p, _ in policy.calls][1:]
        assert "Write a corrected version" in policy.calls[0][0]
        assert sorted(set(paragraphs(critic))) == [2, 3] and len(critic.calls) == 2 * 3 * 2
        # A finished thread answers from the checkpoint alone.
        again = solver(template, local_pool, policy_script(), critic_by_content(wrong_15), checkpointer=saver)
        before = len(critic.calls)
        repeat = await again.asolve(PROBLEM, thread_id="problem-1")
        assert repeat.final_steps == GOOD and len(critic.calls) == before


def test_a_solver_from_config_solves_again_after_solve_closed_it(template) -> None:  # type: ignore[no-untyped-def]
    from critloop import CritloopConfig

    # Scripted roles replace the models: endpoints never called, on the template fixture's in-repo
    # tokenizer (the embedded default would fetch the model only for it to be swapped out).
    tokenizer = str(TOKENIZER_DIR)
    endpoint = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "tokenizer": tokenizer}
    config = CritloopConfig.model_validate(
        {"policy": endpoint, "critic": endpoint, "sandbox": {"backend": "local", "pool_size": 1}}
    )
    runner = Solver.from_config(config)
    # Swap in scripted roles, keep the owned pool.
    writer = CompletionWriter(policy_script(initial=GOOD), template, SamplingParams())
    runner.policy.writer = runner.refiner.writer = writer
    runner.critic.model = critic_by_content(wrong_15)
    first_pool = runner.critic.sandbox
    assert runner.solve(PROBLEM).stop_reason == "all_steps_pass"
    assert first_pool is not None and first_pool.closed
    assert runner.solve(PROBLEM).stop_reason == "all_steps_pass"
    # One pool, owned by the solver, started again by the second run: no attribute replaced.
    assert runner.critic.sandbox is first_pool and first_pool.closed
