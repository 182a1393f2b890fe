"""The refine graph: policy -> critic -> (finalize | refine -> critic ...), on LangGraph.

Clients, the critic and its sandbox pool travel in the runtime context (:class:`RefineContext`),
never in the checkpointed state, which holds only JSON data: with a checkpointer and a
``thread_id``, an interrupted run resumes from its last finished node without repeating the
model calls that node made.

Example:
    >>> graph = build_refine_graph()
    >>> sorted(graph.get_graph().nodes)
    ['__end__', '__start__', 'critic', 'finalize', 'policy', 'refine']
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer
from pydantic import BaseModel, ConfigDict
from typing_extensions import TypedDict

from critloop.agent.critic import CritiqueReport, CritiqueRun, GenPRMCritic, StepReport
from critloop.agent.policy import Policy, Refiner, critique_analysis
from critloop.agent.steps import extract_answer, join_steps
from critloop.agent.writer import Written
from critloop.errors import ConfigError, CritloopError
from critloop.graphs.budget import Budget, Role, StopReason, Usage
from critloop.tools.completion import ModelUsage

__all__ = [
    "BestSolution",
    "ContextFactory",
    "RefineContext",
    "RefineState",
    "RoundRecord",
    "SolveResult",
    "build_refine_graph",
    "release_runs",
    "stream_refine",
]

CRITIQUE_PREVIEW = 280
"""Characters of a critique's analysis carried by a streamed step event."""


@dataclass(kw_only=True)
class RefineContext:
    """What the graph's nodes run with: the roles and the budget. Not checkpointed.

    A field left None is filled from the graph's default context (see
    :func:`build_refine_graph`), which is how ``langgraph dev`` serves the graph.
    """

    policy: Policy | None = None
    """Writes the first solution and continues after a rewritten step."""
    refiner: Refiner | None = None
    """Rewrites the first flagged step (or the whole solution, in ``full`` mode)."""
    critic: GenPRMCritic | None = None
    """The GenPRM critic, with its sandbox pool."""
    budget: Budget | None = None
    """Limits of the run; None: the default context's (else ``Budget()``)."""
    runs: dict[str, CritiqueRun] = field(default_factory=dict)
    """Live critique runs, per problem: chains and sandbox snapshots for incremental re-critique."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    """The node tasks working now. LangGraph lets a node in flight run on when the consumer of
    its stream goes away; :func:`stream_refine` cancels these then (a client disconnected)."""


class RoundRecord(TypedDict):
    """One refinement."""

    round: int
    """1-based."""
    index: int
    """0-based index of the step that was flagged and rewritten."""
    flagged_step: str
    reward: float
    """The flagged step's reward."""
    critique: str
    """The analysis shown to the refiner (from the chain most sure the step is wrong)."""
    rewrite: str
    """The rewritten step (``step`` mode) or the new solution (``full`` mode)."""
    steps: list[str]
    """The solution after this round."""


class BestSolution(TypedDict):
    steps: list[str]
    step_rewards: list[float]
    all_pass: bool
    score: list[float]


class RefineState(TypedDict, total=False):
    """The graph's state (JSON data only, so any checkpointer can store it)."""

    problem: str
    steps: list[str]
    """The current solution."""
    initial_steps: list[str]
    report: dict[str, Any] | None
    """The critic's report on ``steps`` (:class:`CritiqueReport` as JSON)."""
    seen: list[list[str]]
    """Every solution critiqued so far."""
    rounds: list[RoundRecord]
    best: BestSolution | None
    usage: dict[str, Any]
    """:class:`Usage` as JSON."""
    seconds: float
    """Run time so far, summed over nodes (kept across resumes)."""
    stop_reason: StopReason | None
    error: str | None
    final_steps: list[str]
    step_rewards: list[float]
    answer: str | None


