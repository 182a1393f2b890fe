"""Traces of critloop runs with OpenTelemetry, in the OpenInference conventions, so that Arize
Phoenix, Langfuse (through OTLP) and other tracing tools show them.

A solve is a ``CHAIN`` span; each critiqued step an ``EVALUATOR`` span with its reward, verdicts
and whether it was flagged; under them every model call an ``LLM`` span (with token counts) and
every code run a ``TOOL`` span (with the code and its output); each refinement round a ``CHAIN``
span with the rewritten step. Text attributes are cut to :attr:`TracingConfig.max_chars`.

Tracing is off until :func:`enable` is called (``Solver.from_config`` calls it when the config's
``[tracing]`` table enables it, or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` variable is set). Off, :func:`span` yields None and
OpenTelemetry is never imported.

Example:
    >>> from critloop.tools import tracing
    >>> with tracing.span("work", "CHAIN", {"input.value": "2 + 2"}) as current:
    ...     current is None  # tracing is off
    True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from critloop.sandbox import ExecResult, Session
    from critloop.tools.completion import CompletionModel, CompletionResult, SamplingParams

_T = TypeVar("_T")

__all__ = [
    "OTLP_VARIABLES",
    "SpanKind",
    "TracingConfig",
    "disable",
    "enable",
    "enabled",
    "end",
    "record",
    "span",
    "start",
    "token_counts",
    "traced_complete",
    "traced_exec",
    "within",
]

SpanKind = Literal["CHAIN", "LLM", "TOOL", "EVALUATOR"]
"""The OpenInference kinds critloop's spans take."""

