"""OpenTelemetry traces of a run, in the OpenInference conventions: the span tree of a scripted
refine run with a flagged step and one refinement (an in-memory exporter), the export over OTLP
to a real HTTP endpoint from the config's ``[tracing]`` table, and no OpenTelemetry when off."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import TOKENIZER_DIR
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from refine_script import BAD, GOOD, PROBLEM, critic_by_content, policy_script, wrong_15
from scripted_server import Recorded, Reply, ScriptedServer

from critloop import Solver
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.writer import CompletionWriter
from critloop.config import load_config
from critloop.sandbox import SandboxPool
from critloop.tools import tracing
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(tracing.TracingConfig(max_chars=200), provider=provider)
    yield exporter
    tracing.disable()


def kind(span: ReadableSpan) -> Any:
    return (span.attributes or {}).get("openinference.span.kind")


def children(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    ctx = parent.get_span_context()
    assert ctx is not None
    return sorted(
        (s for s in all_spans if s.parent is not None and s.parent.span_id == ctx.span_id),
        key=lambda s: s.start_time or 0,
    )


async def test_a_run_is_one_tree_of_steps_model_calls_code_and_rounds(
    spans: InMemorySpanExporter, template: ChatTemplate, local_pool: SandboxPool
) -> None:
    policy, critic_model = policy_script(), critic_by_content(wrong_15)
    critic = GenPRMCritic(critic_model, template, local_pool, CriticConfig(profile="genprm", samples=1))
    writer = CompletionWriter(policy, template, SamplingParams(max_tokens=256))
    result = await Solver(policy=writer, critic=critic).asolve(PROBLEM)
    assert result.stop_reason == "all_steps_pass" and result.final_steps == GOOD
    finished = list(spans.get_finished_spans())
    (root,) = [s for s in finished if s.parent is None]
    assert root.name == "critloop.solve" and kind(root) == "CHAIN"
    attributes = root.attributes or {}
    assert attributes["input.value"] == PROBLEM and attributes["output.value"] == "14"
    assert attributes["critloop.stop_reason"] == "all_steps_pass" and attributes["critloop.rounds"] == 1
    top = children(finished, root)
    # The solution, the critique up to the flagged step 2, the round, then steps 2 and 3 again.
    assert [s.name for s in top] == ["policy.write", "critic.step", "critic.step", "refine.round"] + [
        "critic.step"
    ] * 2
    assert kind(top[0]) == "LLM" and (top[0].attributes or {})["output.value"] == "\n\n".join(BAD)
    steps = [s for s in top if s.name == "critic.step"]
    assert all(kind(s) == "EVALUATOR" for s in steps)
    assert [(s.attributes or {})["critloop.step.index"] for s in steps] == [0, 1, 1, 2]
    assert [(s.attributes or {})["critloop.step.flagged"] for s in steps] == [False, True, False, False]
    flagged = steps[1].attributes or {}
    assert flagged["input.value"] == BAD[1] and flagged["critloop.step.reward"] < 0.5
    assert flagged["critloop.step.verdicts.no"] == 1
    # Under a step: the critic's model calls (token counts) and its code run (code and output).
    under = children(finished, steps[1])
    calls = [s for s in under if kind(s) == "LLM"]
    assert calls and all(s.name == "critic.complete" for s in calls)
    assert all((s.attributes or {})["llm.token_count.completion"] > 0 for s in calls)
    assert all((s.attributes or {})["llm.model_name"] == "critic" for s in calls)
    (run,) = [s for s in under if kind(s) == "TOOL"]
    assert (run.attributes or {})["tool.name"] == "python_sandbox"
    assert (run.attributes or {})["critloop.code.status"] == "ok"
    assert "input.value" in (run.attributes or {}) and "output.value" in (run.attributes or {})
    # The round: the rewritten step, with the refiner's call and the policy's continuation.
    refine = top[3]
    assert kind(refine) == "CHAIN" and (refine.attributes or {})["output.value"] == "Then 2 + 12 = 14."
    assert [s.name for s in children(finished, refine)] == ["refiner.write", "policy.write"]
    # Texts are cut to max_chars.
    prompts = [str((s.attributes or {}).get("input.value", "")) for s in finished]
    assert max(len(p) for p in prompts) <= 200 + len("... (99999 more characters)")
    assert any("more characters)" in p for p in prompts)


def test_the_config_turns_tracing_on_and_spans_reach_an_otlp_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real OTLP/HTTP export: ``Solver.from_config`` with ``[tracing]`` sends the spans of a
    run (here: one that fails fast on a missing model server) to the endpoint named."""
    received: list[Recorded] = []

    def collect(request: Recorded) -> Reply:
        received.append(request)
        return Reply(200, b"")

    config = tmp_path / "critloop.toml"
    with ScriptedServer(default=collect) as collector:
        endpoint = (
            f'kind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\ntokenizer = "{TOKENIZER_DIR}"\n'
            "max_attempts = 1\n"
        )
        config.write_text(
            f'[policy]\n{endpoint}\n[critic]\n{endpoint}\n[sandbox]\nbackend = "local"\npool_size = 1\n'
            f'[tracing]\nendpoint = "{collector.url}/v1/traces"\nservice_name = "critloop-test"\n'
            'headers = { X-Key = "Bearer ${CRITLOOP_TEST_KEY}" }\n'
        )
        monkeypatch.setenv("CRITLOOP_TEST_KEY", "s3cret")
        assert load_config(config).tracing.active
        try:
            result = Solver.from_config(config).solve(PROBLEM)
            assert result.stop_reason == "error" and result.error_source == "policy"
        finally:
            tracing.disable()  # flushes the batch of spans to the collector
    (export,) = [r for r in received if r.path == "/v1/traces"]
    assert export.headers.get("content-type") == "application/x-protobuf"
    assert export.headers.get("x-key") == "Bearer s3cret"  # the variable named in the config
    assert (
        b"critloop.solve" in export.body
        and b"policy.write" in export.body
        and b"critloop-test" in export.body
    )


def test_off_it_never_imports_opentelemetry() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # any import of it fails\n"
        "from critloop.tools import tracing\n"
        "with tracing.span('x', 'CHAIN', {'input.value': 'y'}) as s:\n"
        "    assert s is None and not tracing.enabled()\n"
        "assert tracing.start('x', 'CHAIN') is None\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr[-2000:]