class SolveResult(BaseModel):
    """What a refine run gave. JSON-serialisable (``model_dump_json()``)."""

    model_config = ConfigDict(frozen=True)

    problem: str
    answer: str | None
    """The content of the final solution's last ``\\boxed{}``; None when it has none."""
    final_steps: list[str]
    """The best solution seen (all-pass wins, then the longest passing prefix, then the mean
    reward), not merely the last one."""
    initial_steps: list[str]
    """The policy's first solution."""
    step_rewards: list[float]
    """Rewards of the final steps, as far as the critic went (first-error scan)."""
    rounds: list[RoundRecord]
    """One entry per refinement: the flagged step, the critique used, the rewrite."""
    stop_reason: StopReason
    error: str | None = None
    """What failed, when ``stop_reason`` is ``error`` (the trace up to there is kept)."""
    last_report: dict[str, Any] | None = None
    """The critic's last full report (:class:`~critloop.agent.critic.CritiqueReport` as JSON)."""
    usage: Usage
    seconds: float

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SolveResult:
        return cls(
            problem=state["problem"],
            answer=state.get("answer"),
            final_steps=state.get("final_steps") or state.get("steps") or [],
            initial_steps=state.get("initial_steps") or [],
            step_rewards=state.get("step_rewards") or [],
            rounds=state.get("rounds") or [],
            stop_reason=state.get("stop_reason") or "error",
            error=state.get("error") or (None if state.get("stop_reason") else "the run ended unfinished"),
            last_report=state.get("report"),
            usage=Usage.model_validate(state.get("usage") or {}),
            seconds=state.get("seconds", 0.0),
        )


ContextFactory = Callable[[], Awaitable[RefineContext]]


def build_refine_graph(
    *, checkpointer: Checkpointer = None, default_context: ContextFactory | None = None
) -> Any:
    """The compiled refine graph.

    Args:
        checkpointer: any LangGraph saver (e.g. ``AsyncSqliteSaver``) for durable runs; pass a
            ``thread_id`` in the run's config.
        default_context: builds the context for runs that bring none (or bring an incomplete
            one), e.g. the LangGraph server's.
    """
    nodes = _Nodes(default_context)
    graph = StateGraph(RefineState, context_schema=RefineContext)
    graph.add_node("policy", nodes.policy)
    graph.add_node("critic", nodes.critic)
    graph.add_node("refine", nodes.refine)
    graph.add_node("finalize", nodes.finalize)
    graph.add_edge(START, "policy")
    graph.add_conditional_edges("policy", _after_policy, ["critic", "finalize"])
    graph.add_conditional_edges("critic", _after_critic, ["refine", "finalize"])
    graph.add_conditional_edges("refine", _after_refine, ["critic", "finalize"])
    graph.add_edge("finalize", END)
    return graph.compile(checkpointer=checkpointer, name="critloop-refine")


# --------------------------------------------------------------------------- routing


def _after_policy(state: RefineState) -> str:
    return "finalize" if state.get("stop_reason") else "critic"


def _after_critic(state: RefineState) -> str:
    return "finalize" if state.get("stop_reason") else "refine"


def _after_refine(state: RefineState) -> str:
    return "finalize" if state.get("stop_reason") else "critic"


# --------------------------------------------------------------------------- nodes


