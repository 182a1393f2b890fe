"""The batch methods as recipes: a config and the method's parameters, picklable, so that a run
opens the same method in this process or on every worker of a Ray cluster.

Each recipe opens its roles from the config (models, sandbox pool, clients) and gives the
record maker of one item; :func:`~critloop.graphs.batch.run_method` runs it over a dataset.

Example:
    >>> from critloop.config import load_config
    >>> from critloop.graphs.batch import load_problems, run_method
    >>> problems, bad = load_problems("gsm8k_test.jsonl", limit=20)  # doctest: +SKIP
    >>> method = RefineMethod(config=load_config("critloop.toml"))  # doctest: +SKIP
    >>> await run_method(method, problems, "results.jsonl", concurrency=16, bad=bad)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critloop.config import CritloopConfig
from critloop.graphs.batch import (
    MakeRecord,
    Problem,
    error_record,
    open_checkpointer,
    record_id,
    solve_record,
)
from critloop.graphs.bon import Aggregation, aggregate, best_of_n_error_record, best_of_n_record
from critloop.graphs.processbench import ProcessBenchRecord, failed_line, result_key, result_line
from critloop.graphs.refine import build_refine_graph
from critloop.graphs.synth import (
    Stage,
    StageItem,
    failed_record,
    monte_carlo,
    sample_paths,
    teacher_rationales,
)
from critloop.solver import Solver

__all__ = ["BestOfNMethod", "ProcessBenchMethod", "RefineMethod", "SynthMethod"]


@dataclass(frozen=True, kw_only=True)
class RefineMethod:
    """The refine loop over problems (``critloop batch``): one graded record per problem."""

    config: CritloopConfig
    """The roles, critic, sandbox and budget."""
    checkpoints: Path | None = None
    """A SQLite file of per-problem checkpoints: a problem interrupted by a crash resumes from its
    last finished node. None: no checkpoints, an interrupted problem starts over (Ray runs: the
    nodes share no file)."""
    details: int = 0
    """Keep every judged step's critique and code runs in the record (``critiques``), each text
    cut to this many characters; 0: leave them out."""

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[MakeRecord]:
        """The solver of the config, opened and loaded, and the record maker of one problem."""
        async with Solver.from_config(self.config) as solver, contextlib.AsyncExitStack() as stack:
            await _started(solver)
            saver = None
            if self.checkpoints is not None:
                saver = await stack.enter_async_context(open_checkpointer(self.checkpoints))
            graph = build_refine_graph(checkpointer=saver)
            context = solver.context()

            async def make_record(problem: Problem) -> dict[str, Any]:
                return await solve_record(graph, context, problem, details=self.details)

            yield make_record

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return record_id(record)

    def failed(self, item: Problem, error: str) -> dict[str, Any]:
        return error_record(item.id, error, problem=item.problem, gold=item.gold)


@dataclass(frozen=True, kw_only=True)
class BestOfNMethod:
    """Best-of-N over problems (``critloop bon``): ``n`` solutions each, the critic's pick."""

    config: CritloopConfig
    """The roles, critic and sandbox."""
    n: int = 8
    """Policy samples per problem."""
    aggregation: Aggregation = "min"
    """How a solution's step rewards make its score."""

    def __post_init__(self) -> None:
        if self.n < 1:
            from critloop.errors import ConfigError

            raise ConfigError("n must be at least 1")
        aggregate([], self.aggregation)  # checks the name before anything opens

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[MakeRecord]:
        """The solver of the config, opened and loaded, and the record maker of one problem."""
        async with Solver.from_config(self.config) as solver:
            await _started(solver)

            async def make_record(problem: Problem) -> dict[str, Any]:
                return await best_of_n_record(
                    solver.policy, solver.critic, problem, n=self.n, aggregation=self.aggregation
                )

            yield make_record

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return record_id(record)

    def failed(self, item: Problem, error: str) -> dict[str, Any]:
        return best_of_n_error_record(item, error, self.aggregation)


