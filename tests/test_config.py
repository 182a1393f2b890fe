"""The configuration file and endpoint objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from critloop.config import CritloopConfig, load_config
from critloop.errors import ConfigError
from critloop.tools.endpoint import EndpointConfig, build_completion_model, build_completion_models
from critloop.tools.local_engine import TransformersEngine
from critloop.tools.openai_client import OpenAICompletionModel

TOML = """
[policy]
kind = "openai"
base_url = "http://127.0.0.1:8000/v1"
model = "Qwen/Qwen2.5-Math-7B-Instruct"
api_key_env = "CRITLOOP_TEST_KEY"
temperature = 0.7

[critic]
kind = "openai"
base_url = "http://127.0.0.1:8001/v1"
model = "GenPRM/GenPRM-7B"
tokenizer = "GenPRM/GenPRM-7B"

[sandbox]
backend = "docker"
pool_size = 4
timeout_seconds = 5
"""


def test_no_file_is_the_embedded_default() -> None:
    config = load_config()
    assert config == CritloopConfig()
    assert config.policy.kind == config.critic.kind == "embedded"
    assert config.refiner_endpoint == config.policy


def test_a_full_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "critloop.toml"
    path.write_text(TOML)
    config = load_config(path)
    assert config.policy.base_url == "http://127.0.0.1:8000/v1"
    assert config.critic.tokenizer_ref == "GenPRM/GenPRM-7B"
    assert config.policy.tokenizer_ref == "Qwen/Qwen2.5-Math-7B-Instruct"
    assert config.sandbox.pool_size == 4
    assert config.policy.sampling(max_tokens=5).temperature == 0.7


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "critloop.toml"
    path.write_text(TOML)
    config = load_config(path, {"critic.base_url": "http://10.0.0.9:9000/v1", "policy.model": None})
    assert config.critic.base_url == "http://10.0.0.9:9000/v1"
    assert config.policy.model == "Qwen/Qwen2.5-Math-7B-Instruct"  # None leaves the file's value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[policy]\nkind = 'openai'\n", "policy: Value error, kind = 'openai' needs base_url"),
        ("[critic]\ntemperature = -1\n", "critic.temperature: Input should be greater than or equal to 0"),
        ("[polcy]\nkind = 'local'\n", "polcy: Extra inputs are not permitted"),
        ("[policy]\nkind = 'vllm'\n", "policy.kind: Input should be 'openai', 'local' or 'embedded'"),
        ("[sandbox]\nbackend = 'podman'\n", "sandbox.backend"),
        ("[policy\n", "is not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.toml") as info:
        load_config(path)
    assert message in str(info.value)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        load_config(tmp_path / "nope.toml")


def test_api_key_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = EndpointConfig(
        kind="openai", base_url="http://x/v1", model="m", api_key_env="CRITLOOP_TEST_KEY"
    )
    monkeypatch.delenv("CRITLOOP_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="CRITLOOP_TEST_KEY"):
        endpoint.api_key()
    monkeypatch.setenv("CRITLOOP_TEST_KEY", "sk-test")
    assert endpoint.api_key() == "sk-test"


async def test_endpoints_build_their_models() -> None:
    remote = build_completion_model(
        EndpointConfig(kind="openai", base_url="http://127.0.0.1:1/v1", model="m")
    )
    assert isinstance(remote, OpenAICompletionModel)
    await remote.aclose()
    first, second, other = build_completion_models(
        EndpointConfig(kind="embedded"),
        EndpointConfig(kind="local", model="smollm2-135m-instruct"),
        EndpointConfig(kind="local", model="smollm2-135m-instruct", dtype="bfloat16"),
    )
    assert isinstance(first, TransformersEngine)
    assert first is second  # one engine per model, device and dtype: roles batch together
    assert other is not first
    assert build_completion_model(EndpointConfig(kind="embedded")) is not first  # no global cache


def test_the_critic_tells_its_engine_what_logprobs_to_return() -> None:
    """The critic's ``logprobs`` becomes its in-process engine's mode; by default (raw) the
    policy shares the critic's engine, a critic asking for processed logprobs gets its own."""
    from critloop.agent.critic import CriticConfig

    policy, critic = build_completion_models(EndpointConfig(kind="embedded"), CriticConfig(kind="embedded"))
    assert policy is critic and isinstance(critic, TransformersEngine) and critic.logprobs_mode == "raw"
    policy, critic = build_completion_models(
        EndpointConfig(kind="embedded"), CriticConfig(kind="embedded", logprobs="processed")
    )
    assert policy is not critic
    assert isinstance(critic, TransformersEngine) and critic.logprobs_mode == "processed"