class _Nodes:
    def __init__(self, default_context: ContextFactory | None) -> None:
        self._default_context = default_context
        self._default: RefineContext | None = None
        self._lock = asyncio.Lock()

    async def _context(self, runtime: Runtime[RefineContext]) -> RefineContext:
        """The run's context, its missing parts filled from the default context. Always has
        every role and a budget."""
        given = runtime.context if isinstance(runtime.context, RefineContext) else RefineContext()
        if given.policy is not None and given.refiner is not None and given.critic is not None:
            if given.budget is None:
                given.budget = Budget()
            return given
        if self._default_context is None:
            raise CritloopError("the refine graph needs a RefineContext with policy, refiner and critic")
        async with self._lock:
            if self._default is None:
                self._default = await self._default_context()
        base = self._default
        return RefineContext(
            policy=given.policy or base.policy,
            refiner=given.refiner or base.refiner,
            critic=given.critic or base.critic,
            budget=given.budget or base.budget or Budget(),
            # A server's empty context brings fresh (empty) runs and tasks: one run, its own.
            runs=given.runs,
            tasks=given.tasks,
        )

    async def policy(self, state: RefineState, runtime: Runtime[RefineContext]) -> dict[str, Any]:
        ctx = await self._context(runtime)
        assert ctx.policy is not None
        async with _Step(state, ctx) as step:
            draft = await ctx.policy.solve(state["problem"])
            step.charge("policy", draft.replies)
            if not draft.steps:
                return step.stop("error", "the policy wrote an empty solution")
            return step.update(steps=draft.steps, initial_steps=draft.steps, seen=[], rounds=[])
        return step.result

    async def critic(self, state: RefineState, runtime: Runtime[RefineContext]) -> dict[str, Any]:
        ctx = await self._context(runtime)
        assert ctx.critic is not None
        writer = runtime.stream_writer
        async with _Step(state, ctx) as step:
            run = ctx.runs.get(state["problem"])
            if run is None:
                run = ctx.runs[state["problem"]] = ctx.critic.run(state["problem"])
                if state.get("report"):
                    run.adopt(CritiqueReport.model_validate(state["report"]))

            def on_step(report: StepReport) -> None:
                writer(_step_event(report))

            samples = (ctx.budget or Budget()).samples
            report = await run.critique(state["steps"], samples=samples, on_step=on_step)
            step.charge_usage("critic", report.usage)
            best = _better(state.get("best"), report)
            update = step.update(
                report=report.model_dump(mode="json"),
                best=best,
                seen=[*state.get("seen", []), list(report.steps)],
            )
            if report.all_pass:
                return step.stop("all_steps_pass", update=update)
            return step.check_budget(len(state.get("rounds", [])), update)
        return step.result

    async def refine(self, state: RefineState, runtime: Runtime[RefineContext]) -> dict[str, Any]:
        ctx = await self._context(runtime)
        assert ctx.refiner is not None
        writer = runtime.stream_writer
        report = CritiqueReport.model_validate(state["report"])
        index = report.first_error
        assert index is not None, "refine runs only after a flagged step"
        flagged = report.step_reports[index]
        doubter = min(flagged.chains, key=lambda chain: chain.reward)
        analysis = critique_analysis(doubter.text)
        number = len(state.get("rounds", [])) + 1
        writer({"event": "refining", "round": number, "index": index, "step": state["steps"][index]})
        async with _Step(state, ctx) as step:
            refinement = await ctx.refiner.refine(state["problem"], state["steps"], index, analysis)
            step.charge("refiner", refinement.replies)
            step.charge("policy", refinement.continued)
            record: RoundRecord = {
                "round": number,
                "index": index,
                "flagged_step": state["steps"][index],
                "reward": flagged.reward,
                "critique": analysis,
                "rewrite": refinement.rewrite,
                "steps": refinement.steps,
            }
            writer({"event": "refined", "round": number, "index": index, "rewrite": refinement.rewrite})
            update = step.update(rounds=[*state.get("rounds", []), record])
            if not refinement.steps:
                return step.stop("no_progress", "the refiner wrote nothing usable", update=update)
            if refinement.steps in state.get("seen", []):
                return step.stop(
                    "no_progress", "the refinement gave back a solution already critiqued", update=update
                )
            # The last report stays: a critic node in a new process adopts it, so that the
            # unchanged prefix is not critiqued again after a resume.
            return {**update, "steps": refinement.steps}
        return step.result

    async def finalize(self, state: RefineState, runtime: Runtime[RefineContext]) -> dict[str, Any]:
        if isinstance(runtime.context, RefineContext):
            run = runtime.context.runs.pop(state["problem"], None)
            if run is not None:
                run.release()  # done with this problem: its sandbox sessions go now
        best = state.get("best")
        steps = best["steps"] if best else state.get("steps", [])
        rewards = best["step_rewards"] if best else []
        return {
            "final_steps": steps,
            "step_rewards": rewards,
            "answer": extract_answer(join_steps(steps)),
            "stop_reason": state.get("stop_reason") or "max_rounds",
        }


def _step_event(report: StepReport) -> dict[str, Any]:
    verdict = max(report.verdicts, key=lambda v: report.verdicts[v])
    doubter = min(report.chains, key=lambda chain: chain.reward)
    preview = critique_analysis(doubter.text)
    return {
        "event": "step",
        "index": report.index,
        "reward": report.reward,
        "verdict": verdict,
        "flagged": report.flagged,
        "reused": report.reused,
        "critique": preview[:CRITIQUE_PREVIEW] + ("..." if len(preview) > CRITIQUE_PREVIEW else ""),
    }


def _better(best: BestSolution | None, report: CritiqueReport) -> BestSolution:
    """The better of ``best`` and the solution ``report`` judged: all-pass wins, then the longer
    passing prefix (as a share of the steps), then the mean step reward; a tie keeps the earlier."""
    rewards = report.rewards
    first = report.first_error
    passed = (first if first is not None else len(rewards)) / len(report.steps)
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    score = [float(report.all_pass), passed, mean]
    if best is not None and best["score"] >= score:
        return best
    return {"steps": list(report.steps), "step_rewards": rewards, "all_pass": report.all_pass, "score": score}


