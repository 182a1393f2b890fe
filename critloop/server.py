"""``critloop serve``: verified math behind the OpenAI chat API, for chat assistants.

``POST /v1/chat/completions`` takes the last user message as the problem and answers with the
refined solution (its final answer boxed). Non-streamed responses carry a ``critloop`` object
(per-step rewards, rounds, stop reason, usage per role); streamed ones send the loop's progress
as it happens (``delta.reasoning_content``, which chat UIs show as the model's thinking, plus a
``critloop`` event object in each chunk) and then the solution as ``delta.content``.

Example:
    >>> from openai import OpenAI  # doctest: +SKIP
    >>> client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")  # doctest: +SKIP
    >>> reply = client.chat.completions.create(  # doctest: +SKIP
    ...     model="critloop", messages=[{"role": "user", "content": "What is 2 + 3 * 4?"}]
    ... )
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from critloop.agent.budget import Budget
from critloop.agent.steps import join_steps
from critloop.errors import CritloopError
from critloop.graphs.events import DoneEvent, RefinedEvent, RefiningEvent, RunEvent, SolutionEvent, StepEvent
from critloop.graphs.result import SolveResult, error_source
from critloop.solver import Solver

__all__ = ["ServerSettings", "create_app"]

logger = logging.getLogger("critloop.server")

MODEL_ID = "critloop"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Limits and security of ``critloop serve``."""

    api_key: str | None = None
    """Bearer token every request must carry; None: no authentication (loopback use only)."""
    max_concurrency: int = 4
    """Refine runs at once (they share one sandbox pool and one set of model clients)."""
    max_queue: int = 16
    """Requests waiting for a run slot; beyond that the server answers 503 at once."""
    max_request_bytes: int = 256 * 1024
    """Largest request body."""
    max_messages: int = 64
    """Most messages in one request."""
    max_budget: Budget = field(default_factory=Budget)
    """The most a request may ask for; a request's ``critloop.budget`` is capped by it."""
    freeze_heap: bool = True
    """After start-up, move what is loaded (models, tokenizers, torch) out of the garbage
    collector's full passes (``gc.freeze()``), which would otherwise stall every request."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class _BudgetOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_rounds: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)
    samples: int | None = Field(default=None, ge=1, le=64)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: _BudgetOverride = Field(default_factory=_BudgetOverride)


class _StreamOptions(BaseModel):
    include_usage: bool = False
    """Send the usage on a last chunk with no choices (and ``"usage": null`` on the others)."""


class _ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send temperature, top_p, ...

    model: str = MODEL_ID
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions = Field(default_factory=lambda: _StreamOptions())
    critloop: _Options = Field(default_factory=_Options)
    """critloop's extension: per-request budget overrides, within the server's maximums."""


class _Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format)."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.stop_reasons: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.run_seconds = 0.0
        self.runs = 0
        self.in_flight = 0
        self.waiting = 0

    def record(self, result: SolveResult, seconds: float) -> None:
        self.runs += 1
        self.run_seconds += seconds
        self.stop_reasons[result.stop_reason] += 1
        for role in ("policy", "critic", "refiner"):
            usage = getattr(result.usage, role)
            self.tokens[f'role="{role}",kind="prompt"'] += usage.prompt_tokens
            self.tokens[f'role="{role}",kind="completion"'] += usage.completion_tokens

    def render(self) -> str:
        lines = [
            "# HELP critloop_requests_total Chat completion requests by outcome.",
            "# TYPE critloop_requests_total counter",
            *(f'critloop_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())),
            "# HELP critloop_runs_in_flight Refine runs running now.",
            "# TYPE critloop_runs_in_flight gauge",
            f"critloop_runs_in_flight {self.in_flight}",
            "# HELP critloop_queue_depth Requests waiting for a run slot.",
            "# TYPE critloop_queue_depth gauge",
            f"critloop_queue_depth {self.waiting}",
            "# HELP critloop_run_seconds Wall time of finished refine runs.",
            "# TYPE critloop_run_seconds summary",
            f"critloop_run_seconds_sum {self.run_seconds:.6f}",
            f"critloop_run_seconds_count {self.runs}",
            "# HELP critloop_stop_reason_total Finished runs by stop reason.",
            "# TYPE critloop_stop_reason_total counter",
            *(
                f'critloop_stop_reason_total{{reason="{k}"}} {v}'
                for k, v in sorted(self.stop_reasons.items())
            ),
            "# HELP critloop_tokens_total Tokens by role and kind.",
            "# TYPE critloop_tokens_total counter",
            *(f"critloop_tokens_total{{{k}}} {v}" for k, v in sorted(self.tokens.items())),
        ]
        return "\n".join(lines) + "\n"


def _error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI error object: ``code`` is a string or None, as the OpenAI API types it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_body(message, kind, param=param, code=code))


def _upstream_failure(source: str | None, detail: str | None) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI error object of a run that failed upstream. The message names the
    part that failed and nothing internal (endpoint URLs stay in the server's log)."""
    logger.warning("a refine run failed (%s): %s", source or "unknown part", detail)
    if source == "sandbox":
        message = "the code sandbox is unavailable; retry later"
        return 503, _error_body(message, "server_error", code="sandbox_unavailable")
    part = f"the {source} model" if source else "a model or the sandbox"
    message = f"critloop could not reach {part}; retry later (details are in the server's log)"
    return 502, _error_body(message, "server_error", code="upstream_error")


