"""`critloop solve` as a user runs it: bad input, the live view and --json on scripted models, and
one real loop on the embedded model."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import pytest
from conftest import docker_problem
from critic_script import DECISIONS
from typer.testing import CliRunner

from critloop.agent.budget import StopReason
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.critic_protocol import FORCED_JUDGEMENT, OUTPUT_PREFIX
from critloop.agent.writer import Written
from critloop.cli import app
from critloop.config import CritloopConfig
from critloop.errors import ConfigError, CritloopError, ModelEndpointError, SandboxUnavailableError
from critloop.solver import Solver
from critloop.tools.chat_template import ChatMessage, ChatTemplate
from critloop.tools.completion import SamplingParams
from critloop.tools.embedded import CachedModel
from critloop.tools.fakes import ScriptedCompletionModel

CRITLOOP = str(Path(sys.executable).with_name("critloop"))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "problems"
PROBLEM = "What is 2 + 3 * 4?"
WRONG = ["First, 3 * 4 = 12.", "Then 2 + 12 = 15.", "The answer is \\boxed{15}."]
RESULT_KEYS = {
    "problem",
    "answer",
    "final_steps",
    "initial_steps",
    "step_rewards",
    "rounds",
    "stop_reason",
    "error",
    "error_source",
    "last_report",
    "usage",
    "seconds",
}

runner = CliRunner()


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    """`critloop solve` freezes the heap after start-up; in-process runs give it back."""
    yield
    gc.unfreeze()


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["solve", *args])


# --------------------------------------------------------------------------- bad input


def test_version_prints_the_version() -> None:
    from critloop import __version__

    done = runner.invoke(app, ["--version"])
    assert done.exit_code == 0 and done.stdout.strip() == __version__


def test_an_empty_problem_exits_2_without_a_traceback() -> None:
    done = invoke("   ")
    assert done.exit_code == 2
    assert "the problem is empty" in done.stderr
    assert "Traceback" not in done.output


def test_no_problem_at_all_exits_2() -> None:
    done = invoke()
    assert done.exit_code == 2
    assert "give the problem as an argument" in done.stderr


def test_a_missing_file_exits_2_and_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    done = invoke("--file", str(missing))
    assert done.exit_code == 2
    assert f"cannot read {missing}" in done.stderr
    assert "No such file" in done.stderr


def test_an_empty_file_exits_2(tmp_path: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    done = invoke("--file", str(blank))
    assert done.exit_code == 2
    assert "the problem is empty" in done.stderr and "blank.txt" in done.stderr


def test_a_problem_and_a_file_together_exit_2(tmp_path: Path) -> None:
    done = invoke(PROBLEM, "--file", str(EXAMPLES / "arithmetic.txt"))
    assert done.exit_code == 2
    assert "not both" in done.stderr


def test_invalid_toml_exits_2_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[policy\nkind = 'openai'\n")
    done = invoke(PROBLEM, "--config", str(config))
    assert done.exit_code == 2
    assert f"{config} is not valid TOML" in done.stderr
    assert "Traceback" not in done.output


def test_a_bad_config_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "critloop.toml"
    config.write_text("[critic]\nsamples = 0\n")
    done = invoke(PROBLEM, "--config", str(config))
    assert done.exit_code == 2
    assert "critic.samples" in done.stderr


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    done = invoke(PROBLEM, "--config", str(tmp_path / "absent.toml"))
    assert done.exit_code == 2
    assert "cannot read config file" in done.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--mode", "rewrite", "--mode must be step or full"),
        ("--sandbox", "podman", "--sandbox must be auto, docker or local"),
        ("--critic-profile", "genius", "critic.profile"),
        ("--critic-logprobs", "softmax", "--critic-logprobs must be raw or processed"),
    ],
)
def test_bad_flag_values_exit_2(flag: str, value: str, message: str) -> None:
    done = invoke(PROBLEM, flag, value)
    assert done.exit_code == 2
    assert message in done.stderr


def test_tau_without_the_cascade_exits_2() -> None:
    done = invoke(PROBLEM, "--tau", "0.2")
    assert done.exit_code == 2
    assert "--tau tunes the cascade, which is off: add --cascade" in done.stderr


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ConfigError("critic.model: no such model"), 2, "error: critic.model: no such model"),
        (SandboxUnavailableError("no Docker engine answers"), 1, "error: no Docker engine answers"),
        (KeyboardInterrupt(), 130, ""),
    ],
)
def test_errors_map_to_exit_codes_in_one_place(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, code: int, message: str
) -> None:
    def fail(cls: type[Solver], config: Any = None, **_: Any) -> Solver:
        raise error

    monkeypatch.setattr(Solver, "from_config", classmethod(fail))
    done = invoke(PROBLEM)
    assert (done.exit_code, done.stderr.strip()) == (code, message)


def test_flags_override_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "critloop.toml"
    config.write_text("[budget]\nmax_rounds = 5\nmax_tokens = 1000\n\n[sandbox]\npool_size = 1\n")
    seen: list[CritloopConfig] = []

    def capture(cls: type[Solver], config: Any = None, **_: Any) -> Solver:
        seen.append(config)
        raise CritloopError("captured")

    monkeypatch.setattr(Solver, "from_config", classmethod(capture))
    done = invoke(
        PROBLEM,
        "--config",
        str(config),
        "--policy-url",
        "http://127.0.0.1:8000/v1",
        "--policy-model",
        "Qwen/Qwen2.5-Math-7B-Instruct",
        "--critic-url",
        "http://127.0.0.1:8001/v1",
        "--critic-model",
        "GenPRM/GenPRM-7B",
        "--critic-profile",
        "instruct",
        "--critic-logprobs",
        "processed",
        "--samples",
        "4",
        "--cascade",
        "--tau",
        "0.2",
        "--max-rounds",
        "2",
        "--max-seconds",
        "30",
        "--mode",
        "full",
        "--sandbox",
        "local",
    )
    assert done.exit_code == 1 and "captured" in done.stderr
    [cfg] = seen
    assert (cfg.policy.kind, cfg.policy.base_url, cfg.policy.model) == (
        "openai",
        "http://127.0.0.1:8000/v1",
        "Qwen/Qwen2.5-Math-7B-Instruct",
    )
    assert (cfg.critic.kind, cfg.critic.base_url, cfg.critic.model) == (
        "openai",
        "http://127.0.0.1:8001/v1",
        "GenPRM/GenPRM-7B",
    )
    assert (cfg.critic.profile, cfg.critic.samples, cfg.critic.logprobs) == ("instruct", 4, "processed")
    assert (cfg.critic.cascade, cfg.critic.tau) == (True, 0.2)
    assert (cfg.budget.max_rounds, cfg.budget.max_tokens, cfg.budget.max_seconds) == (2, 1000, 30.0)
    assert (cfg.refine.mode, cfg.sandbox.backend, cfg.sandbox.pool_size) == ("full", "local", 1)


# --------------------------------------------------------------------------- scripted loop


class ScriptedWriter:
    """Policy and refiner: a solution whose second step is wrong, then its correction."""

    async def write(
        self, messages: Sequence[ChatMessage], *, prefix: str | None = None, max_tokens: int | None = None
    ) -> Written:
        if prefix is not None:
            text = "The answer is \\boxed{14}."
        elif messages[-1]["content"].startswith(PROBLEM):
            text = "\n\n".join(WRONG)
        else:
            text = "Then 2 + 12 = 14."
        return Written(text=text, finish_reason="stop", prompt_tokens=20, completion_tokens=8, seconds=0.01)


def scripted_critic(*, down: bool = False) -> ScriptedCompletionModel:
    """A GenPRM that says No to a step claiming ``= 15`` and Yes to every other step."""

    def respond(prompt: str, params: SamplingParams) -> str:
        if down:
            raise ModelEndpointError("http://127.0.0.1:9/v1: connection refused after 5 attempts")
        wrong = "= 15" in prompt[prompt.rfind("<|im_start|>user") :]
        if prompt.endswith((OUTPUT_PREFIX, FORCED_JUDGEMENT)):
            return "{No}$\n</output>\n" if wrong else "{Yes}$\n</output>\n"
        analysis = "2 + 12 is 14, not 15." if wrong else "The arithmetic checks out."
        return f"{analysis}\n</analyze>\nnot reached"

    return ScriptedCompletionModel(respond, alternatives=DECISIONS)


@pytest.fixture
def scripted(template: ChatTemplate, monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """`critloop solve` runs on scripted models (no sandbox: the critic does not write code).
    Set ``["critic_down"]`` to make the critic's endpoint fail."""
    down = {"critic_down": False}

    def from_config(cls: type[Solver], config: Any = None, **_: Any) -> Solver:
        options = {"cascade": config.critic.cascade, "tau": config.critic.tau}
        critic = GenPRMCritic(
            scripted_critic(down=down["critic_down"]),
            template,
            None,
            CriticConfig(profile="genprm", **options),
        )
        return Solver(policy=ScriptedWriter(), critic=critic, budget=config.budget)

    monkeypatch.setattr(Solver, "from_config", classmethod(from_config))
    return down


