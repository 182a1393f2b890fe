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
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

from critloop.agent.critic import GenPRMCritic
from critloop.agent.policy import Policy, RefineMode, Refiner
from critloop.agent.writer import ChatModelWriter, CompletionWriter, Writer
from critloop.config import CritloopConfig, load_config
from critloop.errors import ConfigError
from critloop.graphs.budget import Budget
from critloop.graphs.refine import RefineContext, SolveResult, build_refine_graph, stream_refine
from critloop.sandbox import SandboxConfig, SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.endpoint import EndpointConfig, build_completion_model

__all__ = ["SolveResult", "Solver", "make_graph"]


class Solver:
    """Solves math problems with the self-correcting loop: policy -> GenPRM critic -> refiner.

    Build it from a config file (:meth:`from_config`) or from objects. Use ``async with`` (or
    :meth:`aclose`) to release what it started (models, sandbox containers).

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
        >>> async with Solver.from_config("critloop.toml") as solver:  # doctest: +SKIP
        ...     async for event in solver.astream("What is 2 + 3 * 4?"):
        ...         print(event["event"])
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
        self.graph = build_refine_graph(checkpointer=checkpointer)
        # Set by from_config: the solver then owns its sandbox pool and clients, and reopens
        # them after aclose() (each solve() runs in a new event loop).
        self._sandbox_config: SandboxConfig | None = None

    @classmethod
    def from_config(
        cls,
        config: str | Path | CritloopConfig | None = None,
        *,
        budget: Budget | None = None,
        checkpointer: Any = None,
    ) -> Solver:
        """A solver for the models, critic, sandbox and budget of a config (a TOML path, a
        :class:`CritloopConfig`, or None for the embedded defaults). Raises ConfigError."""
        cfg = config if isinstance(config, CritloopConfig) else load_config(config)
        solver = cls(
            policy=_completion_writer(cfg.policy),
            critic=GenPRMCritic.from_config(cfg.critic, SandboxPool(cfg.sandbox)),
            refiner=_completion_writer(cfg.refiner) if cfg.refiner else None,
            budget=budget or cfg.budget,
            mode=cfg.refine.mode,
            checkpointer=checkpointer,
            max_step_tokens=cfg.refine.max_step_tokens,
        )
        solver._sandbox_config = cfg.sandbox
        return solver

    def context(self, budget: Budget | None = None) -> RefineContext:
        """A fresh runtime context for one run of :attr:`graph`."""
        return RefineContext(
            policy=self.policy, refiner=self.refiner, critic=self.critic, budget=budget or self.budget
        )

    async def asolve(
        self, problem: str, *, thread_id: str | None = None, budget: Budget | None = None
    ) -> SolveResult:
        """Solve ``problem``. With a checkpointer and a ``thread_id`` already used, an unfinished
        run resumes where it stopped, and a finished one returns its result without any model call."""
        result: SolveResult | None = None
        async for event in self.astream(problem, thread_id=thread_id, budget=budget):
            if event["event"] == "done":
                result = event["result"]
        assert result is not None
        return result

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
    ) -> AsyncIterator[dict[str, Any]]:
        """The run as events: ``{"event": "step", index, reward, verdict, flagged, critique}`` for
        each critiqued step, ``refining`` / ``refined`` around each refinement, ``solution`` for
        each new solution, and finally ``{"event": "done", "result": SolveResult}``."""
        await self._start()
        async for event in stream_refine(self.graph, self.context(budget), problem, thread_id=thread_id):
            yield event

    async def _start(self) -> None:
        if self._sandbox_config is None or self.critic.sandbox is None:
            return
        if self.critic.sandbox.closed:
            self.critic.sandbox = SandboxPool(self._sandbox_config)
        await self.critic.sandbox.start()

    async def aclose(self) -> None:
        """Close what the solver started itself (its sandbox pool and HTTP clients); a later
        call starts them again."""
        if self._sandbox_config is None:
            return
        from critloop.tools.openai_client import OpenAICompletionModel

        if self.critic.sandbox is not None:
            await self.critic.sandbox.close()
        # HTTP clients hold connections; in-process engines are shared across solvers and stay.
        writers = (self.policy.writer, self.refiner.writer)
        for model in [*(getattr(w, "model", None) for w in writers), self.critic.model]:
            if isinstance(model, OpenAICompletionModel):
                await model.aclose()

    async def __aenter__(self) -> Solver:
        await self._start()
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


def _completion_writer(endpoint: EndpointConfig) -> CompletionWriter:
    return CompletionWriter(
        build_completion_model(endpoint),
        ChatTemplate.from_pretrained(endpoint.tokenizer_ref),
        endpoint.sampling(),
    )


def make_graph(config: Any = None) -> Any:
    """The graph factory named in ``langgraph.json`` (for ``langgraph dev``): the refine graph
    with no checkpointer (the server brings its own), whose runs without a context use the
    models of the config file named by ``$CRITLOOP_CONFIG`` (or the embedded defaults).

    The server calls the factory for every run: the models and the sandbox pool are built once
    per process (and event loop) and shared by every graph it returns.
    """
    return build_refine_graph(default_context=_shared_default_context)


_DEFAULT_CONTEXTS: dict[tuple[str | None, int], asyncio.Future[RefineContext]] = {}


async def _shared_default_context() -> RefineContext:
    import os

    key = (os.environ.get("CRITLOOP_CONFIG") or None, id(asyncio.get_running_loop()))
    future = _DEFAULT_CONTEXTS.get(key)
    if future is None:
        future = _DEFAULT_CONTEXTS[key] = asyncio.ensure_future(_build_default_context(key[0]))
        # A failed build is not kept: the next run tries again (and reports its own error).
        future.add_done_callback(
            lambda f: f.cancelled() or f.exception() is None or _DEFAULT_CONTEXTS.pop(key, None)
        )
    return await asyncio.shield(future)


async def _build_default_context(path: str | None) -> RefineContext:
    # Reading the config and the tokenizers is file I/O: off the event loop.
    solver = await asyncio.to_thread(lambda: Solver.from_config(load_config(path)))
    await solver._start()
    return solver.context()
