"""``critloop serve`` on a real loopback port, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from model_fixtures import TOKENIZER_DIR, _free_port
from refine_script import BAD, GOOD, PROBLEM, Gate, critic_by_content, policy_script, wrong_15

from critloop import Budget, CompletionWriter, OpenAICompletionModel, Solver, join_steps
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.errors import SandboxUnavailableError
from critloop.graphs.events import parse_event
from critloop.sandbox import SandboxPool
from critloop.sandbox.backend import SandboxBackend
from critloop.server import ServerSettings, create_app
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams


def make_solver(template: ChatTemplate, pool: SandboxPool, critic_model: Any = None) -> Solver:
    critic_model = critic_model or critic_by_content(wrong_15)
    critic = GenPRMCritic(critic_model, template, pool, CriticConfig(profile="genprm", samples=2))
    writer = CompletionWriter(policy_script(), template, SamplingParams(max_tokens=256))
    return Solver(policy=writer, critic=critic)


@asynccontextmanager
async def serving(solver: Solver, **settings: Any) -> AsyncIterator[str]:
    port = _free_port()
    app = create_app(solver, ServerSettings(**settings))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started)  # uvicorn exposes no started event
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (for state another task changes, with no event to await)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def client(base: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


USER = [{"role": "user", "content": PROBLEM}]


async def test_a_non_streamed_answer_carries_the_refined_solution_and_the_extension(
    template, local_pool
) -> None:  # type: ignore[no-untyped-def]
    async with serving(make_solver(template, local_pool)) as base:
        reply = await client(base).chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == join_steps(GOOD)
    assert reply.choices[0].finish_reason == "stop" and reply.model == "critloop"
    extension = reply.model_extra["critloop"]  # type: ignore[index]
    assert extension["stop_reason"] == "all_steps_pass" and extension["answer"] == "14"
    assert extension["initial_steps"] == BAD and len(extension["rounds"]) == 1
    assert len(extension["step_rewards"]) == 3 and extension["usage"]["critic"]["calls"] > 0
    assert (
        reply.usage is not None
        and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    )
    assert local_pool.status().sessions == 0


async def test_a_streamed_answer_sends_progress_then_the_solution(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    async with serving(make_solver(template, local_pool)) as base:
        stream = await client(base).chat.completions.create(model="critloop", messages=USER, stream=True)  # type: ignore[call-overload]
        chunks = [chunk async for chunk in stream]
    progress = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "Step 2: no (reward" in progress and "Rewriting step 2 (round 1)" in progress
    assert progress.index("Step 2: no") < progress.index("Rewriting step 2")
    # After the rewrite, the unchanged step 1 is reported as such, then the new steps.
    after = progress[progress.index("Rewrote step 2") :]
    assert after.index("Step 1: unchanged (yes, reward") < after.index("Step 2: yes (reward")
    assert content == join_steps(GOOD)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["critloop"]["stop_reason"] == "all_steps_pass"  # type: ignore[index]
    events = [c.model_extra["critloop"] for c in chunks[1:-2]]  # type: ignore[index]
    assert [e["event"] for e in events][:2] == ["solution", "step"] and events[0]["round"] == 0
    assert {"refining", "refined"} <= {e["event"] for e in events}
    # Each progress chunk carries the event's JSON form, exactly as parse_event reads it back.
    assert [parse_event(e).to_json() for e in events] == events


async def test_models_health_and_metrics(template: ChatTemplate, local_pool: SandboxPool) -> None:
    async with serving(make_solver(template, local_pool)) as base:
        models = await client(base).models.list()
        assert [m.id for m in models.data] == ["critloop"]
        await client(base).chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=base) as http:
            health = (await http.get("/health")).json()
            metrics = (await http.get("/metrics")).text
    assert (
        health["status"] == "ok" and health["runs_in_flight"] == 0 and health["sandbox"]["backend"] == "local"
    )
    assert 'critloop_requests_total{status="ok"} 1' in metrics
    assert 'critloop_stop_reason_total{reason="all_steps_pass"} 1' in metrics
    assert (
        "critloop_run_seconds_count 1" in metrics
        and 'critloop_tokens_total{role="critic",kind="completion"}' in metrics
    )


async def test_bearer_auth_when_a_key_is_configured(template: ChatTemplate, local_pool: SandboxPool) -> None:
    async with serving(make_solver(template, local_pool), api_key="s3cret") as base:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client(base, "wrong").chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
        assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        assert refused.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            await client(base, "wrong").models.list()
        reply = await client(base, "s3cret").chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == join_steps(GOOD)
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/health")).status_code == 200  # probes need no key


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "critloop", **fields}).encode()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "invalid request"),
        (_body(), 400, "messages: Field required"),
        (_body(messages=[]), 400, "messages"),
        (_body(model="gpt-4", messages=USER), 404, "model 'gpt-4' does not exist"),
        (_body(messages=[{"role": "system", "content": "hi"}]), 400, "no user message"),
        (_body(messages=USER * 65), 400, "at most 64 messages"),
        (_body(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
        (_body(messages=USER, critloop={"budget": {"max_rounds": -1}}), 400, "max_rounds"),
        (_body(messages=USER, critloop={"budget": {"samples": 100}}), 400, "samples"),
        (_body(messages=[{"role": "user", "content": "x" * 300_000}]), 413, "larger than"),
    ],
)
async def test_malformed_and_oversized_requests_get_openai_error_objects(  # type: ignore[no-untyped-def]
    template, local_pool, body: bytes, status: int, needle: str
) -> None:
    async with serving(make_solver(template, local_pool)) as base, httpx.AsyncClient(base_url=base) as http:
        response = await http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and "Traceback" not in response.text
    assert error["type"] == "invalid_request_error"
    # The OpenAI API types `code` as a string or null, never the HTTP status.
    assert error["code"] == ("model_not_found" if status == 404 else None)


async def test_saturation_answers_503_and_the_server_keeps_serving(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    gate = Gate(critic_by_content(wrong_15))
    async with serving(make_solver(template, local_pool, gate), max_concurrency=1, max_queue=0) as base:
        api = client(base)
        first = asyncio.create_task(api.chat.completions.create(model="critloop", messages=USER))  # type: ignore[arg-type]
        await gate.entered.wait()
        with pytest.raises(openai.APIStatusError) as busy:
            await api.chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
        assert busy.value.status_code == 503 and busy.value.body["code"] == "server_overloaded"  # type: ignore[index]
        gate.open.set()
        assert (await first).choices[0].message.content == join_steps(GOOD)
        again = await api.chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
        assert again.choices[0].message.content == join_steps(GOOD)


async def test_per_request_budgets_are_capped_by_the_server(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    async with serving(make_solver(template, local_pool), max_budget=Budget(max_rounds=0)) as base:
        reply = await client(base).chat.completions.create(
            model="critloop",
            messages=USER,
            extra_body={"critloop": {"budget": {"max_rounds": 5}}},  # type: ignore[arg-type]
        )
    extension = reply.model_extra["critloop"]  # type: ignore[index]
    assert extension["stop_reason"] == "max_rounds" and extension["rounds"] == []


async def test_a_client_that_disconnects_mid_stream_cancels_the_run_and_frees_its_sessions(
    template, local_pool
) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(critic_by_content(wrong_15))
    solver = make_solver(template, local_pool, gate)
    async with serving(solver) as base:
        async with httpx.AsyncClient(base_url=base) as http:
            body = {"model": "critloop", "messages": USER, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                # Keep the iterator: a dropped one is finalized, which closes the connection.
                lines = response.aiter_lines()
                async for line in lines:
                    if "reasoning_content" in line:
                        break  # the first progress chunk: the run is under way
                await gate.entered.wait()
                # The chains' sessions open beside the first analysis (which the gate holds).
                await until(lambda: local_pool.status().sessions > 0)
            # Leaving the block closed the connection mid-stream.
        await asyncio.wait_for(gate.cancelled.wait(), timeout=10)
        # Sessions still opening when the run was cancelled are released as they arrive.
        await until(lambda: local_pool.status().sessions == 0)
        await local_pool.settle()
        async with httpx.AsyncClient(base_url=base) as http:
            metrics = (await http.get("/metrics")).text
    assert (
        'critloop_requests_total{status="cancelled"} 1' in metrics and "critloop_runs_in_flight 0" in metrics
    )


async def test_the_readme_openai_client_example_runs_against_critloop_serve(  # type: ignore[no-untyped-def]
    template, local_pool
) -> None:
    import re
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
        if "from openai import OpenAI" in b
    ]
    async with serving(make_solver(template, local_pool)) as base:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code.replace("http://127.0.0.1:8080", base),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, errors = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, errors.decode()[-2000:]
    printed = out.decode().splitlines()
    assert "\n".join(printed[:-1]) == join_steps(GOOD)
    assert printed[-1].startswith("all_steps_pass [")


def test_the_serve_command_wires_config_key_and_limits_and_warns_without_auth(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn as uvicorn_module
    from typer.testing import CliRunner

    from critloop.cli import app

    served: list[dict[str, Any]] = []

    def fake_run(asgi: Any, **options: Any) -> None:
        served.append({"app": asgi, **options})

    monkeypatch.setattr(uvicorn_module, "run", fake_run)
    # Endpoints that are never called, on the in-repo tokenizer: nothing is fetched to serve.
    tokenizer = TOKENIZER_DIR
    endpoint = f'kind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\ntokenizer = "{tokenizer}"\n'
    config = tmp_path / "critloop.toml"
    config.write_text(
        f'[policy]\n{endpoint}[critic]\n{endpoint}[budget]\nmax_rounds = 2\n[sandbox]\nbackend = "local"\n'
    )
    runner = CliRunner()

    open_door = runner.invoke(app, ["serve", "--config", str(config), "--host", "0.0.0.0", "--port", "9999"])
    assert open_door.exit_code == 0, open_door.output
    assert "WARNING: serving on 0.0.0.0 with NO authentication" in open_door.output
    assert served[-1]["host"] == "0.0.0.0" and served[-1]["port"] == 9999

    monkeypatch.setenv("MY_KEY", "s3cret")
    args = ["serve", "--config", str(config), "--api-key-env", "MY_KEY", "--max-concurrency", "2"]
    locked = runner.invoke(app, args)
    assert locked.exit_code == 0 and "WARNING" not in locked.output
    state = served[-1]["app"].state
    assert state.solver.budget.max_rounds == 2
    assert state.settings.api_key == "s3cret" and state.settings.max_concurrency == 2
    assert state.settings.max_budget.max_rounds == 2

    missing = runner.invoke(app, ["serve", "--api-key-env", "NOT_SET_ANYWHERE"])
    assert missing.exit_code == 2 and "NOT_SET_ANYWHERE" in missing.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[budget]\nmax_rounds = -1\n")
    refused = runner.invoke(app, ["serve", "--config", str(bad)])
    assert refused.exit_code == 2 and "budget.max_rounds" in refused.output


# --------------------------------------------------------------------------- a tenant boundary

DOWN = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: connection refused at once


def _down() -> OpenAICompletionModel:
    return OpenAICompletionModel(DOWN, "internal-model", max_attempts=1)


def _solver_with_a_role_down(template: ChatTemplate, pool: SandboxPool, role: str) -> Solver:
    if role == "critic":
        return make_solver(template, pool, critic_model=_down())
    solver = make_solver(template, pool)
    solver.policy.writer = solver.refiner.writer = CompletionWriter(_down(), template, SamplingParams())
    return solver


@pytest.mark.parametrize("role", ["policy", "critic"])
async def test_an_upstream_failure_is_a_502_error_naming_the_role_not_the_url(
    template: ChatTemplate, local_pool: SandboxPool, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(_solver_with_a_role_down(template, local_pool, role)) as base:
        with pytest.raises(openai.InternalServerError) as failed:
            await client(base).chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
        # Streamed, the error arrives as the OpenAI API sends one mid-stream.
        stream = await client(base).chat.completions.create(model="critloop", messages=USER, stream=True)  # type: ignore[call-overload]
        with pytest.raises(openai.APIError) as streamed:
            async for _ in stream:
                pass
    assert failed.value.status_code == 502
    for error in (failed.value.body, streamed.value.body):
        assert (
            isinstance(error, dict) and error["code"] == "upstream_error" and error["type"] == "server_error"
        )
        assert f"the {role} model" in error["message"]
        assert "127.0.0.1" not in str(error) and "internal-model" not in str(error)
    # The operator sees the details in the log.
    assert any("127.0.0.1:9" in record.getMessage() for record in caplog.records)


async def test_include_usage_sends_the_usage_on_a_last_chunk_without_choices(
    template: ChatTemplate, local_pool: SandboxPool
) -> None:
    async with serving(make_solver(template, local_pool)) as base:
        stream = await client(base).chat.completions.create(  # type: ignore[call-overload]
            model="critloop", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        with_usage = [chunk async for chunk in stream]
        stream = await client(base).chat.completions.create(model="critloop", messages=USER, stream=True)  # type: ignore[call-overload]
        without = [chunk async for chunk in stream]
    last = with_usage[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(chunk.usage is None and chunk.choices for chunk in with_usage[:-1])
    assert with_usage[-2].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None and chunk.choices for chunk in without)


class _NoEngine(SandboxBackend):
    """A backend whose kernels never start (a Docker engine gone away)."""

    name = "docker"
    isolated = True

    async def start_kernel(self, on_close: Any) -> Any:
        raise SandboxUnavailableError("Docker engine at unix:///var/run/docker.sock is unreachable")

    async def stop_kernel(self, kernel: Any) -> None:
        return None


async def test_a_sandbox_failure_is_a_503_error(template: ChatTemplate) -> None:
    solver = make_solver(template, SandboxPool(backend=_NoEngine()))
    result = await solver.asolve(PROBLEM)
    assert result.stop_reason == "error" and result.error_source == "sandbox"
    async with serving(solver) as base:
        with pytest.raises(openai.InternalServerError) as failed:
            await client(base).chat.completions.create(model="critloop", messages=USER)  # type: ignore[arg-type]
    assert failed.value.status_code == 503
    error = failed.value.body
    assert isinstance(error, dict) and error["code"] == "sandbox_unavailable"
    assert "docker.sock" not in str(error)