def test_the_live_view_shows_the_loop_and_the_result(scripted: dict[str, bool]) -> None:
    done = invoke("--file", str(EXAMPLES / "arithmetic.txt"), "--max-rounds", "2")
    assert done.exit_code == 0, done.output
    out = done.stdout
    lines = [line.strip() for line in out.splitlines()]
    assert "problem  What is 2 + 3 * 4?" in lines
    assert any(line.startswith("initial solution · 3 steps") for line in lines)
    step2 = next(line for line in lines if line.startswith("step 2") and "flagged" in line)
    # The scripted critic's raw logprobs (Yes -0.1 / No -2.4, and the reverse) at T = 0.6.
    assert "0.06 no" in step2 and "█" in step2 and "░" in step2
    assert "2 + 12 is 14, not 15." in out
    assert "step 3: not critiqued (the scan stops at the first flagged step)" in lines
    assert any(line.startswith("round 1/2 · refining step 2") for line in lines)
    assert any("flagged" in line and "Then 2 + 12 = 15." in line for line in lines)
    assert any("rewrite" in line and "Then 2 + 12 = 14." in line for line in lines)
    assert any(line.startswith("revised solution (round 1/2) · 3 steps") for line in lines)
    assert any(line.startswith("step 1") and "0.98 yes" in line and "(reused)" in line for line in lines)
    final = next(i for i, line in enumerate(lines) if line.startswith("final solution ─"))
    assert lines[final + 1 : final + 4] == [
        "step 1  0.98 First, 3 * 4 = 12.",
        "step 2  0.98 Then 2 + 12 = 14.",
        "step 3  0.98 The answer is \\boxed{14}.",
    ]
    assert "answer: 14" in lines
    assert "stop reason: all_steps_pass — every step passed the critic" in lines
    usage = {line.split()[1]: line.split()[3] for line in lines if line[:1] == "│"}
    assert usage == {"policy": "2", "critic": "8", "refiner": "1"}
    assert "rounds: 1/2" in out
    assert done.stderr == ""


