"""The refine graph: policy -> critic -> (finalize | refine -> critic ...), on LangGraph.

The graph's input is :class:`RefineInput` (the problem), its output :class:`RefineOutput` (a
:class:`~critloop.graphs.result.SolveResult` as JSON). The roles and the budget travel in the
runtime context (:class:`RefineContext`, immutable run data), never in the checkpointed state,
which holds only JSON data: with a checkpointer and a ``thread_id``, an interrupted run resumes
from its last finished node without repeating the model calls that node made. Every input starts
a new run, also on a thread that finished one; ``None`` resumes an interrupted run.

Example:
    >>> graph = build_refine_graph()
    >>> sorted(graph.get_graph().nodes)
    ['__end__', '__start__', 'critic', 'finalize', 'policy', 'refine']
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from langchain_core.runnables import RunnableConfig
from langgraph.channels import EphemeralValue
from langgraph.config import get_config
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer
from typing_extensions import TypedDict

from critloop.agent.budget import Budget, StopReason, Usage, UsageMeter
from critloop.agent.critic import CritiqueReport, CritiqueRun, GenPRMCritic, StepReport
from critloop.agent.policy import Policy, Refiner, critique_analysis
from critloop.agent.steps import extract_answer, join_steps
from critloop.errors import BudgetExceededError, ConfigError, CritloopError
from critloop.graphs import events
from critloop.graphs.events import DoneEvent, RunEvent, StepEvent
from critloop.graphs.result import ErrorSource, RoundRecord, SolveResult, error_source
from critloop.tools import tracing

__all__ = [
    "BestSolution",
    "ContextFactory",
    "RefineContext",
    "RefineGraph",
    "RefineInput",
    "RefineOutput",
    "RefineState",
    "build_refine_graph",
    "stream_refine",
]


@dataclass(frozen=True, kw_only=True)
class RefineContext:
    """What the graph's nodes run with: the roles and the budget. Immutable, not checkpointed,
    and shared freely: two runs through one context share nothing but these objects.

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


_Problem = Annotated[str, EphemeralValue(str)]
"""The input's problem holds for one step only: an input without one cannot pick up the
problem of the thread's previous run (the run keeps its own in ``run_problem``)."""


class RefineInput(TypedDict):
    """The graph's input: a new run on ``problem``."""

    problem: _Problem


class RefineOutput(TypedDict):
    """The graph's output: :class:`~critloop.graphs.result.SolveResult`'s fields, as JSON."""

    problem: _Problem
    answer: str | None
    final_steps: list[str]
    initial_steps: list[str]
    step_rewards: list[float]
    rounds: list[RoundRecord]
    stop_reason: StopReason | None
    error: str | None
    error_source: ErrorSource | None
    last_report: dict[str, Any] | None
    """The critic's last report on the current solution (:class:`CritiqueReport` as JSON)."""
    usage: dict[str, Any]
    """:class:`~critloop.agent.budget.Usage` as JSON, of this run."""
    seconds: float
    """Run time so far, summed over nodes (kept across resumes)."""


class BestSolution(TypedDict):
    steps: list[str]
    step_rewards: list[float]
    all_pass: bool
    score: list[float]


class RefineState(RefineOutput):
    """The graph's state: its output, and the run's working data (JSON only, so any
    checkpointer can store it)."""

    run_problem: str
    """The problem of this run (the input's ``problem`` lasts one step)."""
    steps: list[str]
    """The current solution."""
    seen: list[list[str]]
    """Every solution critiqued so far."""
    best: BestSolution | None


RefineGraph = CompiledStateGraph[RefineState, RefineContext, RefineInput, RefineOutput]
"""The compiled refine graph, typed."""

ContextFactory = Callable[[], Awaitable[RefineContext]]

_LIVE_RUN = "critloop_live_run"
"""The ``configurable`` key under which :func:`stream_refine` hands the nodes its run's live
objects (not JSON; never checkpointed)."""