OTLP_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""The standard variables that turn tracing on (the exporter reads them, and their headers')."""


class TracingConfig(BaseModel):
    """The ``[tracing]`` table: where spans go.

    Example:
        >>> TracingConfig(endpoint="http://127.0.0.1:6006/v1/traces").active
        True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool | None = None
    """True: trace; False: never; None (default): trace when :attr:`endpoint` is set or one of
    :data:`OTLP_VARIABLES` is."""
    endpoint: str | None = None
    """The OTLP/HTTP traces endpoint, e.g. ``http://127.0.0.1:6006/v1/traces`` (Phoenix);
    None: the OpenTelemetry variables' (their default: ``http://localhost:4318/v1/traces``)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """HTTP headers of the export (a Langfuse key, say); values may name variables as ``${NAME}``."""
    service_name: str = "critloop"
    max_chars: int = Field(default=4000, ge=100)
    """Text attributes (prompts, completions, code, outputs) are cut to this."""

    @property
    def active(self) -> bool:
        """Whether this config turns tracing on."""
        if self.enabled is not None:
            return self.enabled
        return self.endpoint is not None or any(os.environ.get(name) for name in OTLP_VARIABLES)


class _State:
    tracer: Tracer | None = None
    max_chars: int = 4000
    provider: TracerProvider | None = None


def enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return _State.tracer is not None


def enable(config: TracingConfig | None = None, *, provider: TracerProvider | None = None) -> None:
    """Record spans from now on, in this process.

    Args:
        config: where they go (an OTLP/HTTP exporter with a batching processor); ignored with
            ``provider``.
        provider: a tracer provider of your own (tests pass one with an in-memory exporter).

    Raises:
        ConfigError: the ``tracing`` extra is not installed.
    """
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        from critloop.errors import ConfigError

        raise ConfigError("tracing needs OpenTelemetry: pip install 'critloop[tracing]'") from None
    config = config or TracingConfig()
    if provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        headers = {key: os.path.expandvars(value) for key, value in config.headers.items()}
        exporter = OTLPSpanExporter(endpoint=config.endpoint, headers=headers or None)
        provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _State.provider = provider
    _State.tracer = provider.get_tracer("critloop")
    _State.max_chars = config.max_chars


def disable() -> None:
    """Stop recording spans; those recorded are flushed."""
    provider, _State.provider, _State.tracer = _State.provider, None, None
    if provider is not None:
        provider.force_flush()


@contextlib.contextmanager
def span(name: str, kind: SpanKind, attributes: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A span named ``name`` of the OpenInference ``kind``, the current span's child, current
    inside the block (model calls and code runs under it become its children); None when
    tracing is off. An exception leaving the block is recorded on it."""
    tracer = _State.tracer
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name) as current:
        current.set_attribute("openinference.span.kind", kind)
        if attributes:
            record(current, attributes)
        yield current


def record(current: Span | None, attributes: Mapping[str, Any]) -> None:
    """Set ``attributes`` on ``current`` (nothing when it is None): strings cut to the limit,
    None values left out."""
    if current is None:
        return
    limit = _State.max_chars
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, str) and len(value) > limit:
            value = value[:limit] + f"... ({len(value) - limit} more characters)"
        current.set_attribute(key, value)


def start(name: str, kind: SpanKind, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span begun now as the current span's child, but not made current (see :func:`within`);
    :func:`end` ends it. None when tracing is off."""
    tracer = _State.tracer
    if tracer is None:
        return None
    begun = tracer.start_span(name, attributes={"openinference.span.kind": kind})
    if attributes:
        record(begun, attributes)
    return begun


def end(current: Span | None, attributes: Mapping[str, Any] | None = None) -> None:
    """Record ``attributes`` on a span of :func:`start` and end it."""
    if current is None:
        return
    if attributes:
        record(current, attributes)
    current.end()


async def within(current: Span | None, iterator: AsyncIterator[_T]) -> AsyncIterator[_T]:
    """The items of ``iterator``, with ``current`` the current span while each is made (so the
    tasks that make it open their spans under it), and not while the consumer holds one: an
    async generator runs in its consumer's context, so a span left current across a ``yield``
    would leak into the consumer's code."""
    if current is None:
        async for item in iterator:
            yield item
        return
    from opentelemetry import context, trace

    active = trace.set_span_in_context(current)
    while True:
        token = context.attach(active)
        try:
            item = await anext(iterator)
        except StopAsyncIteration:
            return
        finally:
            context.detach(token)
        yield item


def token_counts(prompt: int, completion: int) -> dict[str, int]:
    """A model call's token counts as OpenInference names them."""
    return {
        "llm.token_count.prompt": prompt,
        "llm.token_count.completion": completion,
        "llm.token_count.total": prompt + completion,
    }


async def traced_complete(
    model: CompletionModel, prompt: str, params: SamplingParams, *, role: str
) -> CompletionResult:
    """``model.complete(prompt, params)``, as an ``LLM`` span when tracing is on: the model, the
    role, the prompt, the first completion, the parameters and the token counts."""
    if _State.tracer is None:
        return await model.complete(prompt, params)
    attributes = {
        "llm.model_name": model.name,
        "critloop.role": role,
        "input.value": prompt,
        "llm.invocation_parameters": params.model_dump_json(exclude_defaults=True),
    }
    with span(f"{role}.complete", "LLM", attributes) as current:
        result = await model.complete(prompt, params)
        record(
            current,
            {
                "output.value": result.choices[0].text if result.choices else "",
                **token_counts(result.prompt_tokens, result.completion_tokens),
                "critloop.samples": len(result.choices),
            },
        )
        return result


async def traced_exec(session: Session, code: str, *, timeout: float) -> ExecResult:
    """``session.exec(code)``, as a ``TOOL`` span when tracing is on: the code, its output (or
    error), its status and duration."""
    if _State.tracer is None:
        return await session.exec(code, timeout=timeout)
    with span("python_sandbox", "TOOL", {"tool.name": "python_sandbox", "input.value": code}) as current:
        result = await session.exec(code, timeout=timeout)
        output = (
            result.stdout if result.status == "ok" else f"{result.stdout}{result.stderr}{result.error or ''}"
        )
        record(
            current,
            {
                "output.value": output,
                "critloop.code.status": result.status,
                "critloop.code.seconds": result.duration,
            },
        )
        return result
