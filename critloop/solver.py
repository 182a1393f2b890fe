"""The Solver: the refine loop as a Python API.

Example:
    >>> from critloop import Budget, Solver
    >>> solver = Solver.from_config(budget=Budget(max_rounds=1, max_seconds=180))  # doctest: +SKIP
    >>> result = solver.solve("What is 2 + 3 * 4?")  # doctest: +SKIP
    >>> result.answer, result.stop_reason  # doctest: +SKIP
    ('14', 'all_steps_pass')
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from critloop.agent.budget import Budget
from critloop.agent.critic import GenPRMCritic
from critloop.agent.policy import Policy, RefineMode, Refiner
from critloop.agent.writer import ChatModelWriter, CompletionWriter, Writer
from critloop.config import CritloopConfig, load_config
from critloop.errors import ConfigError
from critloop.graphs.events import DoneEvent, RunEvent
from critloop.graphs.refine import RefineContext, RefineGraph, build_refine_graph, stream_refine
from critloop.graphs.result import SolveResult
from critloop.sandbox import SandboxPool
from critloop.tools import tracing
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.endpoint import build_completion_models

__all__ = ["SolveResult", "Solver", "make_graph"]


class Solver:
    """Solves math problems with the self-correcting loop: policy -> GenPRM critic -> refiner.

    Build it from a config file (:meth:`from_config`) or from objects. A solver built from a
    config owns what it built (the sandbox pool, the model clients and engines): ``async with``
    (or :meth:`aclose`) releases them, and a later run opens them again. A solver built from
    objects leaves them to their owner.

    Args:
        policy: the policy's writer, or any LangChain ``BaseChatModel``.
        critic: the GenPRM critic (with its sandbox pool).
        refiner: the refiner's writer or chat model; default: the policy's.
        budget: limits of each run.
        mode: how flagged steps are refined.
        checkpointer: a LangGraph saver for durable runs (pass ``thread_id`` to the calls).
        max_tokens: the limit of one policy reply (None: the writer's default).
        max_step_tokens: the limit of one rewritten step.

    Example:
        >>> from critloop import StepEvent
        >>> async with Solver.from_config("critloop.toml") as solver:  # doctest: +SKIP
        ...     async for event in solver.astream("What is 2 + 3 * 4?"):
        ...         if isinstance(event, StepEvent):
        ...             print(event.index, event.reward)
    """

    def __init__(
        self,
        *,
        policy: Writer | Any,
        critic: GenPRMCritic,
        refiner: Writer | Any | None = None,
        budget: Budget | None = None,
        mode: RefineMode = "step",
        checkpointer: Any = None,
        max_tokens: int | None = None,
        max_step_tokens: int = 512,
    ) -> None:
        self.policy = Policy(_writer(policy), max_tokens=max_tokens)
        self.refiner = Refiner(
            _writer(refiner) if refiner is not None else self.policy.writer,
            self.policy,
            mode=mode,
            max_tokens=max_step_tokens,
        )
        self.critic = critic
        self.budget = budget or Budget()
        self.graph: RefineGraph = build_refine_graph(checkpointer=checkpointer)
        self._owned: tuple[contextlib.AbstractAsyncContextManager[Any], ...] = ()
        self._open: contextlib.AsyncExitStack | None = None

    @classmethod
    def from_config(
        cls,
        config: str | Path | CritloopConfig | None = None,
        *,
        budget: Budget | None = None,
        checkpointer: Any = None,
    ) -> Solver:
        """A solver for the models, critic, sandbox and budget of a config (a TOML path, a
        :class:`CritloopConfig`, or None for the embedded defaults), owning what it builds.
        Raises ConfigError."""
        cfg = config if isinstance(config, CritloopConfig) else load_config(config)
        if cfg.tracing.active and not tracing.enabled():
            tracing.enable(cfg.tracing)
        endpoints = [cfg.policy, cfg.critic, *([cfg.refiner] if cfg.refiner else [])]
        models = build_completion_models(*endpoints)
        writers = [
            CompletionWriter(model, ChatTemplate.from_pretrained(endpoint.tokenizer_ref), endpoint.sampling())
            for model, endpoint in zip(models, endpoints, strict=True)
        ]
        pool = SandboxPool(cfg.sandbox)
        critic_template = writers[1].template
        solver = cls(
            policy=writers[0],
            critic=GenPRMCritic(models[1], critic_template, pool, cfg.critic),
            refiner=writers[2] if cfg.refiner else None,
            budget=budget or cfg.budget,
            mode=cfg.refine.mode,
            checkpointer=checkpointer,
            max_step_tokens=cfg.refine.max_step_tokens,
        )
        owned: list[Any] = [pool]
        for model in models:  # an engine shared by roles is owned once
            if not any(model is other for other in owned):
                owned.append(model)
        solver._owned = tuple(owned)
        return solver

    def context(self, budget: Budget | None = None) -> RefineContext:
        """The runtime context of a run of :attr:`graph` (immutable; shared by concurrent runs)."""
        return RefineContext(
            policy=self.policy, refiner=self.refiner, critic=self.critic, budget=budget or self.budget
        )

    async def asolve(
        self, problem: str, *, thread_id: str | None = None, budget: Budget | None = None
    ) -> SolveResult:
        """Solve ``problem``. With a checkpointer and a ``thread_id`` already used, an unfinished
        run resumes where it stopped, and a finished one returns its result without any model call."""
        async for event in self.astream(problem, thread_id=thread_id, budget=budget):
            if isinstance(event, DoneEvent):
                return event.result
        raise AssertionError("a run always ends with a DoneEvent")

    def solve(
        self, problem: str, *, thread_id: str | None = None, budget: Budget | None = None
    ) -> SolveResult:
        """:meth:`asolve` for scripts (runs its own event loop, and closes the solver's resources)."""

        async def once() -> SolveResult:
            try:
                return await self.asolve(problem, thread_id=thread_id, budget=budget)
            finally:
                await self.aclose()

        return asyncio.run(once())

    async def astream(
        self, problem: str, *, thread_id: str | None = None, budget: Budget | None = None
    ) -> AsyncIterator[RunEvent]:
        """The run as typed events (:data:`~critloop.graphs.events.RunEvent`): a
        :class:`~critloop.graphs.events.SolutionEvent` for each new solution, a
        :class:`~critloop.graphs.events.StepEvent` for each critiqued step,
        :class:`~critloop.graphs.events.RefiningEvent` / :class:`~critloop.graphs.events.RefinedEvent`
        around each refinement, and last a :class:`~critloop.graphs.events.DoneEvent` with the
        result."""
        await self.open()
        async for event in stream_refine(self.graph, self.context(budget), problem, thread_id=thread_id):
            yield event

    async def open(self) -> None:
        """Open what the solver owns (start its sandbox pool). Idempotent; runs call it."""
        if self._open is not None:
            return
        stack = contextlib.AsyncExitStack()
        try:
            for resource in self._owned:
                await stack.enter_async_context(resource)
        except BaseException:
            await stack.aclose()
            raise
        self._open = stack

    async def load_models(self) -> None:
        """Load the in-process models now (not inside the first model call), so that start-up
        ends before the first run; a model that cannot load raises ConfigError. Models served
        over HTTP have nothing to load."""
        from critloop.tools.local_engine import TransformersEngine

        models = [getattr(w, "model", None) for w in (self.policy.writer, self.refiner.writer)]
        engines = {id(m): m for m in [*models, self.critic.model] if isinstance(m, TransformersEngine)}
        for engine in engines.values():
            await asyncio.to_thread(engine.load)

    async def aclose(self) -> None:
        """Close what the solver owns (its sandbox pool, HTTP clients, engines' workers); a later
        run opens them again."""
        stack, self._open = self._open, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Solver:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _writer(model: Any) -> Writer:
    if isinstance(model, Writer):
        return model
    from langchain_core.language_models import BaseChatModel

    if isinstance(model, BaseChatModel):
        return ChatModelWriter(model)
    raise ConfigError(
        f"{type(model).__name__} is neither a Writer nor a LangChain chat model; wrap a completion "
        "model as CompletionWriter(model, ChatTemplate.from_pretrained(...), SamplingParams(...))"
    )


def make_graph(config: Any = None) -> RefineGraph:
    """The graph factory named in ``langgraph.json`` (for ``langgraph dev``): the refine graph
    with no checkpointer (the server brings its own), whose runs without a context use the
    models of the config file named by ``$CRITLOOP_CONFIG`` (or the embedded defaults).

    The server calls the factory for every run: the solver behind those runs is built once per
    config file, on the first run, and serves every graph the factory returns until the process
    ends (see :class:`_ServedSolvers`).
    """
    return build_refine_graph(default_context=_SERVED.context)


class _ServedSolvers:
    """The solvers behind :func:`make_graph`'s graphs, one per config file, each opened once
    and owned for the life of the process (the server's)."""

    def __init__(self) -> None:
        self._solvers: dict[str | None, asyncio.Task[Solver]] = {}

    async def context(self) -> RefineContext:
        path = os.environ.get("CRITLOOP_CONFIG") or None
        task = self._solvers.get(path)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            # A failed build is not kept: the next run tries again (and reports its own error).
            task = self._solvers[path] = asyncio.ensure_future(self._open(path))
        solver = await asyncio.shield(task)
        return solver.context()

    @staticmethod
    async def _open(path: str | None) -> Solver:
        # Reading the config and the tokenizers is file I/O: off the event loop.
        solver = await asyncio.to_thread(lambda: Solver.from_config(load_config(path)))
        await solver.open()
        return solver


_SERVED = _ServedSolvers()
