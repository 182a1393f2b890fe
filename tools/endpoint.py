"""Endpoint configuration: which model serves a role, and how to reach it."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from critloop.errors import ConfigError
from critloop.tools.completion import CompletionModel, LogprobsMode, SamplingParams
from critloop.tools.embedded import DEFAULT_EMBEDDED_MODEL
from critloop.tools.replicas import Routing

__all__ = ["EndpointConfig", "EndpointKind", "build_completion_model", "build_completion_models"]

EndpointKind = Literal["openai", "local", "embedded"]
"""``openai``: any OpenAI-compatible server (vLLM, SGLang, llama.cpp). ``local``: a model loaded
in this process with transformers (CPU or CUDA). ``embedded``: the built-in SmolLM2, in process."""


class EndpointConfig(BaseModel):
    """One model endpoint: the ``[policy]``, ``[critic]`` or ``[refiner]`` table of the config file.

    Example:
        >>> url = "http://127.0.0.1:8001/v1"
        >>> EndpointConfig(kind="openai", base_url=url, model="GenPRM/GenPRM-7B").tokenizer_ref
        'GenPRM/GenPRM-7B'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: EndpointKind = "embedded"
    """How the model is served (see :data:`EndpointKind`)."""
    base_url: str | list[str] | None = None
    """The server's OpenAI base URL (``kind = "openai"`` only), e.g. ``http://127.0.0.1:8000/v1``;
    or a list of them, one per replica of the same model, which ``routing`` spreads the requests
    over (:class:`~critloop.tools.replicas.ReplicaRouter`)."""
    routing: Routing = "sticky"
    """With several ``base_url``: ``sticky`` sends a prompt to the replica that served the prompt
    it extends (its prefix cache holds it), else to the least busy; ``round_robin`` takes turns.
    A replica that keeps failing (2 tries each) is set aside until its health check passes."""
    model: str = DEFAULT_EMBEDDED_MODEL
    """Model name on the server; for ``local``, a folder, a GGUF file or a hub id."""
    tokenizer: str | None = None
    """Hub id or local folder of the tokenizer used to build raw prompts; default: ``model``
    (for ``openai``, the served name, which works when it is a hub id)."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the API key (never the key itself)."""
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=-1, ge=-1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    max_tokens: int = Field(default=1024, ge=1)
    """Default sampling for this role; a caller's explicit parameters win."""
    timeout_seconds: float = Field(default=300.0, gt=0)
    """Limit of one HTTP request (``openai``)."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """Tries per HTTP request before a clear error (``openai``)."""
    device: str = "auto"
    """``local`` / ``embedded``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``."""
    dtype: str = "auto"
    """``local`` / ``embedded``: ``auto``, ``float32``, ``bfloat16``, ``float16``."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """More JSON fields for every request (server-specific options, ``openai``)."""

    @model_validator(mode="after")
    def _check(self) -> EndpointConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("kind = 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.kind != "openai" and self.base_url:
            raise ValueError(f"base_url is only for kind = 'openai', not {self.kind!r}")
        urls = self.base_urls
        if any(not url.strip() for url in urls):
            raise ValueError("base_url: an empty URL")
        repeated = sorted({url for url in urls if urls.count(url) > 1})
        if repeated:
            raise ValueError(f"base_url lists {', '.join(repeated)} more than once")
        return self

    @property
    def base_urls(self) -> list[str]:
        """The replicas' base URLs (one for a single server; none for in-process kinds)."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @property
    def tokenizer_ref(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        if self.kind == "openai":
            return self.model
        from critloop.tools.embedded import resolve_model_path

        return resolve_model_path(self.model)

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"api_key_env names {self.api_key_env!r}, but that variable is not set")
        return key

    def sampling(self, **overrides: Any) -> SamplingParams:
        """This endpoint's default sampling, with ``overrides`` on top."""
        base = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "max_tokens": self.max_tokens,
        }
        return SamplingParams(**{**base, **overrides})


def _openai_model(config: EndpointConfig) -> CompletionModel:
    """The HTTP client of an ``openai`` endpoint; a router over one client per replica when it
    lists several."""
    from critloop.tools.openai_client import OpenAICompletionModel

    urls = config.base_urls
    # With replicas to fall back on, a failing one is left after 2 tries rather than 5.
    attempts = config.max_attempts if len(urls) == 1 else min(config.max_attempts, 2)
    clients = [
        OpenAICompletionModel(
            url,
            config.model,
            api_key=config.api_key(),
            timeout_seconds=config.timeout_seconds,
            max_attempts=attempts,
            extra_body=config.extra_body,
        )
        for url in urls
    ]
    if len(clients) == 1:
        return clients[0]
    from critloop.tools.replicas import ReplicaRouter

    return ReplicaRouter(clients, routing=config.routing, name=config.model)


def build_completion_model(config: EndpointConfig) -> CompletionModel:
    """The completion model an endpoint describes (the caller owns it: ``aclose()`` it)."""
    return build_completion_models(config)[0]


def build_completion_models(*configs: EndpointConfig) -> list[CompletionModel]:
    """The completion models the endpoints describe, in order (the caller owns them). Endpoints
    on the same in-process model, device and dtype share one engine, so that roles served by one
    model batch together."""
    engines: dict[tuple[str, str, str, str], CompletionModel] = {}
    models: list[CompletionModel] = []
    for config in configs:
        if config.kind == "openai":
            models.append(_openai_model(config))
            continue
        from critloop.tools.local_engine import TransformersEngine

        # The critic's table says what its logprobs must be (``raw`` unless told otherwise); the
        # other roles read none, so they share its engine.
        mode: LogprobsMode = getattr(config, "logprobs", "raw")
        key = (config.model, config.device, config.dtype, mode)
        if key not in engines:
            engines[key] = TransformersEngine(
                config.model, device=config.device, dtype=config.dtype, logprobs_mode=mode
            )
        models.append(engines[key])
    return models
