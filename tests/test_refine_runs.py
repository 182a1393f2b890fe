"""The refine graph's runs as LangGraph runs them: input validation, a thread reused for a new
problem, concurrent runs through one context, the budget checked before every model call, and
what a solver owns."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from refine_script import BAD, GOOD, PROBLEM, critic_by_content, policy_script, wrong_15

from critloop import Budget, CompletionWriter, Policy, Refiner, Solver, SolveResult
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.errors import ConfigError
from critloop.graphs.refine import RefineContext, build_refine_graph
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionResult, SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel

OTHER = "What is 7 * 6?"
OTHER_STEPS = ["7 * 6 = 42.", "The answer is $\\boxed{42}$."]


class _Ledger:
    """Every model call of a run in order: (model name, completion tokens, prompt)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def record(self, model: ScriptedCompletionModel) -> ScriptedCompletionModel:
        ledger, inner = self, model.complete

        async def complete(prompt: str, params: SamplingParams) -> CompletionResult:
            result = await inner(prompt, params)
            ledger.calls.append((model.name, result.completion_tokens, prompt))
            return result

        model.complete = complete  # type: ignore[method-assign]
        return model

    def tokens_through(self, last: int) -> int:
        return sum(tokens for _, tokens, _ in self.calls[: last + 1])


def _context(
    template: ChatTemplate,
    pool: SandboxPool,
    *,
    policy: ScriptedCompletionModel | None = None,
    critic: ScriptedCompletionModel | None = None,
    budget: Budget | None = None,
    samples: int = 2,
) -> RefineContext:
    policy_model = policy or policy_script()
    writer = Policy(CompletionWriter(policy_model, template, SamplingParams(max_tokens=256)))
    refiner = Refiner(CompletionWriter(policy_model, template, SamplingParams(max_tokens=64)), writer)
    critic_model = critic or critic_by_content(wrong_15)
    genprm = GenPRMCritic(critic_model, template, pool, CriticConfig(profile="genprm", samples=samples))
    return RefineContext(policy=writer, refiner=refiner, critic=genprm, budget=budget or Budget())


def _by_problem() -> ScriptedCompletionModel:
    """A policy that solves whichever problem its prompt asks (wrongly, for the first)."""
    inner = policy_script()

    def respond(prompt: str, params: SamplingParams) -> str:
        if OTHER in prompt and "Write a corrected version" not in prompt:
            return "\n\n".join(OTHER_STEPS)
        return inner._script(prompt, params)  # type: ignore[operator]

    return ScriptedCompletionModel(respond, name="policy")


# --------------------------------------------------------------------------- input


@pytest.mark.parametrize(
    ("graph_input", "message"),
    [
        ({"problem": "  "}, "the problem is empty"),
        ({"problm": PROBLEM}, "needs the key 'problem'"),
        ({}, "needs the key 'problem'"),
    ],
)
async def test_the_graph_refuses_an_input_without_a_problem(
    template: ChatTemplate, local_pool: SandboxPool, graph_input: dict[str, Any], message: str
) -> None:
    policy = policy_script()
    graph = build_refine_graph()
    with pytest.raises(ConfigError, match=message):
        await graph.ainvoke(graph_input, context=_context(template, local_pool, policy=policy))
    assert policy.calls == []


# --------------------------------------------------------------------------- threads


async def test_a_new_input_on_a_finished_thread_starts_a_new_run(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    policy, critic = _by_problem(), critic_by_content(wrong_15)
    context = _context(template, local_pool, policy=policy, critic=critic)
    graph = build_refine_graph(checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "chat-1"}}
    first = await graph.ainvoke({"problem": PROBLEM}, thread, context=context)
    assert first["answer"] == "14" and len(first["rounds"]) == 1
    critic_calls, policy_calls = len(critic.calls), len(policy.calls)

    second = await graph.ainvoke({"problem": OTHER}, thread, context=context)
    # The second problem was solved and critiqued: nothing of the first run carried over.
    assert [OTHER in prompt for prompt, _ in policy.calls[policy_calls:]] == [True]
    assert len(critic.calls) > critic_calls
    assert second["problem"] == OTHER and second["answer"] == "42"
    assert second["final_steps"] == OTHER_STEPS and second["initial_steps"] == OTHER_STEPS
    assert second["stop_reason"] == "all_steps_pass" and second["rounds"] == []
    assert second["error"] is None
    assert second["last_report"] is not None and second["last_report"]["problem"] == OTHER
    # Usage is per run.
    assert second["usage"]["policy"]["calls"] == 1 and second["usage"]["refiner"]["calls"] == 0
    assert second["usage"]["critic"]["calls"] == len(critic.calls) - critic_calls
    # And the output is the result's fields, no working data.
    assert set(second) == set(SolveResult.model_fields)


async def test_an_input_without_a_problem_on_a_used_thread_is_refused(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    """The thread's previous problem is not picked up: the input's problem lasts one step."""
    policy = _by_problem()
    context = _context(template, local_pool, policy=policy)
    graph = build_refine_graph(checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "chat-2"}}
    await graph.ainvoke({"problem": OTHER}, thread, context=context)
    calls = len(policy.calls)
    with pytest.raises(ConfigError, match="needs the key 'problem'"):
        await graph.ainvoke({"problm": OTHER}, thread, context=context)
    assert len(policy.calls) == calls
    again = await graph.ainvoke({"problem": OTHER}, thread, context=context)  # the thread goes on
    assert again["answer"] == "42" and again["problem"] == OTHER


