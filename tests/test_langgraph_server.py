"""The graph served by the real LangGraph server (``langgraph dev``, langgraph-cli[inmem]), driven
by its client (``langgraph_sdk``) as Studio, the SDK and chat front ends drive it: threads reused
for new problems, the custom stream, and a bad input. The models are a scripted OpenAI server."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph_sdk import get_client
from model_fixtures import TOKENIZER_DIR, stop_process
from openai_script import SOLUTION, policy_and_critic
from scripted_server import ScriptedServer

ROOT = Path(__file__).resolve().parents[1]
LANGGRAPH = Path(sys.executable).parent / "langgraph"
OTHER = "What is 7 * 6?"
OTHER_SOLUTION = "7 * 6 = 42.\n\nThe answer is $\\boxed{42}$."

SERVE = ("--no-browser", "--no-reload")

pytestmark = pytest.mark.slow


def _solution(prompt: str) -> str:
    return OTHER_SOLUTION if OTHER in prompt else SOLUTION


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ScriptedServer]]:
    """``langgraph dev`` serving langgraph.json's graph, its models a scripted OpenAI server."""
    work = tmp_path_factory.mktemp("langgraph")
    with ScriptedServer(default=policy_and_critic(solution=_solution)) as models:
        endpoint = (
            f'kind = "openai"\nbase_url = "{models.url}/v1"\nmodel = "scripted"\n'
            f'tokenizer = "{TOKENIZER_DIR}"\n'
        )
        config = work / "critloop.toml"
        config.write_text(
            f'[policy]\n{endpoint}\n[critic]\n{endpoint}profile = "genprm"\n\n'
            '[budget]\nmax_rounds = 1\n\n[sandbox]\nbackend = "local"\npool_size = 1\n'
        )
        port = _free_port()
        env = {
            **os.environ,
            "CRITLOOP_CONFIG": str(config),
            "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            "LANGSMITH_TRACING": "false",
        }
        log = (work / "server.log").open("w")
        process = subprocess.Popen(
            [str(LANGGRAPH), "dev", "--config", str(ROOT / "langgraph.json"), "--port", str(port), *SERVE],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(_wait_until_up(url, process, work / "server.log"))
            yield url, models
        finally:
            stop_process(process)
            log.close()


async def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    client = get_client(url=url)
    for _ in range(1200):  # 60 s: the server imports langgraph-api, then the graph on first use
        if process.poll() is not None:
            pytest.fail(f"langgraph dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            await client.assistants.search()
            return
        except Exception:  # noqa: BLE001 - not listening yet
            await asyncio.sleep(0.05)
    pytest.fail(f"langgraph dev did not come up in 60 s:\n{log.read_text()[-3000:]}")


def _policy_prompts(models: ScriptedServer) -> list[str]:
    import json

    prompts = [json.loads(r.body)["prompt"] for r in models.requests]
    return [p for p in prompts if p.rstrip().endswith("<|im_start|>assistant")]


async def test_a_thread_answers_each_new_problem_with_a_new_run(served: tuple[str, ScriptedServer]) -> None:
    url, models = served
    client = get_client(url=url)
    thread = await client.threads.create()
    first: Any = await client.runs.wait(
        thread["thread_id"], "critloop", input={"problem": "What is 2 + 3 * 4?"}
    )
    assert first["answer"] == "14" and first["stop_reason"] == "all_steps_pass"
    requests_before = len(models.requests)

    second: Any = await client.runs.wait(thread["thread_id"], "critloop", input={"problem": OTHER})
    assert second["problem"] == OTHER and second["answer"] == "42"
    assert second["final_steps"] == OTHER_SOLUTION.split("\n\n")
    assert second["stop_reason"] == "all_steps_pass" and second["rounds"] == []
    # One policy call for the new problem, and the critic judged the new solution.
    assert [OTHER in p for p in _policy_prompts(models)].count(True) == 1
    assert second["usage"]["policy"]["calls"] == 1
    assert second["usage"]["critic"]["calls"] >= 2
    assert len(models.requests) - requests_before == 1 + second["usage"]["critic"]["calls"]
    assert second["last_report"]["problem"] == OTHER


async def test_the_custom_stream_carries_the_events_json(served: tuple[str, ScriptedServer]) -> None:
    url, _ = served
    client = get_client(url=url)
    custom, values = [], []
    async for part in client.runs.stream(
        None, "critloop", input={"problem": OTHER}, stream_mode=["custom", "values"]
    ):
        if part.event == "custom":
            custom.append(part.data)
        elif part.event == "values":
            values.append(part.data)
    assert custom[0] == {"event": "solution", "steps": OTHER_SOLUTION.split("\n\n"), "round": 0}
    assert [(e["event"], e["index"], e["verdict"], e["flagged"]) for e in custom[1:]] == [
        ("step", 0, "yes", False),
        ("step", 1, "yes", False),
    ]
    assert values[-1]["answer"] == "42"


async def test_a_misspelled_input_key_fails_the_run_naming_the_key(
    served: tuple[str, ScriptedServer],
) -> None:
    url, _ = served
    client = get_client(url=url)
    thread = await client.threads.create()
    # A thread that solved a problem before: the misspelled input must not re-run that one.
    await client.runs.wait(thread["thread_id"], "critloop", input={"problem": OTHER})
    run = await client.runs.create(thread["thread_id"], "critloop", input={"problm": OTHER})
    joined = await client.runs.join(thread["thread_id"], run["run_id"])
    done = await client.runs.get(thread["thread_id"], run["run_id"])
    assert done["status"] == "error"
    assert joined["__error__"]["error"] == "ConfigError"  # type: ignore[index]
    assert "needs the key 'problem'" in joined["__error__"]["message"]  # type: ignore[index]