class _Step:
    """One node's work: its time limit (the budget's seconds left), its usage, and the
    conversion of failures into a stop with a named reason (the partial trace is kept)."""

    def __init__(self, state: RefineState, context: RefineContext) -> None:
        self.state = state
        self.budget = context.budget or Budget()
        self._tasks = context.tasks
        self._task = asyncio.current_task()
        self.usage = Usage.model_validate(state.get("usage") or {})
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {}
        self._timeout: contextlib.AbstractAsyncContextManager[Any] | None = None

    @property
    def seconds(self) -> float:
        return self.state.get("seconds", 0.0) + (time.perf_counter() - self.started)

    async def __aenter__(self) -> _Step:
        left = self.budget.max_seconds - self.state.get("seconds", 0.0)
        self._timeout = asyncio.timeout(max(0.0, left))
        await self._timeout.__aenter__()
        if self._task is not None:
            self._tasks.add(self._task)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        assert self._timeout is not None
        self._tasks.discard(self._task)
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            self.result = self.stop("max_seconds", "the time budget ran out during a model call")
            return True
        if isinstance(exc, CritloopError):
            self.result = self.stop("error", f"{type(exc).__name__}: {exc}")
            return True
        return False

    def charge(self, role: Role, replies: Sequence[Written]) -> None:
        for reply in replies:
            self.charge_usage(role, reply.usage)

    def charge_usage(self, role: Role, usage: ModelUsage) -> None:
        self.usage = self.usage.add(role, usage)

    def update(self, **values: Any) -> dict[str, Any]:
        return {**values, "usage": self.usage.model_dump(), "seconds": self.seconds}

    def stop(
        self, reason: StopReason, error: str | None = None, *, update: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {**(update or self.update()), "stop_reason": reason, "error": error}

    def check_budget(self, rounds: int, update: dict[str, Any]) -> dict[str, Any]:
        if rounds >= self.budget.max_rounds:
            return self.stop("max_rounds", update=update)
        if self.usage.completion_tokens >= self.budget.max_tokens:
            return self.stop("max_tokens", update=update)
        if self.seconds >= self.budget.max_seconds:
            return self.stop("max_seconds", update=update)
        return update


async def stream_refine(
    graph: Any, context: RefineContext, problem: str, *, thread_id: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Run ``graph`` on ``problem`` and yield its events (see :meth:`critloop.Solver.astream`),
    ending with ``{"event": "done", "result": SolveResult}``. With a checkpointer and a
    ``thread_id`` already used, an unfinished run resumes from its last finished node, and a
    finished one yields its result without any model call."""
    if not problem.strip():
        raise ConfigError("the problem is empty")
    config = {"configurable": {"thread_id": thread_id or uuid.uuid4().hex}}
    graph_input: dict[str, Any] | None = {"problem": problem}
    if thread_id is not None and graph.checkpointer is not None:
        saved = await graph.aget_state(config)
        if saved.values and saved.values.get("problem") not in (None, problem):
            raise ConfigError(f"thread {thread_id!r} belongs to another problem")
        if saved.values.get("final_steps") is not None and not saved.next:
            # Finished before: its result, without any model call.
            yield {"event": "done", "result": SolveResult.from_state(saved.values)}
            return
        if saved.next:
            graph_input = None  # resume from the last finished node
        # Else nothing usable was saved (a kill before the first node finished): start over.
    state: dict[str, Any] = {}
    try:
        async for mode, chunk in graph.astream(
            graph_input, config, context=context, stream_mode=["custom", "values"]
        ):
            if mode == "custom":
                yield chunk
                continue
            if chunk.get("steps") and chunk.get("steps") != state.get("steps") and "final_steps" not in chunk:
                yield {"event": "solution", "steps": chunk["steps"], "round": len(chunk.get("rounds") or [])}
            state = chunk
    finally:
        for task in list(context.tasks):
            task.cancel()  # nothing when the run finished; the nodes in flight when it was abandoned
        release_runs(context)
    yield {"event": "done", "result": SolveResult.from_state(state)}


def release_runs(context: RefineContext) -> None:
    """Release the sandbox sessions of a context's critique runs (without waiting)."""
    for run in list(context.runs.values()):
        run.release()
    context.runs.clear()
