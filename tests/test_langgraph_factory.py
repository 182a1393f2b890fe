"""The graph factory named in langgraph.json: it imports, compiles without a checkpointer, and runs
through LangGraph's own API, with a context and (as under ``langgraph dev``) without one."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, get_args

import pytest
from refine_script import BAD, GOOD, PROBLEM, critic_by_content, policy_script, wrong_15

from critloop import Budget, CompletionWriter, Policy, Refiner, Solver, StopReason
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.config import CritloopConfig
from critloop.errors import CritloopError
from critloop.graphs.refine import ContextFactory, RefineContext, build_refine_graph
from critloop.sandbox import SandboxPool
from critloop.solver import make_graph
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams
from critloop.tools.embedded import CachedModel
from critloop.tools.fakes import ScriptedCompletionModel

ROOT = Path(__file__).resolve().parents[1]
NODES = {"__start__", "policy", "critic", "refine", "finalize", "__end__"}


def scripted_context(
    template: ChatTemplate, pool: SandboxPool, *, budget: Budget | None = None
) -> tuple[RefineContext, ScriptedCompletionModel, ScriptedCompletionModel]:
    """Roles on scripted models: the policy writes a wrong step 2 (2 + 12 = 15), the critic
    says No to any step containing 15, the refiner fixes it."""
    policy_model, critic_model = policy_script(), critic_by_content(wrong_15)
    policy = Policy(CompletionWriter(policy_model, template, SamplingParams(max_tokens=256)))
    refiner = Refiner(CompletionWriter(policy_model, template, SamplingParams(max_tokens=64)), policy)
    critic = GenPRMCritic(critic_model, template, pool, CriticConfig(profile="genprm", samples=2))
    context = RefineContext(policy=policy, refiner=refiner, critic=critic, budget=budget or Budget())
    return context, policy_model, critic_model


# --------------------------------------------------------------------------- langgraph.json


def test_langgraph_json_names_an_importable_graph_factory() -> None:
    config = json.loads((ROOT / "langgraph.json").read_text())
    assert config["dependencies"] == ["."]
    assert list(config["graphs"]) == ["critloop"]
    module_name, _, attr = config["graphs"]["critloop"].partition(":")
    assert module_name and attr, "a graph is named as module:attr"
    factory = getattr(importlib.import_module(module_name), attr)
    assert callable(factory)
    assert factory is make_graph
    # The server calls a factory with no argument or with the run's config.
    for graph in (factory(), factory({"configurable": {}})):
        assert graph.checkpointer is None
        assert set(graph.get_graph().nodes) == NODES
        assert graph.builder.context_schema is RefineContext


# --------------------------------------------------------------------------- runs


async def test_the_factory_graph_runs_through_langgraph_with_a_context(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    graph = make_graph()
    assert graph.checkpointer is None
    context, policy_model, critic_model = scripted_context(template, local_pool)
    state = await graph.ainvoke({"problem": PROBLEM}, context=context)
    await local_pool.settle()
    assert local_pool.status().sessions == 0  # every critic node closed what it opened
    assert state["stop_reason"] == "all_steps_pass" and state["error"] is None
    assert state["stop_reason"] in get_args(StopReason)
    assert state["initial_steps"] == BAD and state["final_steps"] == GOOD
    assert state["answer"] == "14"
    assert len(state["rounds"]) == 1 and state["rounds"][0]["index"] == 1
    assert state["usage"]["policy"]["calls"] == 2 and state["usage"]["refiner"]["calls"] == 1
    assert policy_model.calls and critic_model.calls


async def test_the_factory_graph_streams_custom_events_and_values(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    graph = make_graph()
    context, _, _ = scripted_context(template, local_pool, budget=Budget(max_rounds=0))
    custom: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    async for mode, chunk in graph.astream(
        {"problem": PROBLEM}, context=context, stream_mode=["custom", "values"]
    ):
        if mode == "custom":
            custom.append(chunk)
        else:
            last = chunk
    # The JSON form of the typed events (critloop.graphs.events), as LangGraph streams them.
    assert custom[0] == {"event": "solution", "steps": BAD, "round": 0}
    assert [(e["event"], e["index"], e["flagged"]) for e in custom[1:]] == [
        ("step", 0, False),
        ("step", 1, True),
    ]
    assert last["stop_reason"] == "max_rounds" and last["final_steps"] == BAD
    assert last["answer"] == "15"


async def test_a_graph_with_no_default_context_refuses_a_run_without_one() -> None:
    with pytest.raises(CritloopError, match="needs a RefineContext"):
        await build_refine_graph().ainvoke({"problem": PROBLEM})


def counted_default_context(
    template: ChatTemplate, pool: SandboxPool, budget: Budget
) -> tuple[list[RefineContext], ContextFactory]:
    """A default-context factory on scripted roles, and the list of the contexts it built."""
    built: list[RefineContext] = []

    async def default_context() -> RefineContext:
        context, _, _ = scripted_context(template, pool, budget=budget)
        built.append(context)
        return context

    return built, default_context


async def test_runs_without_a_context_use_the_default_context_built_once(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    built, default_context = counted_default_context(template, local_pool, Budget(max_rounds=1))
    graph = build_refine_graph(default_context=default_context)
    assert graph.checkpointer is None
    first = await graph.ainvoke({"problem": PROBLEM})
    second = await graph.ainvoke({"problem": "What is 1 + 1?"})
    # A partial context keeps its own budget and takes the missing roles from the default.
    partial = await graph.ainvoke({"problem": PROBLEM}, context=RefineContext(budget=Budget(max_rounds=0)))
    await local_pool.settle()
    assert local_pool.status().sessions == 0  # runs without live objects leave no session open
    assert len(built) == 1
    assert first["stop_reason"] == "all_steps_pass"
    assert first["final_steps"] == GOOD and first["answer"] == "14"
    assert second["stop_reason"] == "all_steps_pass"
    assert partial["stop_reason"] == "max_rounds" and partial["final_steps"] == BAD


async def test_make_graph_builds_its_default_context_from_critloop_config(
    template: ChatTemplate, local_pool: SandboxPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``langgraph dev`` runs bring no context: make_graph reads $CRITLOOP_CONFIG. The
    models it names are replaced by scripted ones; the budget comes from the file."""
    path = tmp_path / "critloop.toml"
    path.write_text('[budget]\nmax_rounds = 0\n\n[sandbox]\nbackend = "local"\npool_size = 1\n')
    monkeypatch.setenv("CRITLOOP_CONFIG", str(path))
    seen: list[CritloopConfig] = []

    def from_config(config: Any = None, **_: Any) -> Solver:
        assert isinstance(config, CritloopConfig)
        seen.append(config)
        context, policy_model, _ = scripted_context(template, local_pool)
        critic = context.critic
        assert critic is not None
        return Solver(
            policy=CompletionWriter(policy_model, template, SamplingParams(max_tokens=256)),
            critic=critic,
            budget=config.budget,
        )

    monkeypatch.setattr(Solver, "from_config", staticmethod(from_config))
    graph = make_graph()
    assert graph.checkpointer is None and not seen  # nothing is built before the first run
    state = await graph.ainvoke({"problem": PROBLEM})
    assert len(seen) == 1 and seen[0].budget.max_rounds == 0
    assert seen[0].sandbox.backend == "local"
    assert state["stop_reason"] == "max_rounds" and state["final_steps"] == BAD and state["answer"] == "15"
    # The server calls the factory for every run: they share one set of models and one local_pool.
    again = await make_graph().ainvoke({"problem": PROBLEM}, context={})
    assert again["stop_reason"] == "max_rounds" and len(seen) == 1