def test_with_the_cascade_sure_steps_are_judged_directly(scripted: dict[str, bool]) -> None:
    done = invoke("--file", str(EXAMPLES / "arithmetic.txt"), "--max-rounds", "2", "--cascade", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["stop_reason"] == "all_steps_pass" and result["answer"] == "14"
    # The scripted critic is sure of every step at a glance: one call per step critiqued (two
    # before the flagged step 2 is rewritten, then step 2 again and step 3).
    assert result["usage"]["critic"]["calls"] == 4
    steps = result["last_report"]["step_reports"]
    assert [s["tier"] for s in steps] == ["direct"] * 3
    # The step was flagged without an analysis: the refiner is shown none.
    assert result["rounds"][0]["critique"] == ""
    shown = invoke("--file", str(EXAMPLES / "arithmetic.txt"), "--cascade", "--tau", "0.05")
    assert shown.exit_code == 0, shown.output
    assert "cascade with tau 0.05" in shown.stdout
    lines = [line.strip() for line in shown.stdout.splitlines()]
    # At tau 0.05 the No of step 2 (a reward of 0.06) is not sure enough: the analysis decides.
    assert "step 1  ████████████████████ 0.98 yes  (judged directly)" in lines
    step2 = next(line for line in lines if line.startswith("step 2") and "flagged" in line)
    assert step2.endswith("0.06 no  flagged  (after analysis)")
    assert "critique 2 + 12 is 14, not 15." in lines


def test_json_prints_exactly_the_result(scripted: dict[str, bool]) -> None:
    done = invoke(PROBLEM, "--json", "--max-rounds", "1")
    assert done.exit_code == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == RESULT_KEYS
    assert (result["answer"], result["stop_reason"], result["error"]) == ("14", "all_steps_pass", None)
    assert result["initial_steps"] == WRONG
    assert result["final_steps"] == [WRONG[0], "Then 2 + 12 = 14.", "The answer is \\boxed{14}."]
    assert [round(r, 2) for r in result["step_rewards"]] == [0.98, 0.98, 0.98]
    [record] = result["rounds"]
    assert (record["round"], record["index"], record["flagged_step"]) == (1, 1, WRONG[1])
    assert record["rewrite"] == "Then 2 + 12 = 14." and "14, not 15" in record["critique"]
    assert result["usage"]["policy"]["calls"] == 2 and result["usage"]["refiner"]["calls"] == 1


def test_an_infrastructure_failure_exits_1_with_the_trace(scripted: dict[str, bool]) -> None:
    scripted["critic_down"] = True
    done = invoke(PROBLEM, "--json", "--max-rounds", "1")
    assert done.exit_code == 1
    result = json.loads(done.stdout)
    assert result["stop_reason"] == "error" and result["initial_steps"] == WRONG
    assert "ModelEndpointError" in result["error"]
    assert "infrastructure failure" in done.stderr and "connection refused" in done.stderr
    assert "Traceback" not in done.output


# --------------------------------------------------------------------------- the embedded model


def test_json_on_the_embedded_model(embedded: CachedModel, tmp_path: Path) -> None:
    """A real loop as a user runs it: the embedded SmolLM2 as policy, critic and refiner."""
    config = tmp_path / "critloop.toml"
    config.write_text(
        "[policy]\nmax_tokens = 128\n\n"
        "[critic]\nmax_critique_tokens = 128\ncode_rounds = 1\nforced_judgement_tokens = 8\n\n"
        "[refine]\nmax_step_tokens = 64\n\n"
        "[sandbox]\npool_size = 1\n"
    )
    sandbox = "docker" if docker_problem() is None else "local"
    done = subprocess.run(
        [
            CRITLOOP,
            "solve",
            "--json",
            "--config",
            str(config),
            "--max-rounds",
            "1",
            "--samples",
            "1",
            "--sandbox",
            sandbox,
            PROBLEM,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout holds the one JSON object and nothing else
    assert set(result) >= RESULT_KEYS
    assert result["problem"] == PROBLEM
    assert result["answer"] is None or isinstance(result["answer"], str)
    assert result["stop_reason"] in set(get_args(StopReason)) - {"error"}
    assert isinstance(result["rounds"], list) and len(result["rounds"]) <= 1
    for record in result["rounds"]:
        assert {"round", "index", "flagged_step", "reward", "critique", "rewrite", "steps"} <= set(record)
    assert result["final_steps"] and all(isinstance(s, str) for s in result["final_steps"])
    assert result["initial_steps"] and all(isinstance(s, str) for s in result["initial_steps"])
    assert all(isinstance(r, float) for r in result["step_rewards"])
    usage = result["usage"]
    assert usage["policy"]["calls"] >= 1 and usage["critic"]["calls"] >= 1
    assert all(
        set(usage[role]) == {"calls", "prompt_tokens", "completion_tokens", "seconds"}
        for role in ("policy", "critic", "refiner")
    )
    assert result["seconds"] > 0
