"""The configuration file: one TOML file configures every entry point; flags override it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from critloop.agent.budget import Budget
from critloop.agent.critic import CriticConfig
from critloop.agent.policy import RefineMode
from critloop.errors import ConfigError
from critloop.graphs.synth import SynthConfig
from critloop.sandbox import SandboxConfig
from critloop.tools.endpoint import EndpointConfig
from critloop.tools.tracing import TracingConfig

__all__ = ["CritloopConfig", "RefineConfig", "load_config"]


class RefineConfig(BaseModel):
    """The ``[refine]`` table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: RefineMode = "step"
    """``step``: rewrite the first flagged step, then the policy continues; ``full``: the reference
    protocol (a whole new solution)."""
    max_step_tokens: int = Field(default=512, ge=16)
    """The limit of one rewritten step (``step`` mode)."""


class CritloopConfig(BaseModel):
    """The whole configuration. With no file, everything is the embedded default.

    Example:
        >>> CritloopConfig().policy.kind
        'embedded'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: EndpointConfig = Field(default_factory=EndpointConfig)
    """The model that writes solutions."""
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """The GenPRM (or instruct) critic: its endpoint and options (profile, samples, threshold, ...)."""
    refiner: EndpointConfig | None = None
    """The model that rewrites a flagged step; None: the policy's endpoint."""
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    """The code sandbox of the critic."""
    budget: Budget = Field(default_factory=Budget)
    """Limits of one refine run."""
    refine: RefineConfig = Field(default_factory=lambda: RefineConfig())
    """How flagged steps are refined."""
    synth: SynthConfig = Field(default_factory=SynthConfig)
    """How ``critloop synth`` makes training data."""
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    """OpenTelemetry traces of the runs (off unless enabled here or by the OTLP variables)."""

    @property
    def teacher(self) -> EndpointConfig:
        """The endpoint of the teacher of ``critloop synth``: ``[synth.teacher]``, else the policy's."""
        return self.synth.teacher or self.policy

    @property
    def refiner_endpoint(self) -> EndpointConfig:
        return self.refiner or self.policy


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> CritloopConfig:
    """Read a TOML file (or nothing) and apply dotted overrides such as ``{"critic.base_url": ...}``.

    Errors name the file and the key: ``critloop.toml: critic.base_url: ...``.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *tables, key = dotted.split(".")
        target = data
        for table in tables:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{source}: {table} must be a table")
        target[key] = value
    try:
        return CritloopConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