def create_app(solver: Solver, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``solver`` (one sandbox pool and client set for every request).

    The app starts the solver's resources on start-up and closes them on shutdown.
    """
    settings = settings or ServerSettings()
    metrics = _Metrics()
    slots = asyncio.Semaphore(settings.max_concurrency)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with solver:
            if settings.freeze_heap:
                gc.collect()
                gc.freeze()
            yield

    app = FastAPI(title="critloop", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.solver = solver
    app.state.settings = settings
    app.state.metrics = metrics

    def refused(request: Request) -> JSONResponse | None:
        """The error for a request without the right key, or announcing too large a body."""
        if settings.api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), settings.api_key):
                metrics.requests["unauthorized"] += 1
                return _error(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_request_bytes:
            metrics.requests["too_large"] += 1
            return _error(
                413, f"the request is larger than {settings.max_request_bytes} bytes", "invalid_request_error"
            )
        return None

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error serving %s", request.url.path, exc_info=exc)
        metrics.requests["error"] += 1
        return _error(500, "internal error (see the server's log)", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.requests["invalid"] += 1
        return _error(400, _describe(exc.errors()), "invalid_request_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        pool = solver.critic.sandbox
        return {
            "status": "ok",
            "runs_in_flight": metrics.in_flight,
            "queue_depth": metrics.waiting,
            "sandbox": None if pool is None else pool.status().__dict__,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> dict[str, Any] | JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        return {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "critloop"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        body = await request.body()
        if len(body) > settings.max_request_bytes:
            metrics.requests["too_large"] += 1
            return _error(
                413, f"the request is larger than {settings.max_request_bytes} bytes", "invalid_request_error"
            )
        try:
            payload = _ChatRequest.model_validate_json(body)
        except ValidationError as exc:
            metrics.requests["invalid"] += 1
            return _error(400, _describe(exc.errors()), "invalid_request_error")
        if payload.model != MODEL_ID:
            metrics.requests["invalid"] += 1
            return _error(
                404,
                f"model {payload.model!r} does not exist; use {MODEL_ID!r}",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        if len(payload.messages) > settings.max_messages:
            metrics.requests["invalid"] += 1
            return _error(
                400,
                f"at most {settings.max_messages} messages per request",
                "invalid_request_error",
                param="messages",
            )
        problem = next((m.text() for m in reversed(payload.messages) if m.role == "user"), "").strip()
        if not problem:
            metrics.requests["invalid"] += 1
            return _error(
                400, "no user message with a problem in it", "invalid_request_error", param="messages"
            )
        asked = payload.critloop.budget.model_dump(exclude_none=True)
        budget = settings.max_budget.capped(settings.max_budget.model_copy(update=asked))
        if metrics.in_flight + metrics.waiting >= settings.max_concurrency + settings.max_queue:
            metrics.requests["overloaded"] += 1
            return _error(
                503, "the server is at capacity; retry later", "server_error", code="server_overloaded"
            )
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if payload.stream:
            return StreamingResponse(
                _stream(request, problem, budget, completion_id, payload.stream_options.include_usage),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        try:
            result = await _run(problem, budget)
        except CritloopError as exc:
            status, error = _upstream_failure(error_source(exc), f"{type(exc).__name__}: {exc}")
        else:
            if result.stop_reason != "error":
                metrics.requests["ok"] += 1
                return JSONResponse(_completion(completion_id, result))
            status, error = _upstream_failure(result.error_source, result.error)
        metrics.requests["failed"] += 1
        return JSONResponse(status_code=status, content=error)

    async def _run(problem: str, budget: Budget) -> SolveResult:
        async for event in _events(problem, budget):
            if isinstance(event, DoneEvent):
                return event.result
        raise AssertionError("a run always ends with a DoneEvent")

    async def _events(problem: str, budget: Budget) -> AsyncGenerator[RunEvent, None]:
        metrics.waiting += 1
        try:
            await slots.acquire()
        finally:
            metrics.waiting -= 1
        metrics.in_flight += 1
        started = time.perf_counter()
        try:
            async for event in solver.astream(problem, budget=budget):
                if isinstance(event, DoneEvent):
                    metrics.record(event.result, time.perf_counter() - started)
                yield event
        finally:
            metrics.in_flight -= 1
            slots.release()

    async def _stream(
        request: Request, problem: str, budget: Budget, completion_id: str, include_usage: bool
    ) -> AsyncIterator[bytes]:
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": MODEL_ID,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            # With include_usage, every chunk carries "usage": null until the last one.
            return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {}), **extra})

        yield chunk({"role": "assistant", "content": ""})
        events = _events(problem, budget)
        # A client that goes away is noticed at once, not at the next write (which may be
        # minutes away while a model thinks): its run is cancelled and its sessions freed.
        gone = asyncio.create_task(_disconnected(request))
        step: asyncio.Future[RunEvent] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(events))
                await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    metrics.requests["cancelled"] += 1
                    return
                try:
                    event = step.result()
                except StopAsyncIteration:
                    break
                if isinstance(event, DoneEvent):
                    result = event.result
                    if result.stop_reason == "error":
                        metrics.requests["failed"] += 1
                        _, error = _upstream_failure(result.error_source, result.error)
                        yield _sse(error)  # as the OpenAI API reports an error mid-stream
                        break
                    yield chunk({"content": _answer_text(result)})
                    yield chunk({}, "stop", critloop=_extension(result))
                    if include_usage:  # a last chunk with no choice, as the OpenAI API sends it
                        yield _sse({**head, "choices": [], "usage": _usage(result)})
                    metrics.requests["ok"] += 1
                    break
                yield chunk({"reasoning_content": _progress(event)}, critloop=event.to_json())
        except CritloopError as exc:
            metrics.requests["failed"] += 1
            _, error = _upstream_failure(error_source(exc), f"{type(exc).__name__}: {exc}")
            yield _sse(error)
        except asyncio.CancelledError:
            metrics.requests["cancelled"] += 1
            raise
        finally:
            gone.cancel()
            if step is not None and not step.done():
                # The run is cancelled where it waits (a model call, a sandbox exec); its
                # sessions are released on the way out.
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
            await events.aclose()
        yield b"data: [DONE]\n\n"

    return app


def _sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def _disconnected(request: Request) -> None:
    """Returns when the client has disconnected (the request body was read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _describe(errors: Any) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _answer_text(result: SolveResult) -> str:
    if result.final_steps:
        return join_steps(result.final_steps)
    return f"critloop could not write a solution ({result.stop_reason}: {result.error or 'no detail'})."


def _usage(result: SolveResult) -> dict[str, int]:
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(result: SolveResult) -> dict[str, Any]:
    return {
        "answer": result.answer,
        "stop_reason": result.stop_reason,
        "error": result.error,
        "step_rewards": result.step_rewards,
        "rounds": result.rounds,
        "initial_steps": result.initial_steps,
        "final_steps": result.final_steps,
        "usage": result.usage.model_dump(),
        "seconds": result.seconds,
    }


def _completion(completion_id: str, result: SolveResult) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _answer_text(result)},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(result),
        "critloop": _extension(result),
    }


def _progress(event: RunEvent) -> str:
    """The event as a line of the reply's ``reasoning_content``."""
    match event:
        case SolutionEvent():
            return f"Draft {event.round}: {len(event.steps)} steps.\n"
        case StepEvent(reused=True):
            return f"Step {event.index + 1}: unchanged ({event.verdict}, reward {event.reward:.2f}).\n"
        case StepEvent():
            mark = "flagged" if event.flagged else "ok"
            return f"Step {event.index + 1}: {event.verdict} (reward {event.reward:.2f}, {mark}).\n"
        case RefiningEvent():
            return f"Rewriting step {event.index + 1} (round {event.round}).\n"
        case RefinedEvent():
            return f"Rewrote step {event.index + 1}.\n"
    return ""
