"""The whole refine loop on real components: the embedded model on CPU with the Docker sandbox,
and llama.cpp's OpenAI-compatible server as every role. Structure, not quality: SmolLM2-135M
is tiny and often wrong (and no critic)."""

from __future__ import annotations

import pytest

from critloop import Budget, DoneEvent, Solver, SolveResult
from critloop.config import load_config
from critloop.sandbox import SandboxPool
from critloop.tools.embedded import CachedModel

PROBLEM = "Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?"
STOP_REASONS = {"all_steps_pass", "max_rounds", "max_tokens", "max_seconds", "no_progress", "error"}
SMALL = {
    "policy.max_tokens": 160,
    "critic.samples": 2,
    "critic.max_critique_tokens": 200,
    "critic.code_rounds": 1,
    "critic.forced_judgement_tokens": 8,
    "refine.max_step_tokens": 64,
    "sandbox.pool_size": 1,
}


def assert_structure(result: SolveResult) -> None:
    assert result.stop_reason in STOP_REASONS
    assert result.stop_reason != "error", result.error
    assert result.initial_steps and result.final_steps
    assert len(result.rounds) <= 1
    assert result.step_rewards and all(0.0 <= r <= 1.0 for r in result.step_rewards)
    assert len(result.step_rewards) <= len(result.final_steps)
    assert result.usage.policy.calls >= 1 and result.usage.critic.calls >= 2
    assert result.usage.policy.completion_tokens > 0 and result.usage.critic.completion_tokens > 0
    for record in result.rounds:
        assert record["flagged_step"] and record["critique"] is not None
        assert record["steps"][: record["index"]] == result.initial_steps[: record["index"]]
    result.model_dump_json()


@pytest.mark.docker
async def test_the_loop_on_the_embedded_model_with_the_docker_sandbox(embedded: CachedModel) -> None:
    config = load_config(None, {**SMALL, "sandbox.backend": "docker"})
    async with Solver.from_config(config, budget=Budget(max_rounds=1)) as solver:
        events = [event async for event in solver.astream(PROBLEM)]
        pool = solver.critic.sandbox
        assert isinstance(pool, SandboxPool) and pool.status().backend == "docker"
        assert pool.status().sessions == 0
    assert isinstance(events[-1], DoneEvent)
    assert_structure(events[-1].result)
    kinds = {event.type for event in events}
    assert {"solution", "step", "done"} <= kinds


async def test_the_loop_with_llama_cpp_as_every_role(embedded: CachedModel, llama_server: str) -> None:
    endpoint = {
        "kind": "openai",
        "base_url": llama_server,
        "model": "smollm2",
        "tokenizer": str(embedded.path),
    }
    overrides = {f"{role}.{key}": value for role in ("policy", "critic") for key, value in endpoint.items()}
    config = load_config(
        None, {**SMALL, **overrides, "critic.profile": "instruct", "sandbox.backend": "local"}
    )
    async with Solver.from_config(config, budget=Budget(max_rounds=1)) as solver:
        result = await solver.asolve(PROBLEM)
    assert_structure(result)
    # llama.cpp returns real logprobs: the rewards come from them, not from hard labels.
    report = result.last_report
    assert report is not None
    chains = [c for step in report["step_reports"] for c in step["chains"]]
    assert chains
    # A verdict read from a server that returns logprobs is scored by them, never by a hard label.
    for chain in chains:
        expected = {"none"} if chain["verdict"] == "none" else {"logprobs", "logprobs_bound"}
        assert chain["reward_source"] in expected, chain
    assert any(chain["reward_source"] == "logprobs" for chain in chains), chains


@pytest.fixture(autouse=True)
def _quiet_local_sandbox_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="critloop.sandbox")