def build_refine_graph(
    *, checkpointer: Checkpointer = None, default_context: ContextFactory | None = None
) -> RefineGraph:
    """The compiled refine graph.

    Args:
        checkpointer: any LangGraph saver (e.g. ``AsyncSqliteSaver``) for durable runs; pass a
            ``thread_id`` in the run's config.
        default_context: builds the context for runs that bring none (or bring an incomplete
            one), e.g. the LangGraph server's. Called once, on the first such run.
    """
    nodes = _Nodes(default_context)
    graph = StateGraph(
        RefineState, context_schema=RefineContext, input_schema=RefineInput, output_schema=RefineOutput
    )
    graph.add_node("policy", nodes.policy)
    graph.add_node("critic", nodes.critic)
    graph.add_node("refine", nodes.refine)
    graph.add_node("finalize", nodes.finalize)
    graph.add_edge(START, "policy")
    graph.add_conditional_edges("policy", _unless_stopped("critic"), ["critic", "finalize"])
    graph.add_conditional_edges("critic", _unless_stopped("refine"), ["refine", "finalize"])
    graph.add_conditional_edges("refine", _unless_stopped("critic"), ["critic", "finalize"])
    graph.add_edge("finalize", END)
    return graph.compile(checkpointer=checkpointer, name="critloop-refine")


def _unless_stopped(then: str) -> Callable[[RefineState], str]:
    def route(state: RefineState) -> str:
        return "finalize" if state.get("stop_reason") else then

    return route


# --------------------------------------------------------------------------- per-run objects


