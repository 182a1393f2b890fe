"""Several replicas per role: sticky and round-robin routing, failover and health checks, on fake
replicas and on real HTTP servers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from openai_script import completion
from scripted_server import Recorded, Reply, ScriptedServer

from critloop.errors import ConfigError, ModelEndpointError, ModelUnavailableError
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import Completion, CompletionResult, SamplingParams
from critloop.tools.endpoint import EndpointConfig, build_completion_model
from critloop.tools.openai_client import OpenAICompletionModel
from critloop.tools.replicas import ReplicaRouter

PARAMS = SamplingParams(max_tokens=8)
SYSTEM = "You are a math teacher. Review the paragraphs of the solution step by step.\n"


class FakeReplica:
    """A replica that answers at once (or when released), or fails as it is told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prompts: list[str] = []
        self.failing = False
        self.refusing = False
        self.healthy = asyncio.Event()
        self.checks = 0
        self.hold: asyncio.Event | None = None

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        self.prompts.append(prompt)
        if self.refusing:
            raise ModelEndpointError(f"{self.name}: HTTP 400: bad request")
        if self.failing:
            raise ModelUnavailableError(f"{self.name}: gave up after 2 attempts")
        if self.hold is not None:
            await self.hold.wait()
        choice = Completion(text=f"[{self.name}]", finish_reason="stop")
        return CompletionResult(choices=(choice,), prompt_tokens=1, completion_tokens=1)

    async def check_health(self) -> None:
        self.checks += 1
        await self.healthy.wait()

    async def aclose(self) -> None:
        return None


def chain_prompts(problem: str, steps: int) -> list[str]:
    """A critique chain's prompts: each extends the previous one (critique, then the next step)."""
    prompt = SYSTEM + f"Problem: {problem}\nStep 1: the first step of this solution, written out in full.\n"
    prompts = [prompt]
    for k in range(2, steps + 1):
        prompt += f"Critique {k - 1}: the analysis of the step before, then the judgement. " * 3
        prompt += f"\nStep {k}: another step of the solution, long enough to fill a prefix block.\n"
        prompts.append(prompt)
    return prompts


async def test_a_chain_stays_on_its_replica_and_solutions_spread() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(4)]
    router = ReplicaRouter(replicas)
    chains = [chain_prompts(f"problem number {i} about pencils and boxes", 6) for i in range(8)]
    served: dict[int, set[str]] = {}
    for step in range(6):
        results = await asyncio.gather(*(router.complete(chain[step], PARAMS) for chain in chains))
        for i, result in enumerate(results):
            served.setdefault(i, set()).add(result.choices[0].text)
    assert all(len(names) == 1 for names in served.values()), "every chain stayed on one replica"
    used = [len(r.prompts) for r in replicas]
    assert used == [12, 12, 12, 12], "8 chains of 6 prompts spread 2 chains per replica"
    status = router.status()
    assert sum(s.sticky for s in status) == 8 * 5, "every prompt but a chain's first followed its prefix"
    assert all(s.healthy and s.outstanding == 0 and s.failures == 0 for s in status)


async def test_the_chains_of_a_solution_join_the_replica_of_their_shared_prompt() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(4)]
    router = ReplicaRouter(replicas)
    prompt = chain_prompts("a problem the eight chains share", 1)[0]
    results = await asyncio.gather(*(router.complete(prompt, PARAMS) for _ in range(8)))
    assert len({r.choices[0].text for r in results}) == 1, "one replica computes the shared prefix"


async def test_a_busy_replica_sends_newcomers_elsewhere() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(2)]
    release = asyncio.Event()
    for replica in replicas:
        replica.hold = release
    router = ReplicaRouter(replicas)
    prompt = chain_prompts("one popular problem", 1)[0]
    # The replica that took the prompt takes it again until it has 16 more in flight than the
    # idle one; the 17th goes to the idle replica.
    held = [asyncio.create_task(router.complete(prompt, PARAMS)) for _ in range(16)]
    await asyncio.sleep(0)  # each reaches its replica and waits there
    assert sorted(len(r.prompts) for r in replicas) == [0, 16]
    held.append(asyncio.create_task(router.complete(prompt, PARAMS)))
    await asyncio.sleep(0)
    assert sorted(len(r.prompts) for r in replicas) == [1, 16]
    assert [s.outstanding for s in router.status()] in ([16, 1], [1, 16])
    release.set()
    await asyncio.gather(*held)
    assert [s.outstanding for s in router.status()] == [0, 0]


