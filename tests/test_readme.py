"""The README's Python examples run as written and print what their comments say, and its graph
diagram is the one the compiled graph draws."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from critloop import SolveResult, StopReason, load_config
from critloop.graphs.refine import build_refine_graph
from critloop.graphs.synth import SynthConfig

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)
STOP_REASONS = set(get_args(StopReason))

# Each block is recognised by a line of its own and checked one way.
EXACT = {
    "sympy.solve(x**2 - 5*x + 6, x)": "ok [2, 3]\nx\ntimeout True\n",
    "tool = PythonSandboxTool()": "385\n",
}
THREE_LINES = 'Solver.from_config(budget=Budget(max_rounds=1, max_seconds=90)).solve("What is 2 + 3 * 4?")'
STREAMING = 'Solver.from_config("critloop.toml") as solver'
# These need servers this suite does not run (vLLM with langchain-openai; `langgraph dev`): they
# are compiled, not run. The langgraph-sdk one was run by hand against `langgraph dev`.
NEEDS_SERVERS = {
    "from langchain_openai import ChatOpenAI": "a policy and a GenPRM server, and langchain-openai",
    "from langgraph_sdk import get_client": "a `langgraph dev` server",
    "from trl import SFTConfig, SFTTrainer": "a 7B model from the hub (test_train.py trains the small one)",
}
# Run by other suites, against servers they start.
RUN_ELSEWHERE = {
    "from openai import OpenAI": "tests/test_server.py, against a scripted critloop serve",
    'on_ray = RayOptions(address="local")': "tests/test_ray.py, on a local Ray instance, scripted models",
}
MARKERS = [*EXACT, THREE_LINES, STREAMING, *NEEDS_SERVERS, *RUN_ELSEWHERE]

# The streaming example reads critloop.toml from its working directory: here, the embedded model in
# every role, with small limits (and 90 seconds of budget) so that the run stays near a minute or
# two on two cores.
SMALL_CONFIG = """\
[policy]
max_tokens = 96

[critic]
max_critique_tokens = 128
code_rounds = 1
forced_judgement_tokens = 8

[budget]
max_rounds = 1
max_seconds = 90

[refine]
max_step_tokens = 48

[sandbox]
pool_size = 1
"""


def block(marker: str) -> str:
    (found,) = [code for code in BLOCKS if marker in code]
    return found


def run(code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_every_python_block_is_checked_and_compiles() -> None:
    for code in BLOCKS:
        assert sum(marker in code for marker in MARKERS) == 1, f"no single check for:\n{code}"
        compile(code, str(README), "exec")
    for marker in MARKERS:
        block(marker)  # exactly one block each


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.parametrize(("marker", "expected"), list(EXACT.items()), ids=["sandbox", "langchain-tool"])
def test_readme_example_runs(marker: str, expected: str, tmp_path: Path) -> None:
    done = run(block(marker), tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


@pytest.mark.model
def test_the_three_line_python_api_example_runs_as_written(tmp_path: Path) -> None:
    """The embedded model in every role, the default sandbox (Docker where an engine answers),
    one refinement round and 90 s at most (a model call in flight when the time is up is cut at
    its next token)."""
    code = block(THREE_LINES)
    assert code.count("\n") == 3
    report = '\nimport sys\nsys.stdout.write("\\n@result " + result.model_dump_json() + "\\n")\n'
    done = run(code + report, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed, _, dumped = done.stdout.partition("\n@result ")
    result = SolveResult.model_validate(json.loads(dumped))
    assert result.stop_reason in STOP_REASONS
    assert result.stop_reason != "error", result.error
    assert result.final_steps and result.initial_steps
    assert len(result.rounds) <= 1
    assert printed.splitlines()[-1] == f"{result.answer} {result.stop_reason}"


@pytest.mark.model
def test_the_streaming_example_runs_against_a_config_file(tmp_path: Path) -> None:
    (tmp_path / "critloop.toml").write_text(SMALL_CONFIG)
    done = run(block(STREAMING), tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines and re.fullmatch(r"step 1: reward [01]\.\d\d (ok|FLAGGED)", lines[0]), done.stdout
    _, stop_reason, calls = re.fullmatch(r"(.*) (\S+) (\d+) critic calls", lines[-1]).groups()  # type: ignore[union-attr]
    assert stop_reason in STOP_REASONS and stop_reason != "error"
    assert int(calls) >= 2


def test_the_readme_graph_diagram_is_the_one_the_graph_draws() -> None:
    (diagram,) = re.findall(r"```mermaid\n(.*?)```", TEXT, flags=re.DOTALL)
    assert diagram == build_refine_graph().get_graph().draw_mermaid()


def test_the_readme_config_file_is_a_valid_config(tmp_path: Path) -> None:
    toml, replicas, at_scale = [
        b for b in re.findall(r"```toml\n(.*?)```", TEXT, flags=re.DOTALL) if "[critic]" in b
    ]
    path = tmp_path / "critloop.toml"
    path.write_text(at_scale)  # Running at scale: the policy on one server, the critic on two
    cfg = load_config(path)
    assert cfg.policy.base_url == "http://gpu-1:8000/v1" and cfg.critic.samples == 8
    assert cfg.critic.base_url == ["http://gpu-1:8001/v1", "http://gpu-1:8002/v1"]
    path = tmp_path / "critloop.toml"
    path.write_text(replicas)
    urls = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    assert (load_config(path).critic.base_url, load_config(path).critic.routing) == (urls, "sticky")
    path.write_text(toml)
    config = load_config(path)
    assert (config.policy.kind, config.policy.base_url) == ("openai", "http://127.0.0.1:8000/v1")
    assert (config.critic.kind, config.critic.base_url) == ("openai", "http://127.0.0.1:8001/v1")
    assert (config.critic.model, config.critic.profile, config.critic.samples) == (
        "GenPRM/GenPRM-7B",
        "genprm",
        8,
    )
    assert config.refiner is None and config.refine.mode == "step"
    assert config.sandbox.backend == "docker"


def test_the_readme_synth_config_is_a_valid_config(tmp_path: Path) -> None:
    (synth,) = [b for b in re.findall(r"```toml\n(.*?)```", TEXT, flags=re.DOTALL) if "[synth]" in b]
    path = tmp_path / "critloop.toml"
    path.write_text(synth)
    config = load_config(path)
    assert config.synth == SynthConfig(teacher=config.synth.teacher)  # the defaults, written out
    assert config.teacher.model == "Qwen/QwQ-32B" and config.teacher.kind == "openai"


def test_the_readme_tracing_config_is_a_valid_config(tmp_path: Path) -> None:
    (traced,) = [b for b in re.findall(r"```toml\n(.*?)```", TEXT, flags=re.DOTALL) if "[tracing]" in b]
    path = tmp_path / "critloop.toml"
    path.write_text(traced)
    config = load_config(path).tracing
    assert config.active and config.endpoint == "https://cloud.langfuse.com/api/public/otel/v1/traces"
    assert config.headers == {"Authorization": "Basic ${LANGFUSE_AUTH}"}