async def test_concurrent_runs_of_one_problem_through_one_context_share_nothing(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    policy, critic = policy_script(), critic_by_content(wrong_15)
    context = _context(template, local_pool, policy=policy, critic=critic)
    graph = build_refine_graph()
    alone = await graph.ainvoke({"problem": PROBLEM}, context=context)
    calls_alone = len(critic.calls)
    solver = Solver(policy=context.policy.writer, critic=context.critic)  # type: ignore[union-attr]
    results = await asyncio.gather(solver.asolve(PROBLEM), solver.asolve(PROBLEM))
    for result in results:
        assert result.final_steps == GOOD and result.answer == alone["answer"] == "14"
        assert len(result.rounds) == 1 and result.rounds[0]["index"] == 1
        assert result.usage.critic.calls == calls_alone
    # Each run critiqued everything itself: no critique run (nor its reuse) was shared.
    assert len(critic.calls) == 3 * calls_alone
    await local_pool.settle()
    assert local_pool.status().sessions == 0


def test_the_context_is_immutable(template: ChatTemplate, local_pool: SandboxPool) -> None:
    context = _context(template, local_pool)
    with pytest.raises(AttributeError):
        context.budget = Budget(max_rounds=0)  # type: ignore[misc]
    assert not hasattr(context, "runs") and not hasattr(context, "tasks")


# --------------------------------------------------------------------------- the budget


async def _run(context: RefineContext) -> dict[str, Any]:
    return await build_refine_graph().ainvoke({"problem": PROBLEM}, context=context)


async def test_no_critic_call_starts_once_the_policy_spent_the_tokens(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    critic = critic_by_content(wrong_15)
    out = await _run(_context(template, local_pool, critic=critic, budget=Budget(max_tokens=1)))
    assert out["stop_reason"] == "max_tokens" and out["error"] is None
    assert critic.calls == [] and out["usage"]["policy"]["calls"] == 1
    assert out["final_steps"] == BAD  # the trace so far is kept
    assert out["initial_steps"] == BAD


async def test_the_token_limit_holds_within_one_call_per_chain_in_the_critic(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    ledger = _Ledger()
    policy = ledger.record(policy_script())
    critic = ledger.record(critic_by_content(wrong_15))
    full = await _run(_context(template, local_pool, policy=policy, critic=critic))
    assert full["stop_reason"] == "all_steps_pass"
    draft = ledger.calls[0][1]
    biggest = max(tokens for name, tokens, _ in ledger.calls if name == "critic")
    for limit in (draft + 1, draft + 40, draft + 120):
        out = await _run(_context(template, local_pool, budget=Budget(max_tokens=limit)))
        spent = out["usage"]["critic"]["completion_tokens"] + draft
        assert out["stop_reason"] == "max_tokens", limit
        # Two chains call in parallel: at most one call each past the limit.
        assert limit <= spent < limit + 2 * biggest, (limit, spent)


async def test_the_refine_node_checks_the_limit_between_rewrite_and_continuation(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    ledger = _Ledger()
    policy = ledger.record(policy_script())
    await _run(
        _context(template, local_pool, policy=policy, critic=ledger.record(critic_by_content(wrong_15)))
    )
    rewrite = next(
        i for i, (_, _, prompt) in enumerate(ledger.calls) if "Write a corrected version" in prompt
    )
    limit = ledger.tokens_through(rewrite)  # spent exactly when the rewrite returns

    policy = policy_script()
    out = await _run(_context(template, local_pool, policy=policy, budget=Budget(max_tokens=limit)))
    assert out["stop_reason"] == "max_tokens"
    assert not any(prompt.endswith("\n\n") for prompt, _ in policy.calls)  # no continuation
    assert out["usage"]["refiner"]["calls"] == 1 and out["usage"]["policy"]["calls"] == 1
    total = sum(out["usage"][role]["completion_tokens"] for role in ("policy", "critic", "refiner"))
    assert total == limit and out["rounds"] == []


# --------------------------------------------------------------------------- what a solver owns


async def test_a_solver_from_objects_leaves_them_open(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    context = _context(template, local_pool)
    assert context.policy is not None and context.critic is not None
    async with Solver(policy=context.policy.writer, critic=context.critic) as solver:
        assert (await solver.asolve(PROBLEM)).answer == "14"
    assert not local_pool.closed
    async with await local_pool.open_session() as session:  # still serving
        assert (await session.exec("print(1)")).stdout == "1\n"


async def test_a_solver_from_config_closes_what_it_built(template: ChatTemplate) -> None:
    from model_fixtures import TOKENIZER_DIR

    from critloop import CritloopConfig, OpenAICompletionModel

    endpoint = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "tokenizer": str(TOKENIZER_DIR)}
    config = CritloopConfig.model_validate(
        {"policy": endpoint, "critic": endpoint, "sandbox": {"backend": "local", "pool_size": 1}}
    )
    solver = Solver.from_config(config)
    pool, critic_model = solver.critic.sandbox, solver.critic.model
    assert pool is not None and isinstance(critic_model, OpenAICompletionModel)
    async with solver:
        assert not pool.closed and pool.status().kernels == 1
        http = critic_model._http()  # a connection pool opened by a run
        assert not http.closed
    assert pool.closed and http.closed
    async with solver:  # opened again
        assert not pool.closed
    assert pool.closed