async def test_short_or_new_prompts_go_to_the_least_busy_replica() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(3)]
    router = ReplicaRouter(replicas)
    for i in range(6):
        await router.complete(f"2 + {i} =", PARAMS)  # shorter than a prefix block: nothing to follow
    assert [len(r.prompts) for r in replicas] == [2, 2, 2]
    assert sum(s.sticky for s in router.status()) == 0


async def test_round_robin_takes_turns_whatever_the_prompt() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(3)]
    router = ReplicaRouter(replicas, routing="round_robin")
    prompts = chain_prompts("a problem", 6)
    texts = [(await router.complete(p, PARAMS)).choices[0].text for p in prompts]
    assert texts == ["[r0]", "[r1]", "[r2]", "[r0]", "[r1]", "[r2]"]


async def test_a_failing_replica_is_set_aside_until_its_health_check_passes() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(2)]
    router = ReplicaRouter(replicas, health_interval_seconds=0.0)
    prompts = chain_prompts("a problem", 3)
    owner_index = int((await router.complete(prompts[0], PARAMS)).choices[0].text[2])
    owner, other = replicas[owner_index], replicas[1 - owner_index]
    owner.failing = True
    result = await router.complete(prompts[1], PARAMS)
    assert result.choices[0].text == f"[{other.name}]", "the request moved to the other replica"
    status = router.status()
    assert not status[owner_index].healthy and status[owner_index].failures == 1
    # Set aside: the next prompt goes straight to the other replica (a health check starts).
    tried_before = len(owner.prompts)
    assert (await router.complete(prompts[2], PARAMS)).choices[0].text == f"[{other.name}]"
    assert len(owner.prompts) == tried_before
    probe = router._replicas[owner_index].probe
    assert probe is not None, "a health check is under way"
    owner.failing = False
    owner.healthy.set()
    await probe
    assert owner.checks == 1 and router.status()[owner_index].healthy
    # The chain goes on where its latest prompts went, the healthy replica, not back.
    assert (await router.complete(prompts[2] + "more of the chain", PARAMS)).choices[
        0
    ].text == f"[{other.name}]"
    await router.aclose()


async def test_when_every_replica_fails_the_error_names_them_all() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(3)]
    for replica in replicas:
        replica.failing = True
    router = ReplicaRouter(replicas, name="GenPRM-7B")
    with pytest.raises(ModelUnavailableError, match="GenPRM-7B: all 3 replicas failed") as caught:
        await router.complete("1 + 1 =", PARAMS)
    assert all(f"r{i}: gave up" in str(caught.value) for i in range(3))
    # Set aside, each is still tried once more when nothing healthy is left.
    with pytest.raises(ModelUnavailableError):
        await router.complete("1 + 1 =", PARAMS)
    assert [len(r.prompts) for r in replicas] == [2, 2, 2]
    await router.aclose()


async def test_a_refused_request_is_not_retried_on_another_replica() -> None:
    replicas = [FakeReplica(f"r{i}") for i in range(2)]
    replicas[0].refusing = replicas[1].refusing = True
    router = ReplicaRouter(replicas)
    with pytest.raises(ModelEndpointError, match="HTTP 400"):
        await router.complete("1 + 1 =", PARAMS)
    assert sum(len(r.prompts) for r in replicas) == 1
    assert all(s.healthy for s in router.status())


def test_the_config_takes_a_list_of_replicas() -> None:
    urls = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    model = build_completion_model(EndpointConfig(kind="openai", base_url=urls, model="GenPRM/GenPRM-7B"))
    assert isinstance(model, ReplicaRouter) and model.routing == "sticky" and model.name == "GenPRM/GenPRM-7B"
    assert [s.name for s in model.status()] == urls
    single = build_completion_model(EndpointConfig(kind="openai", base_url=urls[:1], model="m"))
    assert isinstance(single, OpenAICompletionModel)
    with pytest.raises(ValueError, match=r"lists http://127\.0\.0\.1:8001/v1 more than once"):
        EndpointConfig(kind="openai", base_url=[urls[0], urls[0]])
    with pytest.raises(ValueError, match="needs base_url"):
        EndpointConfig(kind="openai", base_url=[])
    with pytest.raises(ConfigError, match="at least one replica"):
        ReplicaRouter([])