@dataclass(eq=False)
class _LiveRun:
    """One run's live objects, owned by :func:`stream_refine` (never by the shared context).

    Without one (a run started by LangGraph itself, e.g. under ``langgraph dev``), each critic
    node opens its own critique run, continues from the checkpointed report, and closes it.
    """

    critique: CritiqueRun | None = None
    """Chains and sandbox snapshots kept across critic nodes for incremental re-critique."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    """The node tasks working now. LangGraph lets a node in flight run on when the consumer of
    its stream goes away; :func:`stream_refine` cancels these then (a client disconnected)."""

    async def finish(self) -> None:
        """Release a finished run (:meth:`CritiqueRun.finish`: no session left counted open)."""
        if self.critique is not None:
            await self.critique.finish()
            self.critique = None

    def release(self) -> None:
        for task in list(self.tasks):
            task.cancel()  # nothing when the run finished; the nodes in flight when it was abandoned
        if self.critique is not None:
            self.critique.release()  # done with this problem: its sandbox sessions go now
            self.critique = None


def _live_run() -> _LiveRun | None:
    live = get_config().get("configurable", {}).get(_LIVE_RUN)
    return live if isinstance(live, _LiveRun) else None


# --------------------------------------------------------------------------- nodes


class _Nodes:
    def __init__(self, default_context: ContextFactory | None) -> None:
        self._default_context = default_context
        self._default: RefineContext | None = None
        self._lock = asyncio.Lock()

    async def _context(self, runtime: Runtime[RefineContext]) -> _Roles:
        """The run's roles and budget, its missing parts filled from the default context."""
        given = runtime.context if isinstance(runtime.context, RefineContext) else RefineContext()
        if given.policy is None or given.refiner is None or given.critic is None:
            if self._default_context is None:
                raise CritloopError("the refine graph needs a RefineContext with policy, refiner and critic")
            async with self._lock:
                if self._default is None:
                    self._default = await self._default_context()
            base = self._default
            given = dataclasses.replace(
                given,
                policy=given.policy or base.policy,
                refiner=given.refiner or base.refiner,
                critic=given.critic or base.critic,
                budget=given.budget or base.budget,
            )
        assert given.policy is not None and given.refiner is not None and given.critic is not None
        return _Roles(given.policy, given.refiner, given.critic, given.budget or Budget())

    async def policy(self, state: RefineState, runtime: Runtime[RefineContext]) -> dict[str, Any]:
        # The first node of every run: a new input on a thread that finished a run starts
        # afresh, so every per-run field is reset here.
        problem = _problem(state)
        roles = await self._context(runtime)
        fresh: dict[str, Any] = {
            "run_problem": problem,
            "steps": [],
            "initial_steps": [],
            "seen": [],
            "rounds": [],
            "best": None,
            "last_report": None,
            "final_steps": [],
            "step_rewards": [],
            "answer": None,
            "stop_reason": None,
            "error": None,
            "error_source": None,
        }
        async with _NodeRun(roles.budget, Usage(), 0.0, fresh, _live_run()) as node:
            draft = await roles.policy.solve(problem, meter=node.meter)
            if not draft.steps:
                return node.stop("error", "the policy wrote an empty solution")
            runtime.stream_writer(events.SolutionEvent(steps=draft.steps, round=0).to_json())
            return node.update(steps=draft.steps, initial_steps=draft.steps)
        return node.result

    async def critic(self, state: RefineState, runtime: Runtime[RefineContext]) -> dict[str, Any]:
        roles = await self._context(runtime)
        live = _live_run()
        writer = runtime.stream_writer
        async with _NodeRun.resume(roles.budget, state, live) as node:
            run = live.critique if live is not None else None
            if run is None:
                run = roles.critic.run(state["run_problem"])
                if state.get("last_report"):
                    # Continue from the checkpointed report: its unchanged prefix is not
                    # critiqued again (a resume in a new process, or a run with no live objects).
                    run.adopt(CritiqueReport.model_validate(state["last_report"]))
                if live is not None:
                    live.critique = run
            try:
                report = await run.critique(
                    state["steps"],
                    samples=roles.budget.samples,
                    on_step=lambda step: writer(_step_event(step).to_json()),
                    meter=node.meter,
                )
            except BaseException:
                if live is None:
                    run.release()
                raise
            if live is None:
                await run.finish()
            update = node.update(
                last_report=report.model_dump(mode="json"),
                best=_better(state.get("best"), report),
                seen=[*state["seen"], list(report.steps)],
            )
            if report.all_pass:
                return node.stop("all_steps_pass", update=update)
            spent = roles.budget.spent(node.meter.usage, node.meter.seconds, rounds=len(state["rounds"]))
            return node.stop(spent, update=update) if spent else update
        return node.result

    async def refine(self, state: RefineState, runtime: Runtime[RefineContext]) -> dict[str, Any]:
        roles = await self._context(runtime)
        writer = runtime.stream_writer
        assert state["last_report"] is not None
        report = CritiqueReport.model_validate(state["last_report"])
        index = report.first_error
        assert index is not None, "refine runs only after a flagged step"
        flagged = report.step_reports[index]
        doubter = min(flagged.chains, key=lambda chain: chain.reward)
        analysis = critique_analysis(doubter.text)
        number = len(state["rounds"]) + 1
        steps = state["steps"]
        writer(events.RefiningEvent(round=number, index=index, step=steps[index]).to_json())
        attributes = {"critloop.round": number, "critloop.step.index": index, "input.value": steps[index]}
        async with _NodeRun.resume(roles.budget, state, _live_run()) as node:
            with tracing.span("refine.round", "CHAIN", attributes) as current:
                refinement = await roles.refiner.refine(
                    state["run_problem"], steps, index, analysis, meter=node.meter
                )
                tracing.record(
                    current,
                    {"output.value": refinement.rewrite, "critloop.solution": join_steps(refinement.steps)},
                )
            record: RoundRecord = {
                "round": number,
                "index": index,
                "flagged_step": steps[index],
                "reward": flagged.reward,
                "critique": analysis,
                "rewrite": refinement.rewrite,
                "steps": refinement.steps,
            }
            writer(events.RefinedEvent(round=number, index=index, rewrite=refinement.rewrite).to_json())
            update = node.update(rounds=[*state["rounds"], record])
            if not refinement.steps:
                return node.stop("no_progress", "the refiner wrote nothing usable", update=update)
            if refinement.steps in state["seen"]:
                return node.stop(
                    "no_progress", "the refinement gave back a solution already critiqued", update=update
                )
            writer(events.SolutionEvent(steps=refinement.steps, round=number).to_json())
            # The last report stays: the next critic node continues from it, so that the
            # unchanged prefix is not critiqued again.
            return {**update, "steps": refinement.steps}
        return node.result

    async def finalize(self, state: RefineState) -> dict[str, Any]:
        best = state.get("best")
        steps = best["steps"] if best else state.get("steps", [])
        return {
            "problem": state["run_problem"],
            "final_steps": steps,
            "step_rewards": best["step_rewards"] if best else [],
            "answer": extract_answer(join_steps(steps)),
            "stop_reason": state.get("stop_reason") or "max_rounds",
        }