# --------------------------------------------------------------------------- as the server runs it
#
# `langgraph dev` (langgraph-api 0.16) runs every graph under blockbuster, which turns a blocking
# call in the event loop into an error, and passes each run the assistant's context, by default
# `{}`, which LangGraph coerces into `RefineContext()`: neither may break a run.


async def test_the_default_context_path_makes_no_blocking_call(
    embedded: CachedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockbuster import blockbuster_ctx

    path = tmp_path / "critloop.toml"
    path.write_text(
        "[policy]\nmax_tokens = 24\n\n"
        "[critic]\nmax_critique_tokens = 64\ncode_rounds = 0\nforced_judgement_tokens = 4\n\n"
        "[budget]\nmax_rounds = 0\n\n"
        '[sandbox]\nbackend = "local"\npool_size = 1\n'
    )
    monkeypatch.setenv("CRITLOOP_CONFIG", str(path))
    graph = make_graph()
    with blockbuster_ctx():
        state = await graph.ainvoke({"problem": PROBLEM})
    assert state["stop_reason"] in get_args(StopReason) and state["stop_reason"] != "error", state["error"]
    assert state["final_steps"]


async def test_an_empty_context_as_the_server_passes_keeps_the_default_budget(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    _, default_context = counted_default_context(template, local_pool, Budget(max_rounds=0))
    graph = build_refine_graph(default_context=default_context)
    state = await graph.ainvoke({"problem": PROBLEM}, context={})
    await local_pool.settle()
    assert local_pool.status().sessions == 0
    assert state["stop_reason"] == "max_rounds" and state["rounds"] == []