@dataclass(frozen=True, kw_only=True)
class ProcessBenchMethod:
    """The critic on ProcessBench samples (``critloop eval processbench``): one line each."""

    config: CritloopConfig
    """The critic and its sandbox (the policy is not used)."""
    samples: int | None = None
    """Critique chains per solution (Maj@N); None: the config's."""

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[MakeRecord]:
        """The critic of the config with its sandbox pool, and the record maker of one sample."""
        from critloop.agent.critic import GenPRMCritic
        from critloop.sandbox import SandboxPool

        async with SandboxPool(self.config.sandbox) as pool:
            critic = GenPRMCritic.from_config(self.config.critic, pool)
            try:
                gc.freeze()

                async def make_record(record: ProcessBenchRecord) -> dict[str, Any]:
                    return await result_line(critic, record, samples=self.samples)

                yield make_record
            finally:
                await critic.model.aclose()

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return result_key(record)

    def failed(self, item: ProcessBenchRecord, error: str) -> dict[str, Any]:
        return failed_line(item, error)


@dataclass(frozen=True, kw_only=True)
class SynthMethod:
    """A stage of ``critloop synth`` over problems (``paths``) or the previous stage's records
    (``mc``, ``rationales``): one record per problem.

    The policy's endpoint samples the paths and completes the prefixes; the teacher
    (``[synth.teacher]``, else the policy's endpoint) writes the rationales, its code running
    in the config's sandbox. ``requests`` bounds the model requests in flight in this process
    (on Ray, on each worker): a problem of the ``mc`` stage sends many at once.
    """

    config: CritloopConfig
    """The models, the sandbox and ``[synth]``."""
    stage: Stage
    """Which stage (see :data:`~critloop.graphs.synth.Stage`)."""
    requests: int = 64
    """Model requests in flight at most."""

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[MakeRecord]:
        """The stage's model (and the teacher's sandbox pool), and the record maker of one item."""
        import asyncio

        from critloop.agent.teacher import Teacher
        from critloop.sandbox import SandboxPool
        from critloop.tools.chat_template import ChatTemplate
        from critloop.tools.endpoint import build_completion_model
        from critloop.tools.local_engine import TransformersEngine

        cfg, synth = self.config, self.config.synth
        endpoint = cfg.teacher if self.stage == "rationales" else cfg.policy
        gate = asyncio.Semaphore(self.requests)
        model = build_completion_model(endpoint)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(model.aclose)
            template = ChatTemplate.from_pretrained(endpoint.tokenizer_ref)
            if isinstance(model, TransformersEngine):
                await asyncio.to_thread(model.load)
            make_record: MakeRecord
            if self.stage == "rationales":
                pool = await stack.enter_async_context(SandboxPool(cfg.sandbox))
                teacher = Teacher(
                    model,
                    template,
                    sandbox=pool,
                    sampling=endpoint.sampling(max_tokens=synth.teacher_max_tokens),
                    samples=synth.teacher_samples,
                    code_runs=synth.teacher_code_runs,
                    code_timeout_seconds=cfg.critic.code_timeout_seconds,
                    max_code_output_chars=cfg.critic.max_code_output_chars,
                    gate=gate,
                )

                async def make_record(item: StageItem) -> dict[str, Any]:
                    return await _or_failed(teacher_rationales(teacher, item.record), item.record)

            elif self.stage == "mc":

                async def make_record(item: StageItem) -> dict[str, Any]:
                    return await _or_failed(
                        monte_carlo(model, template, item.record, synth, gate=gate), item.record
                    )

            else:

                async def make_record(item: Problem) -> dict[str, Any]:
                    problem = {"id": item.id, "problem": item.problem, "gold": item.gold}
                    return await _or_failed(sample_paths(model, template, item, synth, gate=gate), problem)

            gc.freeze()
            yield make_record

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return record_id(record)

    def failed(self, item: Problem | StageItem, error: str) -> dict[str, Any]:
        record = (
            item.record
            if isinstance(item, StageItem)
            else {"id": item.id, "problem": item.problem, "gold": item.gold}
        )
        return failed_record(record, error)


async def _or_failed(making: Awaitable[dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    """The record ``making`` makes, or the failed record of the problem ``record`` names."""
    try:
        return await making
    except Exception as exc:  # noqa: BLE001 - one problem's failure is its record, the run goes on
        return failed_record(record, f"{type(exc).__name__}: {exc}")


async def _started(solver: Solver) -> None:
    """Load the solver's in-process models, then keep what start-up loaded (tokenizers, torch)
    out of the garbage collector's full passes, which otherwise stall the event loop."""
    await solver.load_models()
    gc.freeze()