@dataclass(frozen=True)
class _Roles:
    policy: Policy
    refiner: Refiner
    critic: GenPRMCritic
    budget: Budget


def _problem(state: RefineState) -> str:
    problem = state.get("problem")
    if not isinstance(problem, str):
        raise ConfigError(
            "the refine graph's input needs the key 'problem' (the problem's text), e.g. "
            "{'problem': 'What is 2 + 3 * 4?'}"
        )
    if not problem.strip():
        raise ConfigError("the problem is empty")
    return problem


def _step_event(report: StepReport) -> StepEvent:
    verdict = max(report.verdicts, key=lambda v: report.verdicts[v])
    doubter = min(report.chains, key=lambda chain: chain.reward)
    analysis = critique_analysis(doubter.text)
    return StepEvent(
        index=report.index,
        reward=report.reward,
        verdict=verdict,
        flagged=report.flagged,
        reused=report.reused,
        critique=events.preview(analysis, events.CRITIQUE_PREVIEW),
        tier=report.tier,
        code_runs=tuple(
            run.model_copy(
                update={
                    "code": events.preview(run.code, events.CODE_PREVIEW),
                    "output": events.preview(run.output, events.CODE_PREVIEW),
                }
            )
            for run in doubter.code_runs
        ),
    )


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


class _NodeRun:
    """One node's work: its meter (every model call checks the budget through it), its time
    limit (the budget's seconds left), and the conversion of failures into a stop with a named
    reason (the partial trace is kept).

    Args:
        budget: the run's limits.
        usage: the run's usage before this node.
        seconds: the run's seconds before this node.
        base: fields every update of this node carries.
        live: the run's live objects, where the node registers its task.
    """

    def __init__(
        self,
        budget: Budget,
        usage: Usage,
        seconds: float,
        base: dict[str, Any] | None = None,
        live: _LiveRun | None = None,
    ) -> None:
        self.meter = UsageMeter(budget, usage=usage, seconds=seconds)
        self.result: dict[str, Any] = {}
        self._base = base or {}
        self._live = live
        self._task = asyncio.current_task()
        self._timeout: asyncio.Timeout | None = None

    @classmethod
    def resume(cls, budget: Budget, state: RefineState, live: _LiveRun | None) -> _NodeRun:
        """A node that continues the run of ``state``."""
        usage = Usage.model_validate(state.get("usage") or {})
        return cls(budget, usage, state.get("seconds", 0.0), live=live)

    async def __aenter__(self) -> _NodeRun:
        self._timeout = asyncio.timeout(self.meter.seconds_left)
        await self._timeout.__aenter__()
        if self._live is not None and self._task is not None:
            self._live.tasks.add(self._task)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        assert self._timeout is not None
        if self._live is not None and self._task is not None:
            self._live.tasks.discard(self._task)
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            self.result = self.stop("max_seconds", "the time budget ran out during a model call")
            return True
        if isinstance(exc, BudgetExceededError):
            # A limit was reached before a model call: a planned stop, not a failure.
            self.result = self.stop(exc.reason)
            return True
        if isinstance(exc, CritloopError):
            self.result = {
                **self.stop("error", f"{type(exc).__name__}: {exc}"),
                "error_source": error_source(exc),
            }
            return True
        return False

    def update(self, **values: Any) -> dict[str, Any]:
        return {
            **self._base,
            **values,
            "usage": self.meter.usage.model_dump(mode="json"),
            "seconds": self.meter.seconds,
        }

    def stop(
        self, reason: StopReason, error: str | None = None, *, update: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {**(update or self.update()), "stop_reason": reason, "error": error}


# --------------------------------------------------------------------------- streaming


async def stream_refine(
    graph: RefineGraph, context: RefineContext, problem: str, *, thread_id: str | None = None
) -> AsyncIterator[RunEvent]:
    """Run ``graph`` on ``problem`` and yield its events (see :meth:`critloop.Solver.astream`),
    ending with a :class:`~critloop.graphs.events.DoneEvent`. With a checkpointer and a
    ``thread_id`` already used, an unfinished run resumes from its last finished node, and a
    finished one yields its result without any model call.

    Raises:
        ConfigError: the problem is empty, or ``thread_id`` holds a run of another problem.
    """
    if not problem.strip():
        raise ConfigError("the problem is empty")
    live = _LiveRun()
    config: RunnableConfig = {"configurable": {"thread_id": thread_id or uuid.uuid4().hex, _LIVE_RUN: live}}
    graph_input: RefineInput | None = {"problem": problem}
    if thread_id is not None and graph.checkpointer is not None:
        saved = await graph.aget_state(config)
        if saved.values and saved.values.get("run_problem") not in (None, problem):
            raise ConfigError(f"thread {thread_id!r} belongs to another problem")
        if saved.values.get("stop_reason") is not None and not saved.next:
            # Finished before: its result, without any model call.
            yield DoneEvent(result=_result(saved.values))
            return
        if saved.next:
            graph_input = None  # resume from the last finished node
        # Else nothing usable was saved (a kill before the first node finished): start over.
    output: dict[str, Any] = {"problem": problem}
    finished = False
    run_span = tracing.start("critloop.solve", "CHAIN", {"input.value": problem, "session.id": thread_id})
    try:
        parts = graph.astream(
            graph_input, config, context=context, stream_mode=["custom", "values"], version="v2"
        )
        async for part in tracing.within(run_span, parts):
            if part["type"] == "custom":
                yield events.parse_event(part["data"])
            elif part["type"] == "values":
                output = dict(part["data"])
        finished = True
    finally:
        if not finished:
            live.release()  # abandoned or failed: nothing may be awaited here
        # From the output as it stands: a run abandoned or failed has no whole result.
        tracing.end(
            run_span,
            {
                "output.value": output.get("answer"),
                "critloop.stop_reason": output.get("stop_reason") or ("error" if finished else "unfinished"),
                "critloop.rounds": len(output.get("rounds") or ()),
                "critloop.error": output.get("error"),
            },
        )
    await live.finish()
    yield DoneEvent(result=_result(output))


def _result(output: dict[str, Any]) -> SolveResult:
    """The result of a run's output (or of what an unfinished run left)."""
    if output.get("stop_reason") is None:
        output = {
            **output,
            "stop_reason": "error",
            "error": output.get("error") or "the run ended unfinished",
        }
    fields = {name: output[name] for name in SolveResult.model_fields if output.get(name) is not None}
    return SolveResult.model_validate(
        {"answer": None, "final_steps": [], "initial_steps": [], "step_rewards": [], "rounds": []}
        | {"usage": {}, "seconds": 0.0}
        | fields
    )