def test_critic_url_repeated_on_the_command_line_lists_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from critloop.cli import app
    from critloop.errors import CritloopError
    from critloop.solver import Solver

    seen: list[Any] = []

    def capture(cls: type[Solver], config: Any = None, **_: Any) -> Solver:
        seen.append(config)
        raise CritloopError("captured")

    monkeypatch.setattr(Solver, "from_config", classmethod(capture))
    urls = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    done = CliRunner().invoke(
        app, ["solve", "2 + 2?", "--critic-url", urls[0], "--critic-url", urls[1], "--policy-url", urls[0]]
    )
    assert done.exit_code == 1 and "captured" in done.stderr
    [cfg] = seen
    assert cfg.critic.base_url == urls and cfg.critic.kind == "openai"
    assert cfg.policy.base_url == urls[0]


# --------------------------------------------------------------------------- real HTTP servers


class Flaky:
    """A server's answers: completions, and ``/models`` for the health check; 503 while down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False

    def __call__(self, request: Recorded) -> Reply:
        if self.down:
            return Reply(503, {"error": "overloaded"})
        if request.path.endswith("/models"):
            return Reply(200, {"object": "list", "data": [{"id": "scripted"}]})
        prompt = json.loads(request.body)["prompt"]
        return Reply(200, completion(self.name, None, prompt))


async def test_failover_and_return_through_real_http_servers() -> None:
    flaky = [Flaky("a"), Flaky("b")]
    with ScriptedServer(default=flaky[0]) as a, ScriptedServer(default=flaky[1]) as b:
        config = EndpointConfig(kind="openai", base_url=[f"{a.url}/v1", f"{b.url}/v1"], model="scripted")
        router = build_completion_model(config)
        assert isinstance(router, ReplicaRouter)
        router.health_interval_seconds = 0.0
        for client in router._replicas:  # no backoff sleeps between a replica's two tries
            client.model.backoff_seconds = client.model.max_backoff_seconds = 0.0  # type: ignore[attr-defined]
        prompts = chain_prompts("a problem", 4)
        try:
            first = (await router.complete(prompts[0], PARAMS)).choices[0].text
            owner = 0 if first == "a" else 1
            flaky[owner].down = True
            assert (await router.complete(prompts[1], PARAMS)).choices[0].text == flaky[1 - owner].name
            status = router.status()
            assert not status[owner].healthy and status[owner].failures == 1
            down_server = (a, b)[owner]
            completions = [r for r in down_server.requests if r.path.endswith("/completions")]
            assert len(completions) == 3, "its first prompt, then 2 tries of the second"
            # A health check started at once (the interval is 0); the server is still down.
            probe = router._replicas[owner].probe
            if probe is not None:
                await probe
            assert not router.status()[owner].healthy
            flaky[owner].down = False
            # The next request starts another check (GET /v1/models on the real server) and goes
            # to the healthy replica; once the check answers, the owner is back.
            checks_before = sum(r.method == "GET" for r in (a, b)[owner].requests)
            await router.complete(prompts[2], PARAMS)
            probe = router._replicas[owner].probe
            if probe is not None:  # else it already answered, during that request
                await probe
            assert router.status()[owner].healthy
            checks = [r for r in down_server.requests if r.method == "GET"]
            assert len(checks) == checks_before + 1 and checks[-1].path == "/v1/models"
        finally:
            await router.aclose()


async def test_a_critique_on_llama_cpp_through_replicas_one_of_them_dead(
    llama_server: str, embedded_template: ChatTemplate
) -> None:
    from critloop.agent.critic import CriticConfig, GenPRMCritic

    dead = "http://127.0.0.1:9/v1"  # nothing listens there: connections are refused
    config = CriticConfig(
        kind="openai",
        base_url=[dead, llama_server],
        model="smollm2",
        profile="instruct",
        samples=2,
        max_critique_tokens=64,
        code_rounds=0,
        forced_judgement_tokens=8,
    )
    router = build_completion_model(config)
    assert isinstance(router, ReplicaRouter)
    critic = GenPRMCritic(router, embedded_template, None, config)
    try:
        report = await critic.critique("What is 2 + 3 * 4?", ["3 * 4 = 12.", "2 + 12 = 14."])
    finally:
        await critic.model.aclose()
    assert report.step_reports and all(0.0 <= s.reward <= 1.0 for s in report.step_reports)
    down, up = router.status()
    assert not down.healthy and down.failures >= 1 and down.requests == down.failures
    assert up.healthy and up.failures == 0 and up.requests == report.usage.calls
