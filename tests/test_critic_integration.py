"""The critic end to end on real components: the embedded model, the Docker sandbox, real
ProcessBench records, the CLI, and a real llama.cpp server's logprobs. Structure, not quality:
SmolLM2-135M is no critic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.critic_protocol import ANALYZE_PREFIX
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionResult, SamplingParams
from critloop.tools.openai_client import OpenAICompletionModel

PROCESSBENCH = Path(__file__).parent / "data" / "processbench" / "gsm8k.json"  # see data/SOURCES.md
CRITLOOP = str(Path(sys.executable).with_name("critloop"))


def shortest_records(n: int) -> list[dict]:
    records = json.loads(PROCESSBENCH.read_text())
    return sorted(records, key=lambda r: (len(r["steps"]), r["id"]))[:n]


def run_cli(args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """``critloop ARGS`` in a subprocess, its output captured (the caller checks the exit code)."""
    return subprocess.run([CRITLOOP, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.docker
@pytest.mark.model
def test_eval_processbench_cli_on_the_embedded_model_and_docker(tmp_path: Path) -> None:
    records = shortest_records(2)
    data = tmp_path / "gsm8k.json"
    data.write_text(json.dumps(records))
    config = tmp_path / "critloop.toml"
    config.write_text(
        '[critic]\nkind = "embedded"\nprofile = "instruct"\nsamples = 2\n'
        "max_critique_tokens = 200\ncode_rounds = 1\nforced_judgement_tokens = 8\n"
        '[sandbox]\nbackend = "docker"\npool_size = 1\n'
    )
    out = tmp_path / "out.jsonl"
    args = ["eval", "processbench", "--split", "gsm8k", "--data", str(data), "--config", str(config)]
    args += ["--limit", "2", "--out", str(out)]
    done = run_cli(args, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith("F1 gsm8k: ") and lines[-1].startswith("F1 average: ")
    float(lines[-1].split(": ")[1])
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in records)
    for result, record in zip(
        sorted(results, key=lambda r: r["id"]), sorted(records, key=lambda r: r["id"]), strict=True
    ):
        assert result["error"] is None
        assert result["label"] == record["label"]
        assert -1 <= result["prediction"] < len(record["steps"])
        assert 1 <= len(result["step_rewards"]) <= len(record["steps"])
        assert all(0.0 <= r <= 1.0 for r in result["step_rewards"])
        for step, chains in enumerate(result["critiques"]):
            assert len(chains) == 2
            assert all(c["text"].startswith(ANALYZE_PREFIX.format(k=step + 1)) for c in chains)
    # Resuming a finished run runs nothing and prints the same summary.
    again = run_cli(args, timeout=300)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == lines[-1]
    assert len(out.read_text().splitlines()) == 2


class RecordingModel(OpenAICompletionModel):
    results: list[tuple[SamplingParams, CompletionResult]]

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        result = await super().complete(prompt, params)
        self.results.append((params, result))
        return result


async def test_critic_through_a_llama_cpp_server_with_real_logprobs(
    llama_server: str, embedded_template: ChatTemplate, docker_pool: SandboxPool
) -> None:
    record = shortest_records(1)[0]
    model = RecordingModel(llama_server, "smollm2", timeout_seconds=300)
    model.results = []
    config = CriticConfig(
        profile="instruct", max_critique_tokens=160, code_rounds=1, forced_judgement_tokens=8
    )
    critic = GenPRMCritic(model, embedded_template, docker_pool, config)
    try:
        report = await critic.critique(record["problem"], record["steps"], scan="all")
    finally:
        await model.aclose()
    assert len(report.step_reports) == len(record["steps"])
    assert model.results, "the critic called the server"
    asked = [result for params, result in model.results if params.logprobs is not None]
    # The analysis stage asks for none (no judgement lies there); every later stage does.
    assert 0 < len(asked) < len(model.results)
    for params, result in model.results:
        tokens = result.choices[0].tokens
        if params.logprobs is None:
            assert tokens is None, "logprobs the critic did not ask for"
        else:
            assert tokens, "the server returned per-token logprobs"
            assert all(1 <= len(t.top) <= 21 for t in tokens)
    for step in report.step_reports:
        for chain in step.chains:
            assert 0.0 <= chain.reward <= 1.0
            if chain.verdict != "none":  # from the logprobs (a bound where the other answer is not listed)
                assert chain.reward_source in ("logprobs", "logprobs_bound")
    json.loads(report.model_dump_json())


class SeededModel(OpenAICompletionModel):
    """Sends a fixed seed: llama.cpp then samples the same text for the same prompt."""

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        return await super().complete(prompt, params.model_copy(update={"seed": 1234}))


async def test_the_cascade_through_a_llama_cpp_server(
    llama_server: str, embedded_template: ChatTemplate, docker_pool: SandboxPool
) -> None:
    """Every tier on a real model's logprobs: with a tau no reward meets, each step climbs to the
    code tier; with tau = 0.5 every direct judgement with a verdict decides."""
    record = shortest_records(1)[0]
    model = SeededModel(llama_server, "smollm2", timeout_seconds=300)
    options = {
        "profile": "instruct",
        "max_critique_tokens": 160,
        "code_rounds": 1,
        "forced_judgement_tokens": 8,
    }
    try:
        climbing = GenPRMCritic(
            model, embedded_template, docker_pool, CriticConfig(cascade=True, tau=1e-300, **options)
        )
        report = await climbing.critique(record["problem"], record["steps"], scan="all")
        glance = GenPRMCritic(
            model, embedded_template, docker_pool, CriticConfig(cascade=True, tau=0.5, **options)
        )
        quick = await glance.critique(record["problem"], record["steps"], scan="all")
    finally:
        await model.aclose()
    assert len(report.step_reports) == len(quick.step_reports) == len(record["steps"])
    for step in report.step_reports:
        [chain] = step.chains
        # The code tier continues the analysis tier's analysis; one whose analysis did not close
        # stays the forced judgement of the analysis tier.
        assert step.tier == chain.tier and chain.tier in ("analysis", "code")
        assert chain.text.startswith(ANALYZE_PREFIX.format(k=step.index + 1))
        assert chain.text.count("<analyze>") == 1
        assert ("<verify>" in chain.text) == (chain.tier == "code")
        assert chain.usage.calls >= 3, "a direct judgement, then the analysis tier's calls, at least"
        assert 0.0 <= chain.reward <= 1.0
    for step in quick.step_reports:
        [chain] = step.chains
        if chain.verdict == "none":  # a reward of 0.5 is never sure
            assert step.tier != "direct"
            continue
        assert step.tier == "direct" and chain.usage.calls == 1 and chain.code_runs == ()
        assert chain.text.startswith("<output>\n**Judgement**: $\\boxed")
        assert chain.reward_source in ("logprobs", "logprobs_bound")
