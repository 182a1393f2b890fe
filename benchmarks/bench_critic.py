"""Benchmark of the GenPRM critic's concurrency and of its framework overhead, in one run.

Run from the repository root (the sandbox image must be built: ``critloop sandbox build``; the
embedded model's tokenizer is fetched and cached on first use)::

    .venv/bin/python benchmarks/bench_critic.py [--quick] [--full-sequential] [--json OUT]

What it measures, end to end as a caller sees it (``time.perf_counter``), with the real
:class:`GenPRMCritic`, :class:`OpenAICompletionModel`, the embedded model's chat template and
tokenizer, and a Docker :class:`SandboxPool` (2 kernels):

1. Concurrency, a SIMULATION: a fake OpenAI-compatible server (``_fake_server.py``, a separate
   asyncio process) plays a GenPRM critic that writes code once and then says Yes, and answers
   every request after a fixed delay (100 ms), so each step costs each chain 3 sequential calls.
   K solutions x S steps x N chains are critiqued (a) by critloop, all K ``critique(...,
   scan="all", samples=N)`` calls at once (``asyncio.gather``), and (b) as the reference
   implementation does, one request at a time: a plain loop over solutions and chains, one
   ``critique(..., samples=1)`` per chain. (b) takes minutes, so it runs on a subset of the
   solutions and is extrapolated linearly to K (``--full-sequential`` runs all of it). The
   server counts the requests it saw; the ideal time of one solution is its critical path,
   S x 3 rounds x delay, and all K run side by side. Every run freezes the heap first
   (``gc.freeze()``), as critloop's CLI commands and server do after start-up; a diagnostic
   run without it shows what a plain Python process pays. An instrumented re-run of (a) splits each
   solution's wall time along its critical path (model calls, sandbox exec, tokenizer and
   template work, session open/close) and reports the event loop's lag and the CPU time of the
   client, the server and the sandbox containers.
2. Framework overhead per stage against an instant server (no delay): one solution of S steps
   with one chain, critiqued sequentially several times; per-stage time = wall / completion
   calls, next to the median of bare ``OpenAICompletionModel.complete()`` calls replaying the
   very same prompts and parameters against the same server. The difference is what the
   critic adds per call: prompt building with the chat template, tokenizer counts, verdict and
   reward parsing, and the sandbox session (open, exec of the verify round, close).

3. The cascade, a SIMULATION on the same fake server (100 ms per request): the same K x S x N
   critiques, all at once, with the full protocol and with ``cascade = true``, on records whose
   steps are scripted (markers the server reads) so that of every 8 steps 6 are sure at a glance,
   1 after its analysis and 1 only after code. Per chain and step: model calls, prompt and
   completion tokens, sandbox runs, sessions opened and forks; the share of steps each tier
   decided; the wall time against each mode's critical path. The modes alternate over repeats,
   medians reported.

``--only concurrency|overhead|cascade`` runs one section.

The server process is stopped and the sandbox pool closed at the end, even on error, Ctrl-C or
SIGTERM. This is a benchmark, not a test: it exits 0 when a target is missed (the verdicts are
printed), and 1 when a measurement failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import itertools
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report
from _fake_server import (
    UNSURE_AFTER_ANALYSIS,
    UNSURE_AT_A_GLANCE,
    YES_ALTERNATIVES,
    FakeCriticServer,
    classify,
    run_against,
)
from _machine import cpu_model as _cpu_model
from _machine import mem_total_gib as _mem_total_gib
from _machine import version as _version
from _process import cpu_seconds, interrupt_on_sigterm

import critloop.agent._critique as critique_module
from critloop.agent.critic import CriticConfig, CritiqueReport, GenPRMCritic
from critloop.sandbox import SandboxConfig, SandboxPool, Session
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionResult, SamplingParams
from critloop.tools.openai_client import OpenAICompletionModel

ROUNDS = 3
"""Completion calls per step and chain with this server: analyze, verify (writes code), judgement."""
POOL_SIZE = 2
TARGETS = {"concurrent_vs_ideal": 1.3, "overhead_per_stage_ms": 2.0}
TEMPERATURE = 0.6
"""The critic's sampling temperature (GenPRM's); its logprobs are raw, so rewards rescale by it."""


def _reward(alternatives: dict[str, float]) -> float:
    """The reward of a Yes with these raw logprobs: P(Yes) / (P(Yes) + P(No)) after temperature."""
    return 1.0 / (1.0 + math.exp((alternatives["No"] - alternatives["Yes"]) / TEMPERATURE))


EXPECTED_REWARD = _reward(YES_ALTERNATIVES)
CASCADE_PATTERN = ("direct",) * 6 + ("analysis", "code")
"""The tier that decides each of 8 consecutive steps (counted through all the solutions) of the
cascade section's records."""
CASCADE_CALLS = {"direct": 1, "analysis": 3, "code": 5}
"""Calls per chain of a step the tier decides: the direct judgement; then the analysis and its
judgement; then the verify round (code) and the judgement after its output."""


@dataclass(frozen=True)
class Plan:
    solutions: int
    """K: solutions critiqued at once."""
    steps: int
    """S: steps per solution (all scored: scan="all")."""
    chains: int
    """N: critique chains per solution (samples)."""
    sequential_solutions: int
    """Solutions the sequential baseline really runs (the rest is extrapolated)."""
    delay_ms: float
    overhead_steps: int
    overhead_repeats: int
    overhead_warmup: int
    bare_passes: int
    """Passes of bare complete() calls over the recorded prompts of one critique."""
    cascade_repeats: int
    """Runs of each mode in the cascade section (alternating)."""


FULL = Plan(
    solutions=16, steps=8, chains=8, sequential_solutions=2, delay_ms=100.0,
    overhead_steps=8, overhead_repeats=20, overhead_warmup=3, bare_passes=20, cascade_repeats=4,
)  # fmt: skip
QUICK = Plan(
    solutions=4, steps=4, chains=4, sequential_solutions=1, delay_ms=100.0,
    overhead_steps=4, overhead_repeats=5, overhead_warmup=2, bare_passes=5, cascade_repeats=2,
)  # fmt: skip


@dataclass
class Report:
    command: str
    mode: str
    machine: dict[str, Any]
    plan: dict[str, Any]
    concurrency: dict[str, Any] = field(default_factory=dict)
    breakdown: dict[str, Any] = field(default_factory=dict)
    overhead: dict[str, Any] = field(default_factory=dict)
    cascade: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- machine facts


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpus (os.cpu_count)": os.cpu_count(),
        "cpus usable (affinity)": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "critloop": _version("critloop"),
        "aiohttp": _version("aiohttp"),
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
    }
    try:
        from critloop.sandbox.docker_backend import docker_client
        from critloop.sandbox.image import image_tag

        facts["docker_engine"] = docker_client(timeout=5).version().get("Version", "?")
        facts["sandbox_image"] = image_tag()
    except Exception as exc:  # noqa: BLE001 - reported; the pool start fails clearly later
        facts["docker_engine"] = f"unavailable ({type(exc).__name__}: {exc})"
    facts["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return facts


async def _containers_cpu_seconds(pool: SandboxPool) -> float | None:
    """CPU seconds used so far by the pool's kernel containers (Docker stats), None if unknown."""
    names = [k.name for k in pool._kernels if k.alive]

    def read() -> float | None:
        from critloop.sandbox.docker_backend import docker_client

        client = docker_client(timeout=5)
        total = 0
        for name in names:
            stats = client.containers.get(name).stats(stream=False, one_shot=True)
            total += int(stats["cpu_stats"]["cpu_usage"]["total_usage"])
        return total / 1e9

    try:
        return await asyncio.to_thread(read)
    except Exception:  # noqa: BLE001 - a missing number, not a failed benchmark
        return None


class CpuMeter:
    """CPU seconds of this process, the server and the sandbox containers over a stretch, and
    this process's full (generation 2) garbage collections: they stop the event loop."""

    def __init__(self, server_pid: int | None, pool: SandboxPool) -> None:
        self.server_pid = server_pid
        self.pool = pool
        self.gc_pauses: list[float] = []
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_started)

    async def __aenter__(self) -> CpuMeter:
        self._sandbox = await _containers_cpu_seconds(self.pool)
        self._server = cpu_seconds(self.server_pid)
        self._client = time.process_time()
        gc.callbacks.append(self._on_gc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)
        self.client = time.process_time() - self._client
        end = cpu_seconds(self.server_pid)
        self.server = None if end is None or self._server is None else end - self._server
        end = await _containers_cpu_seconds(self.pool)
        self.sandbox = None if end is None or self._sandbox is None else end - self._sandbox

    def as_dict(self) -> dict[str, Any]:
        return {
            "client_cpu_s": self.client,
            "server_cpu_s": self.server,
            "sandbox_cpu_s": self.sandbox,
            "gc2_count": len(self.gc_pauses),
            "gc2_total_ms": sum(self.gc_pauses) * 1e3,
            "gc2_max_ms": max(self.gc_pauses, default=0.0) * 1e3,
        }


# --------------------------------------------------------------------------- workload


def workload(count: int, steps: int) -> list[tuple[str, list[str]]]:
    """``count`` distinct problems with ``steps`` steps each (plain arithmetic word problems)."""
    items = []
    for i in range(count):
        a, b, c = 3 + i, 4 + (i % 5), 7 + 2 * i
        problem = (
            f"Problem #{i}: A shop packs {a} boxes of {b} pencils each and then receives {c} more "
            f"pencils. It sells the pencils in packs of {b}, repeating the order {steps} times. How "
            f"many pencils does it handle in total?"
        )
        total = 0
        lines = []
        for s in range(steps):
            total += a * b + c
            lines.append(
                f"Order {s + 1}: the boxes hold {a} * {b} = {a * b} pencils, and with the {c} extra "
                f"pencils the order has {a * b} + {c} = {a * b + c}. The running total after this "
                f"order is {total} pencils."
            )
        items.append((problem, lines))
    return items


_SOLUTION: contextvars.ContextVar[int] = contextvars.ContextVar("solution", default=-1)
_STEP: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("step", default=None)


async def concurrent_critiques(
    critic: GenPRMCritic | Sequence[GenPRMCritic],
    items: Sequence[tuple[str, list[str]]],
    samples: int,
    probe: Probe | None = None,
) -> list[CritiqueReport]:
    """critloop's way: every solution at once, each with ``samples`` concurrent chains (solution
    ``i`` goes to ``critic[i % len(critic)]`` when given several)."""
    critics = [critic] if isinstance(critic, GenPRMCritic) else list(critic)

    async def one(index: int, problem: str, steps: list[str]) -> CritiqueReport:
        _SOLUTION.set(index)
        started = time.perf_counter()
        chosen = critics[index % len(critics)]
        report = await chosen.critique(problem, steps, scan="all", samples=samples)
        if probe is not None:
            probe.solutions[index] = (started, time.perf_counter())
        return report

    return await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(items)))


async def sequential_critiques(
    critic: GenPRMCritic, items: Sequence[tuple[str, list[str]]], chains: int
) -> list[CritiqueReport]:
    """The reference implementation's way: one chain, one step, one request at a time."""
    reports = []
    for problem, steps in items:
        for _ in range(chains):
            reports.append(await critic.critique(problem, steps, scan="all", samples=1))
    return reports


def _chain_calls(chain: Any) -> int:
    """Completion calls of one chain's critique of one step."""
    usage = getattr(chain, "usage", None)
    return int(usage.calls if usage is not None else chain.calls)


def verify_reports(reports: Sequence[CritiqueReport], steps: int, chains_per_report: int) -> dict[str, Any]:
    """Did every chain of every step take the path the server scripts (3 calls, code, Yes)?"""
    chains = [c for r in reports for s in r.step_reports for c in s.chains]
    step_reports = [s for r in reports for s in r.step_reports]
    rewards = [c.reward for c in chains]
    return {
        "step_reports": len(step_reports),
        "steps_expected": len(reports) * steps,
        "chains": len(chains),
        "chains_expected": len(reports) * steps * chains_per_report,
        "calls": sum(r.usage.calls for r in reports),
        "chains_with_3_calls": sum(_chain_calls(c) == ROUNDS for c in chains),
        "verdict_yes": sum(c.verdict == "yes" for c in chains),
        "reward_source_logprobs": sum(c.reward_source == "logprobs" for c in chains),
        "forced": sum(c.forced for c in chains),
        "code_runs_ok": sum(1 for c in chains for run in c.code_runs if run.status == "ok"),
        "code_output_12": sum(1 for c in chains for run in c.code_runs if run.output == "12"),
        "reward_min": min(rewards) if rewards else None,
        "reward_max": max(rewards) if rewards else None,
        "reward_expected": EXPECTED_REWARD,
        "flagged_steps": sum(s.flagged for s in step_reports),
    }


def _paths_ok(check: dict[str, Any]) -> bool:
    n = check["chains_expected"]
    return (
        check["step_reports"] == check["steps_expected"]
        and check["chains"] == n
        and check["chains_with_3_calls"] == n
        and check["verdict_yes"] == n
        and check["reward_source_logprobs"] == n
        and check["code_output_12"] == n
        and check["forced"] == 0
        and check["flagged_steps"] == 0
        and abs(check["reward_min"] - EXPECTED_REWARD) < 1e-9
        and abs(check["reward_max"] - EXPECTED_REWARD) < 1e-9
    )


# --------------------------------------------------------------------------- instrumentation


@dataclass
class Event:
    name: str
    solution: int
    step: int
    chain: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class _TimedModel:
    """Forwards to a completion model, timing each call (and, if asked, recording it)."""

    def __init__(self, inner: Any, probe: Probe) -> None:
        self.inner = inner
        self.name = inner.name
        self.probe = probe

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        start = time.perf_counter()
        result = await self.inner.complete(prompt, params)
        self.probe.record("complete:" + classify(prompt), start, time.perf_counter())
        if self.probe.keep_calls:
            self.probe.calls.append((prompt, params))
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


class Probe:
    """Times the critic's parts by wrapping them (an instrumented run only; undone on exit).

    Each event is tagged with its solution (a context variable set per ``critique`` task) and
    with the step and chain (set around each ``critique_step``), so that a solution's wall time
    can be split along its critical path.
    """

    def __init__(
        self,
        critic: GenPRMCritic | Sequence[GenPRMCritic],
        *,
        keep_calls: bool = False,
        lag_interval: float = 0.0,
    ):
        self.critics = [critic] if isinstance(critic, GenPRMCritic) else list(critic)
        self.keep_calls = keep_calls
        self.lag_interval = lag_interval
        self.events: list[Event] = []
        self.solutions: dict[int, tuple[float, float]] = {}
        self.calls: list[tuple[str, SamplingParams]] = []
        self.lags: list[float] = []
        self._undo: list[Callable[[], None]] = []
        self._ticker: asyncio.Task[None] | None = None

    def record(self, name: str, start: float, end: float) -> None:
        tag = _STEP.get()
        step, chain = tag if tag is not None else (0, -1)
        self.events.append(Event(name, _SOLUTION.get(), step, chain, start, end))

    def _sync(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.record(name, start, time.perf_counter())

        return timed

    def _async(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                self.record(name, start, time.perf_counter())

        return timed

    def _patch(self, owner: Any, attr: str, value: Any, *, instance: bool = False) -> None:
        old = owner.__dict__.get(attr) if not instance else None
        setattr(owner, attr, value)
        if instance:
            self._undo.append(lambda: delattr(owner, attr))
        else:
            self._undo.append(lambda: setattr(owner, attr, old))

    def _wrap_step(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        async def step(problem: str, steps: Sequence[str], chain: Any, **options: Any) -> Any:
            _STEP.set((len(chain.critiques) + 1, id(chain)))
            start = time.perf_counter()
            try:
                return await inner(problem, steps, chain, **options)
            finally:
                self.record("step", start, time.perf_counter())

        return step

    def _swap_model(self, critic: GenPRMCritic) -> None:
        original = critic.model
        critic.model = _TimedModel(original, self)
        self._undo.append(lambda: setattr(critic, "model", original))

    async def __aenter__(self) -> Probe:
        templates = []
        for critic in self.critics:
            self._patch(critic, "critique_step", self._wrap_step(critic.critique_step), instance=True)
            self._swap_model(critic)
            if all(critic.template is not t for t in templates):
                templates.append(critic.template)
        for template in templates:
            self._patch(template, "render", self._sync("template render", template.render), instance=True)
            count = self._sync("tokenizer count", template.count_tokens)
            self._patch(template, "count_tokens", count, instance=True)
        for name in ("find_verdict", "reward_for"):
            self._patch(critique_module, name, self._sync("verdict + reward", getattr(critique_module, name)))
        self._patch(Session, "exec", self._async("sandbox exec", Session.exec))
        self._patch(Session, "close", self._async("session close", Session.close))
        self._patch(SandboxPool, "open_session", self._async("session open", SandboxPool.open_session))
        if self.lag_interval > 0:
            self._ticker = asyncio.create_task(self._tick())
        return self

    async def _tick(self) -> None:
        interval = self.lag_interval
        while True:
            start = time.perf_counter()
            await asyncio.sleep(interval)
            self.lags.append(time.perf_counter() - start - interval)

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def by_name(self) -> dict[str, list[Event]]:
        groups: dict[str, list[Event]] = defaultdict(list)
        for event in self.events:
            groups[event.name].append(event)
        return groups


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


def critical_path(probe: Probe, steps: int, delay: float) -> dict[str, Any]:
    """Each solution's wall time split along its critical path, averaged over the solutions.

    Per step, the chain that finished last is the critical one; its time splits into the
    server's fixed delay (3 calls), the rest of its model calls (client, HTTP, event-loop
    queueing), its sandbox exec, its synchronous template/tokenizer/verdict work, and what is
    left (task hand-offs, waiting for the loop). Around the steps: the sessions' open before the
    first step, the gap between steps, and the sessions' close after the last.
    """
    per_solution: list[dict[str, float]] = []
    events: dict[tuple[int, int, int], list[Event]] = defaultdict(list)
    solution_events: dict[int, list[Event]] = defaultdict(list)
    for event in probe.events:
        events[event.solution, event.step, event.chain].append(event)
        solution_events[event.solution].append(event)
    sync_names = ("template render", "tokenizer count", "verdict + reward")
    for solution, (started, ended) in sorted(probe.solutions.items()):
        parts = defaultdict(float)
        step_events = [e for e in solution_events[solution] if e.name == "step"]
        windows = []
        for k in range(1, steps + 1):
            chains = [e for e in step_events if e.step == k]
            if not chains:
                continue
            critical = max(chains, key=lambda e: e.end)
            window = (min(e.start for e in chains), critical.end)
            windows.append(window)
            inside = events[solution, k, critical.chain]
            calls = [e for e in inside if e.name.startswith("complete:")]
            call_time = sum(e.seconds for e in calls)
            exec_time = sum(e.seconds for e in inside if e.name == "sandbox exec")
            sync_time = sum(e.seconds for e in inside if e.name in sync_names)
            parts["server delay"] += delay * len(calls)
            parts["model calls beyond the delay"] += call_time - delay * len(calls)
            parts["sandbox exec"] += exec_time
            parts["template, tokenizer, verdict (sync)"] += sync_time
            parts["rest of the step"] += (window[1] - window[0]) - call_time - exec_time - sync_time
        if not windows:
            continue
        parts["sessions open (before step 1)"] = windows[0][0] - started
        parts["between steps"] = sum(b[0] - a[1] for a, b in itertools.pairwise(windows))
        parts["sessions close (after the last step)"] = ended - windows[-1][1]
        parts["solution wall"] = ended - started
        per_solution.append(dict(parts))
    if not per_solution:
        return {}
    keys = list(per_solution[0])
    return {
        "solutions": len(per_solution),
        "mean_s": {k: statistics.fmean(p[k] for p in per_solution) for k in keys},
        "max_s": {k: max(p[k] for p in per_solution) for k in keys},
    }


def event_summary(probe: Probe) -> dict[str, dict[str, float]]:
    """Per kind of event: count, total, p50, p99, max (ms)."""
    out = {}
    for name, group in sorted(probe.by_name().items()):
        seconds = [e.seconds for e in group]
        out[name] = {
            "count": len(seconds),
            "total_ms": sum(seconds) * 1e3,
            "p50_ms": _ms(seconds, 50),
            "p99_ms": _ms(seconds, 99),
            "max_ms": max(seconds) * 1e3,
        }
    return out


# --------------------------------------------------------------------------- section 1


def _critic_config(model: OpenAICompletionModel, samples: int, *, cascade: bool = False) -> CriticConfig:
    """The critic's settings for a GenPRM checkpoint behind an OpenAI server (the exact protocol)."""
    return CriticConfig(
        kind="openai",
        base_url=model.base_url,
        model=model.model,
        profile="genprm",
        samples=samples,
        temperature=TEMPERATURE,
        cascade=cascade,
    )


def _max_connections(model: OpenAICompletionModel) -> int | str:
    """The HTTP client's connection limit ("?" where unknown)."""
    try:
        return int(model._max_connections)
    except (AttributeError, TypeError, ValueError):
        return "?"


async def bare_rounds(models: Sequence[OpenAICompletionModel], rounds: int, width: int) -> None:
    """``rounds`` times, ``width`` concurrent bare ``complete()`` calls (an analyze-stage request,
    as the critic makes it), spread over ``models``; the next round starts when all are done."""
    prompt = (
        "<|im_start|>system\nYou are a math teacher.<|im_end|>\n<|im_start|>user\n2 + 3 * 4 = 14<|im_end|>\n"
        "<|im_start|>assistant\n<analyze>\nLet's analyze the Paragraph 1 step by step: "
    )
    params = SamplingParams(
        max_tokens=2048, temperature=0.6, top_p=0.95, top_k=20, stop=("</analyze>\n",),
        include_stop=True, logprobs=20,
    )  # fmt: skip
    for _ in range(rounds):
        await asyncio.gather(*(models[i % len(models)].complete(prompt, params) for i in range(width)))


class Rig(NamedTuple):
    """What both sections run against."""

    server: FakeCriticServer
    pool: SandboxPool
    template: ChatTemplate


async def bench_concurrency(
    plan: Plan, report: Report, console: Console, rig: Rig, full_sequential: bool
) -> None:
    server, pool, template = rig
    delay = plan.delay_ms / 1000.0
    k, s, n = plan.solutions, plan.steps, plan.chains
    items = workload(k, s)
    expected = k * s * n * ROUNDS
    ideal = s * ROUNDS * delay
    result = report.concurrency
    result.update(
        {
            "simulation": True,
            "K": k,
            "S": s,
            "N": n,
            "delay_ms": plan.delay_ms,
            "expected_requests": expected,
            "ideal_s": ideal,
            "runs": {},
        }
    )
    runs: dict[str, Any] = result["runs"]
    url = server.base_url(plan.delay_ms)

    async def measure(
        key: str,
        label: str,
        ideal_s: float,
        requests: int,
        work: Any,
        note: str = "",
        *,
        freeze: bool = False,
    ) -> Any:
        console.log(f"concurrency: {label}")
        server.reset()
        if freeze:
            gc.collect()
            gc.freeze()  # what lives now (torch, transformers, ...) leaves the collector's scans
        try:
            async with CpuMeter(server.pid, pool) as cpu:
                t0 = time.perf_counter()
                value = await work()
                wall = time.perf_counter() - t0
        finally:
            if freeze:
                gc.unfreeze()
        stats = server.stats()
        runs[key] = {
            "label": label,
            "wall_s": wall,
            "ideal_s": ideal_s,
            "vs_ideal": wall / ideal_s,
            "requests_expected": requests,
            "server": stats,
            "cpu": cpu.as_dict(),
            "note": note,
        }
        console.log(
            f"  {wall:.2f} s ({wall / ideal_s:.2f}x its ideal); server saw {stats['requests']} requests"
        )
        return value

    shared = OpenAICompletionModel(url, "fake-genprm", timeout_seconds=300.0)
    own = [OpenAICompletionModel(url, "fake-genprm", timeout_seconds=300.0) for _ in range(k)]
    try:
        critic = GenPRMCritic(shared, template, pool, _critic_config(shared, n))
        critics = [GenPRMCritic(m, template, pool, _critic_config(m, n)) for m in own]
        result["client_max_connections"] = _max_connections(shared)

        # Warm-up: the same fan-out for one step opens the keep-alive connections and runs every
        # code path once, so the measured runs do not pay first-use costs.
        console.log(f"concurrency: warm-up ({k} solutions x 1 step x {n} chains at once, both wirings)")
        t0 = time.perf_counter()
        await concurrent_critiques(critic, workload(k, 1), n)
        await concurrent_critiques(critics, workload(k, 1), n)
        result["warmup_s"] = time.perf_counter() - t0

        reports = await measure(
            "critloop", f"critloop: {k} critique() calls at once (gather), samples={n}, one shared client, "
            "heap frozen after start-up as critloop's CLI and server run",
            ideal, expected, lambda: concurrent_critiques(critic, items, n),
            "the headline: one OpenAICompletionModel (aiohttp pool of up to 256 connections) for all",
            freeze=True,
        )  # fmt: skip
        check = verify_reports(reports, s, n)
        runs["critloop"]["check"] = check
        runs["critloop"]["paths_ok"] = _paths_ok(check)

        async def instrumented(key: str, label: str, wiring: Any, *, freeze: bool = False) -> None:
            console.log(f"concurrency: instrumented re-run, {label} (critical path, event-loop lag)")
            server.reset()
            if freeze:
                gc.collect()
                gc.freeze()
            try:
                async with CpuMeter(server.pid, pool) as cpu, Probe(wiring, lag_interval=0.005) as probe:
                    t0 = time.perf_counter()
                    await concurrent_critiques(wiring, items, n, probe)
                    wall = time.perf_counter() - t0
            finally:
                if freeze:
                    gc.unfreeze()
            lags = probe.lags
            report.breakdown[key] = {
                "label": label,
                "wall_s": wall,
                "server": server.stats(),
                "cpu": cpu.as_dict(),
                "critical_path": critical_path(probe, s, delay),
                "events": event_summary(probe),
                "loop_lag_ms": {
                    "ticks": len(lags),
                    "p50": _ms(lags, 50),
                    "p99": _ms(lags, 99),
                    "max": max(lags) * 1e3 if lags else float("nan"),
                    "interval_ms": probe.lag_interval * 1e3,
                },
            }

        await instrumented(
            "critloop", "one shared client, frozen heap (as the headline)", critic, freeze=True
        )

        # Diagnostics: the same critiques with other client wiring, and the HTTP client alone.
        reports = await measure(
            "per_solution",
            f"diagnostic: the same, one client per solution ({k} aiohttp pools of <= {n} in use)",
            ideal, expected, lambda: concurrent_critiques(critics, items, n),
            "isolates the HTTP pool's cost per request, which grows with its connections",
            freeze=True,
        )  # fmt: skip
        runs["per_solution"]["paths_ok"] = _paths_ok(verify_reports(reports, s, n))

        reports = await measure(
            "unfrozen", "diagnostic: the headline without gc.freeze() (a plain Python process)",
            ideal, expected, lambda: concurrent_critiques(critic, items, n),
            "isolates the full garbage collections, which scan every object of torch & co. each time",
        )  # fmt: skip
        runs["unfrozen"]["paths_ok"] = _paths_ok(verify_reports(reports, s, n))
        await instrumented("unfrozen", "one shared client, heap not frozen", critic)
        await measure(
            "bare_shared",
            f"HTTP floor: {s * ROUNDS} rounds of {k * n} concurrent bare complete(), one shared client",
            ideal, expected, lambda: bare_rounds([shared], s * ROUNDS, k * n),
            "no critic, no sandbox: the client's own cost at this fan-out",
            freeze=True,
        )  # fmt: skip
        await measure(
            "bare_per_solution", f"HTTP floor: the same rounds over {k} clients",
            ideal, expected, lambda: bare_rounds(own, s * ROUNDS, k * n), freeze=True,
        )  # fmt: skip

        seq_k = k if full_sequential else plan.sequential_solutions
        seq_ideal = seq_k * s * n * ROUNDS * delay
        seq_reports = await measure(
            "sequential",
            f"sequential: {seq_k} solution(s) x {n} chains one after another (samples=1) x {s} steps, "
            f"one request at a time (~{seq_ideal:.0f} s)",
            seq_ideal, seq_k * s * n * ROUNDS, lambda: sequential_critiques(critic, items[:seq_k], n),
            "the reference implementation's loop",
            freeze=True,
        )  # fmt: skip
        check = verify_reports(seq_reports, s, 1)
        seq = runs["sequential"]
        seq.update(
            {"solutions_run": seq_k, "extrapolated": seq_k != k, "check": check, "paths_ok": _paths_ok(check)}
        )
        scale = k / seq_k
        seq["wall_for_K_s"] = seq["wall_s"] * scale
        seq["requests_for_K"] = round(seq["server"]["requests"] * scale)
    finally:
        for model in [shared, *own]:
            await model.aclose()

    headline = runs["critloop"]
    result["speedup"] = seq["wall_for_K_s"] / headline["wall_s"]
    report.targets.append(
        {
            "target": f"concurrent wall within {TARGETS['concurrent_vs_ideal']}x of the ideal "
            f"({s} steps x {ROUNDS} rounds x {plan.delay_ms:g} ms = {ideal:.2f} s)",
            "value": f"{headline['wall_s']:.2f} s = {headline['vs_ideal']:.2f}x",
            "limit": f"<= {TARGETS['concurrent_vs_ideal'] * ideal:.2f} s",
            "met": headline["vs_ideal"] <= TARGETS["concurrent_vs_ideal"],
        }
    )
    report.checks["concurrent: server requests == K*S*N*3"] = headline["server"]["requests"] == expected
    report.checks["concurrent: most requests in flight at the server (K*N possible)"] = (
        f"{headline['server']['max_in_flight']} of {k * n}; diagnostic runs: "
        + ", ".join(
            str(r["server"]["max_in_flight"])
            for key, r in runs.items()
            if key not in ("critloop", "sequential")
        )
    )
    report.checks["concurrent: every chain took the scripted path"] = headline["paths_ok"]
    report.checks["diagnostic runs: every chain took the scripted path"] = (
        runs["per_solution"]["paths_ok"] and runs["unfrozen"]["paths_ok"]
    )
    report.checks["every run: server requests == expected"] = all(
        r["server"]["requests"] == r["requests_expected"] for r in runs.values()
    )
    report.checks["sequential: every chain took the scripted path"] = seq["paths_ok"]
    report.checks["sequential: most requests in flight (1 = one at a time)"] = seq["server"]["max_in_flight"]


# --------------------------------------------------------------------------- section 2


async def bench_overhead(plan: Plan, report: Report, console: Console, rig: Rig) -> None:
    server, pool, template = rig
    s = plan.overhead_steps
    problem, steps = workload(1, s)[0]
    result = report.overhead
    result.update({"K": 1, "S": s, "N": 1, "repeats": plan.overhead_repeats, "delay_ms": 0})
    async with OpenAICompletionModel(server.base_url(0), "fake-genprm", timeout_seconds=30.0) as model:
        critic = GenPRMCritic(model, template, pool, _critic_config(model, 1))
        console.log(f"overhead: warm-up ({plan.overhead_warmup} critiques)")
        for _ in range(plan.overhead_warmup):
            await critic.critique(problem, steps, scan="all", samples=1)

        console.log(f"overhead: {plan.overhead_repeats} sequential critiques of 1 x {s} steps x 1 chain")
        server.reset()
        walls, calls = [], []
        async with CpuMeter(server.pid, pool) as cpu:
            for _ in range(plan.overhead_repeats):
                t0 = time.perf_counter()
                critique = await critic.critique(problem, steps, scan="all", samples=1)
                walls.append(time.perf_counter() - t0)
                calls.append(critique.usage.calls)
        per_stage = [w / c for w, c in zip(walls, calls, strict=True)]
        check = verify_reports([critique], s, 1)

        console.log("overhead: one instrumented critique (records the prompts for the bare calls)")
        async with Probe(critic, keep_calls=True) as probe:
            _SOLUTION.set(0)
            t0 = time.perf_counter()
            await critic.critique(problem, steps, scan="all", samples=1)
            probe.solutions[0] = (t0, time.perf_counter())
        recorded = list(probe.calls)

        console.log(
            f"overhead: {plan.bare_passes} passes of bare complete() over those {len(recorded)} calls"
        )
        bare: list[float] = []
        bare_by_kind: dict[str, list[float]] = defaultdict(list)
        for _ in range(2):  # warm-up pass
            for prompt, params in recorded:
                await model.complete(prompt, params)
        for _ in range(plan.bare_passes):
            for prompt, params in recorded:
                t0 = time.perf_counter()
                await model.complete(prompt, params)
                elapsed = time.perf_counter() - t0
                bare.append(elapsed)
                bare_by_kind[classify(prompt)].append(elapsed)

    stage_median = statistics.median(per_stage)
    bare_median = statistics.median(bare)
    overhead_ms = (stage_median - bare_median) * 1e3
    result.update(
        {
            "calls_per_critique": sorted(set(calls)),
            "wall_s": walls,
            "wall_median_s": statistics.median(walls),
            "per_stage_ms_median": stage_median * 1e3,
            "per_stage_ms_min": min(per_stage) * 1e3,
            "per_stage_ms_max": max(per_stage) * 1e3,
            "bare_calls": len(bare),
            "bare_ms_median": bare_median * 1e3,
            "bare_ms_mean": statistics.fmean(bare) * 1e3,
            "bare_ms_p99": _ms(bare, 99),
            "bare_ms_median_by_kind": {kind: statistics.median(v) * 1e3 for kind, v in bare_by_kind.items()},
            "overhead_ms_per_stage": overhead_ms,
            "overhead_ms_per_stage_mean_based": (statistics.fmean(per_stage) - statistics.fmean(bare)) * 1e3,
            "server_requests": None,
            "cpu": cpu.as_dict(),
            "check": check,
            "paths_ok": _paths_ok(check),
        }
    )
    result["server_requests"] = server.stats()["requests"]
    # Where one stage's time goes (the instrumented critique), per completion call.
    events = probe.by_name()
    n_calls = sum(len(v) for name, v in events.items() if name.startswith("complete:"))
    wall = probe.solutions[0][1] - probe.solutions[0][0]

    def per_call(names: Sequence[str]) -> float:
        return sum(e.seconds for name in names for e in events.get(name, [])) / n_calls * 1e3

    complete_names = [name for name in events if name.startswith("complete:")]
    parts = {
        "complete() inside the critic": per_call(complete_names),
        "sandbox exec (verify round)": per_call(["sandbox exec"]),
        "session open + close": per_call(["session open", "session close"]),
        "template render": per_call(["template render"]),
        "tokenizer count": per_call(["tokenizer count"]),
        "verdict + reward": per_call(["verdict + reward"]),
    }
    parts["rest (prompt strings, pydantic reports, asyncio)"] = wall / n_calls * 1e3 - sum(parts.values())
    result["breakdown_ms_per_stage"] = {"instrumented_wall_s": wall, "calls": n_calls, "parts": parts}
    report.targets.append(
        {
            "target": f"critic overhead per stage (instant server; median of {plan.overhead_repeats} "
            f"critiques minus the bare complete() median)",
            "value": f"{overhead_ms:.3f} ms",
            "limit": f"< {TARGETS['overhead_per_stage_ms']:g} ms",
            "met": overhead_ms < TARGETS["overhead_per_stage_ms"],
        }
    )
    report.checks["overhead: every chain took the scripted path"] = result["paths_ok"]
    report.checks["overhead: calls per critique"] = result["calls_per_critique"]


# --------------------------------------------------------------------------- output


# --------------------------------------------------------------------------- section 3


def cascade_workload(count: int, steps: int) -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """:func:`workload`, its steps marked for the fake server by :data:`CASCADE_PATTERN`, and the
    tier scripted to decide each step."""
    marks = {"direct": "", "analysis": f" {UNSURE_AT_A_GLANCE}", "code": f" {UNSURE_AFTER_ANALYSIS}"}
    items, tiers = [], []
    position = 0
    for problem, lines in workload(count, steps):
        scripted = []
        for _ in lines:
            scripted.append(CASCADE_PATTERN[position % len(CASCADE_PATTERN)])
            position += 1
        items.append((problem, [line + marks[tier] for line, tier in zip(lines, scripted, strict=True)]))
        tiers.append(scripted)
    return items, tiers


class _Counter:
    """Counts the sandbox sessions opened and forked while it is entered."""

    def __init__(self, pool: SandboxPool) -> None:
        self.pool = pool
        self.opened = 0
        self.forked = 0

    def __enter__(self) -> _Counter:
        open_session, fork = self.pool.open_session, Session.fork

        async def counted_open(*args: Any, **kwargs: Any) -> Session:
            self.opened += 1
            return await open_session(*args, **kwargs)

        async def counted_fork(session: Session, *args: Any, **kwargs: Any) -> Session:
            self.forked += 1
            return await fork(session, *args, **kwargs)

        self._fork = fork
        self.pool.open_session = counted_open  # type: ignore[method-assign]
        Session.fork = counted_fork  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.pool.open_session
        Session.fork = self._fork  # type: ignore[method-assign]


async def bench_cascade(plan: Plan, report: Report, console: Console, rig: Rig) -> None:
    server, pool, template = rig
    delay = plan.delay_ms / 1000.0
    k, s, n = plan.solutions, plan.steps, plan.chains
    items, scripted = cascade_workload(k, s)
    chain_steps = k * s * n
    ideal = {
        "full": s * ROUNDS * delay,
        "cascade": max(sum(CASCADE_CALLS[t] for t in tiers) for tiers in scripted) * delay,
    }
    share = {t: sum(x == t for tiers in scripted for x in tiers) / (k * s) for t in CASCADE_CALLS}
    result = report.cascade
    result.update(
        {"simulation": True, "K": k, "S": s, "N": n, "delay_ms": plan.delay_ms,
         "repeats": plan.cascade_repeats, "ideal_s": ideal, "scripted_share": share,
         "runs": {"full": [], "cascade": []}}
    )  # fmt: skip
    model = OpenAICompletionModel(server.base_url(plan.delay_ms), "fake-genprm", timeout_seconds=300.0)
    critics = {
        mode: GenPRMCritic(model, template, pool, _critic_config(model, n, cascade=mode == "cascade"))
        for mode in ("full", "cascade")
    }
    try:
        console.log(f"cascade: warm-up ({k} solutions x 1 step x {n} chains, both modes)")
        for critic in critics.values():
            await concurrent_critiques(critic, cascade_workload(k, 1)[0], n)
        for repeat in range(plan.cascade_repeats):
            order = ("full", "cascade") if repeat % 2 == 0 else ("cascade", "full")
            for mode in order:
                console.log(f"cascade: repeat {repeat + 1}/{plan.cascade_repeats}, {mode}")
                server.reset()
                gc.collect()
                gc.freeze()
                try:
                    with _Counter(pool) as counter:
                        t0 = time.perf_counter()
                        reports = await concurrent_critiques(critics[mode], items, n)
                        wall = time.perf_counter() - t0
                finally:
                    gc.unfreeze()
                await pool.settle()
                result["runs"][mode].append(
                    _cascade_run(reports, scripted, wall, server.stats(), counter, chain_steps, mode)
                )
    finally:
        await model.aclose()

    summary: dict[str, Any] = {}
    for mode, runs in result["runs"].items():
        first = runs[0]
        summary[mode] = {
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "vs_ideal": statistics.median(r["wall_s"] for r in runs) / ideal[mode],
            **{key: first[key] for key in first if key.startswith("per_chain_step_")},
            "tier_share": first["tier_share"],
            "requests": first["requests"],
            "paths_ok": all(r["paths_ok"] for r in runs),
        }
    result["summary"] = summary
    full, cascade = summary["full"], summary["cascade"]

    def saving(key: str) -> float:
        return full[key] / cascade[key] if cascade[key] else float("inf")

    result["savings"] = {
        "wall_x": full["wall_s_median"] / cascade["wall_s_median"],
        "calls_x": saving("per_chain_step_calls"),
        "tokens_x": saving("per_chain_step_tokens"),
        "completion_tokens_x": saving("per_chain_step_completion_tokens"),
        "sandbox_runs_x": saving("per_chain_step_sandbox_runs"),
    }
    report.checks["cascade: the tiers decided the scripted shares of the steps"] = cascade[
        "tier_share"
    ] == share and full["tier_share"] == {"code": 1.0}
    report.checks["cascade: every chain took its scripted path (calls, code, rewards)"] = (
        full["paths_ok"] and cascade["paths_ok"]
    )


def _cascade_run(
    reports: Sequence[CritiqueReport],
    scripted: list[list[str]],
    wall: float,
    stats: dict[str, Any],
    counter: _Counter,
    chain_steps: int,
    mode: str,
) -> dict[str, Any]:
    """One run of the cascade section, per chain and step, and whether every chain took the path
    its step was scripted to (calls, code runs, reward)."""
    steps = [step for r in reports for step in r.step_reports]
    chains = [c for step in steps for c in step.chains]
    usage = [c.usage for c in chains]
    tiers = [step.tier for step in steps]
    paths_ok = True
    for report, tiers_of_solution in zip(reports, scripted, strict=True):
        for step, tier in zip(report.step_reports, tiers_of_solution, strict=True):
            tier = tier if mode == "cascade" else "code"
            calls = CASCADE_CALLS[tier] if mode == "cascade" else ROUNDS
            # The code tier's reward is the judgement after code (sure), like the full protocol's.
            expected = EXPECTED_REWARD
            paths_ok &= (
                step.tier == tier
                and not step.flagged
                and all(
                    c.usage.calls == calls
                    and len(c.code_runs) == (tier == "code")
                    and abs(c.reward - expected) < 1e-9
                    and c.reward_source == "logprobs"
                    for c in step.chains
                )
            )
    return {
        "wall_s": wall,
        "requests": stats["requests"],
        "by_kind": stats["by_kind"],
        "per_chain_step_calls": sum(u.calls for u in usage) / chain_steps,
        "per_chain_step_prompt_tokens": sum(u.prompt_tokens for u in usage) / chain_steps,
        "per_chain_step_completion_tokens": sum(u.completion_tokens for u in usage) / chain_steps,
        "per_chain_step_tokens": sum(u.prompt_tokens + u.completion_tokens for u in usage) / chain_steps,
        "per_chain_step_sandbox_runs": sum(len(c.code_runs) for c in chains) / chain_steps,
        "per_chain_step_sessions_opened": counter.opened / chain_steps,
        "per_chain_step_forks": counter.forked / chain_steps,
        "tier_share": {t: tiers.count(t) / len(tiers) for t in CASCADE_CALLS if t in tiers},
        "paths_ok": paths_ok,
    }


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def render(report: Report, console: Console) -> None:
    console.print(_report.machine_table(report.command, report.mode, report.machine))

    c = report.concurrency
    runs = c.get("runs", {})
    if runs:
        table = Table(
            title=(
                f"1. Concurrency - SIMULATION: fake OpenAI server (separate asyncio process) answers every "
                f"request after {c['delay_ms']:g} ms; K={c['K']} solutions x S={c['S']} steps x "
                f"N={c['N']} chains x {ROUNDS} calls = {c['expected_requests']} requests; "
                f"ideal {c['ideal_s']:.2f} s"
            )
        )
        cols = ("run", "wall s", "x ideal", "requests seen", "expected", "most in flight", "new conns",
                "client cpu s", "server cpu s", "sandbox cpu s", "full GCs (ms)")  # fmt: skip
        for col in cols:
            table.add_column(col, justify="left" if col == "run" else "right")

        def row(r: dict[str, Any], label: str | None = None) -> None:
            cpu = r["cpu"]
            table.add_row(
                label or r["label"], _f(r["wall_s"]), _f(r["vs_ideal"]), str(r["server"]["requests"]),
                str(r["requests_expected"]), str(r["server"]["max_in_flight"]),
                str(r["server"]["connections"]),
                _f(cpu["client_cpu_s"]), _f(cpu["server_cpu_s"]), _f(cpu["sandbox_cpu_s"]),
                f"{cpu['gc2_count']} ({cpu['gc2_total_ms']:.0f})",
            )  # fmt: skip

        for key in ("critloop", "unfrozen", "per_solution", "bare_shared", "bare_per_solution"):
            if key in runs:
                row(runs[key])
        seq = runs.get("sequential")
        if seq:
            row(seq)
            label = "EXTRAPOLATED" if seq["extrapolated"] else "measured in full (--full-sequential)"
            table.add_row(
                f"sequential for all K={c['K']} solutions: {label}"
                + (f" (x {c['K']}/{seq['solutions_run']}, linear)" if seq["extrapolated"] else ""),
                _f(seq["wall_for_K_s"]), _f(seq["wall_for_K_s"] / c["ideal_s"]), str(seq["requests_for_K"]),
                str(c["expected_requests"]), "", "", "", "", "", "",
            )  # fmt: skip
        console.print(table)
        console.print(
            "  x ideal: wall / ideal, the ideal being each run's critical path: S x 3 rounds x delay for the "
            "concurrent runs, every request one after another for the sequential one; new conns: TCP "
            "connections the server accepted during the run (the warm-up opened the rest); full GCs: "
            "generation-2 collections in the client and their total pause (each stops the event loop)."
        )
        for key, r in runs.items():
            if r.get("note"):
                console.print(f"  {key}: {r['note']}")
        if seq and "critloop" in runs:
            console.print(
                f"  [bold]speed-up of critloop over the sequential loop: {c['speedup']:.1f}x[/bold] "
                f"({_f(seq['wall_for_K_s'])} s {'extrapolated' if seq['extrapolated'] else 'measured'} / "
                f"{_f(runs['critloop']['wall_s'])} s). Ideal critical path per solution: S x {ROUNDS} "
                f"rounds x delay = {c['S']} x {ROUNDS} x {c['delay_ms'] / 1000:g} s = {c['ideal_s']:.2f} s "
                f"(all K side by side). Warm-up {_f(c['warmup_s'])} s; client max_connections "
                f"{c['client_max_connections']}."
            )

    breakdowns = report.breakdown
    if breakdowns:
        steps = c.get("S", 1)
        table = Table(
            title=(
                "Where a solution's time goes in the concurrent run (instrumented re-runs): its critical "
                "path, mean over the solutions (max in brackets)"
            )
        )
        table.add_column("component")
        for bd in breakdowns.values():
            table.add_column(f"{bd['label']}: s", justify="right")
            table.add_column("per step ms", justify="right")
        keys = list(next(iter(breakdowns.values()))["critical_path"].get("mean_s", {}))
        for key in keys:
            cells = []
            for bd in breakdowns.values():
                cp = bd["critical_path"]
                value = cp["mean_s"].get(key, float("nan"))
                cells += [
                    f"{value:.3f} ({cp['max_s'].get(key, float('nan')):.3f})",
                    f"{value / steps * 1e3:.1f}",
                ]
            table.add_row(key, *cells)
        table.add_row(
            "run wall (instrumented)",
            *(x for bd in breakdowns.values() for x in (_f(bd["wall_s"], ".3f"), "")),
        )
        console.print(table)
        console.print(
            "  per step: the critical chain of each step (the one that finished last); server delay: "
            f"{ROUNDS} x delay; model calls beyond the delay: the rest of those calls as the critic saw them "
            "(HTTP client, parsing, waiting for the event loop); between steps: from the last chain of a "
            "step to the first of the next."
        )
        table = Table(title="Concurrent runs (instrumented): events, event loop, CPU - p50 / p99 / max ms")
        table.add_column("event")
        table.add_column("count", justify="right")
        for bd in breakdowns.values():
            table.add_column(bd["label"], justify="right")
        names = sorted({name for bd in breakdowns.values() for name in bd["events"]})
        for name in names:
            counts = {str(bd["events"][name]["count"]) for bd in breakdowns.values() if name in bd["events"]}
            cells = []
            for bd in breakdowns.values():
                e = bd["events"].get(name)
                cells.append(
                    "-" if e is None else f"{e['p50_ms']:.2f} / {e['p99_ms']:.2f} / {e['max_ms']:.2f}"
                )
            table.add_row(name, "/".join(sorted(counts)), *cells)
        cells = []
        for bd in breakdowns.values():
            lag = bd["loop_lag_ms"]
            cells.append(f"{lag['p50']:.2f} / {lag['p99']:.2f} / {lag['max']:.2f}")
        interval = next(iter(breakdowns.values()))["loop_lag_ms"]["interval_ms"]
        table.add_row(f"event-loop lag (sleep({interval:g} ms) overshoot)", "", *cells)
        cells = []
        for bd in breakdowns.values():
            cpu, wall = bd["cpu"], bd["wall_s"]
            cells.append(
                f"client {_f(cpu['client_cpu_s'])} s "
                f"({_f(100 * cpu['client_cpu_s'] / wall, '.0f')}% of a core), "
                f"server {_f(cpu['server_cpu_s'])} s, sandbox {_f(cpu['sandbox_cpu_s'])} s"
            )
        table.add_row("CPU seconds over the run", "", *cells)
        cells = [
            f"{bd['cpu']['gc2_count']} ({bd['cpu']['gc2_total_ms']:.0f} ms, "
            f"longest {bd['cpu']['gc2_max_ms']:.0f})"
            for bd in breakdowns.values()
        ]
        table.add_row("full GCs in the client", "", *cells)
        cells = [f"{bd['server']['max_in_flight']} of {c['K'] * c['N']}" for bd in breakdowns.values()]
        table.add_row("most requests in flight at the server", "", *cells)
        console.print(table)

    o = report.overhead
    if "per_stage_ms_median" in o:
        table = _report.table(
            f"2. Framework overhead per stage against an instant server (delay 0): K=1 x S={o['S']} x "
            f"N=1, {o['repeats']} sequential critiques",
            ("measurement", "ms", "note"),
            ("ms",),
        )
        table.add_row(
            "critique wall (median)",
            _f(o["wall_median_s"] * 1e3, ".1f"),
            f"{o['calls_per_critique']} calls each",
        )
        table.add_row(
            "per stage = wall / calls (median)", _f(o["per_stage_ms_median"], ".3f"),
            f"min {_f(o['per_stage_ms_min'], '.3f')}, max {_f(o['per_stage_ms_max'], '.3f')}",
        )  # fmt: skip
        table.add_row(
            "bare OpenAICompletionModel.complete() (median)", _f(o["bare_ms_median"], ".3f"),
            f"{o['bare_calls']} calls replaying the critic's own prompts and params; mean "
            f"{_f(o['bare_ms_mean'], '.3f')}, p99 {_f(o['bare_ms_p99'], '.3f')}; by stage "
            + ", ".join(f"{k} {v:.3f}" for k, v in o["bare_ms_median_by_kind"].items()),
        )  # fmt: skip
        table.add_row(
            "[bold]overhead per stage[/bold] (per stage - bare)",
            f"[bold]{o['overhead_ms_per_stage']:.3f}[/bold]",
            f"mean-based: {o['overhead_ms_per_stage_mean_based']:.3f}",
        )  # fmt: skip
        console.print(table)
        bd = o["breakdown_ms_per_stage"]
        table = _report.table(
            f"Where one stage's time goes (one instrumented critique, "
            f"{bd['instrumented_wall_s'] * 1e3:.1f} ms / {bd['calls']} calls), ms per completion call",
            ("part", "ms per call"),
            ("ms per call",),
        )
        for key, value in bd["parts"].items():
            table.add_row(key, f"{value:.3f}")
        table.add_row("total", f"{sum(bd['parts'].values()):.3f}")
        console.print(table)

    cs = report.cascade
    if "summary" in cs:
        share = ", ".join(f"{t} {v:.1%}" for t, v in cs["scripted_share"].items())
        table = _report.table(
            f"3. Cascade - SIMULATION: the fake server ({cs['delay_ms']:g} ms per request) scripted so that "
            f"the steps are sure at: {share}; K={cs['K']} x S={cs['S']} x N={cs['N']} at once; medians of "
            f"{cs['repeats']} alternating runs",
            ("per chain and step", "full protocol", "cascade", "full / cascade"),
            ("full protocol", "cascade", "full / cascade"),
        )
        full, cascade = cs["summary"]["full"], cs["summary"]["cascade"]
        for key, label in (
            ("calls", "model calls"),
            ("prompt_tokens", "prompt tokens"),
            ("completion_tokens", "completion tokens"),
            ("tokens", "tokens (prompt + completion)"),
            ("sandbox_runs", "sandbox runs"),
            ("sessions_opened", "sessions opened"),
            ("forks", "snapshot forks"),
        ):
            a, b = full[f"per_chain_step_{key}"], cascade[f"per_chain_step_{key}"]
            table.add_row(label, _f(a), _f(b), _f(a / b) if b else "-" if not a else "inf")
        table.add_row(
            "wall s (whole run)", _f(full["wall_s_median"]), _f(cascade["wall_s_median"]),
            _f(cs["savings"]["wall_x"]),
        )  # fmt: skip
        table.add_row(
            "wall / critical path",
            f"{_f(full['vs_ideal'])} of {_f(cs['ideal_s']['full'])} s",
            f"{_f(cascade['vs_ideal'])} of {_f(cs['ideal_s']['cascade'])} s",
            "",
        )
        table.add_row(
            "steps decided per tier",
            ", ".join(f"{t} {v:.1%}" for t, v in full["tier_share"].items()),
            ", ".join(f"{t} {v:.1%}" for t, v in cascade["tier_share"].items()),
            "",
        )
        console.print(table)
        console.print(
            "  calls per tier and chain: direct 1; analysis 3 (direct, analysis, judgement); code 5 (the "
            "code tier keeps the analysis tier's analysis: verify round, then the judgement after its "
            "output). The fake server's prompt tokens are characters / 4."
        )

    if report.targets:
        table = _report.table("Targets", ("target", "value", "limit", "verdict"))
        for t in report.targets:
            table.add_row(t["target"], t["value"], t["limit"], _report.verdict(t["met"]))
        console.print(table)

    table = _report.checks_table(report.checks)
    for name in ("critloop", "sequential"):
        if name in runs and "check" in runs[name]:
            table.add_row(f"{name}: per-chain check", json.dumps(runs[name]["check"]))
    if o.get("check"):
        table.add_row("overhead: per-chain check", json.dumps(o["check"]))
    table.add_row("failures", "; ".join(report.failures) or "none")
    console.print(table)


# --------------------------------------------------------------------------- main


SECTIONS = ("concurrency", "overhead", "cascade")


async def run_all(
    plan: Plan,
    report: Report,
    console: Console,
    server: FakeCriticServer,
    full_sequential: bool,
    sections: Sequence[str] = SECTIONS,
) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        from critloop.tools.embedded import fetch_model

        cached = fetch_model(progress=console.log)
        report.machine["tokenizer"] = str(cached.path)
        template = ChatTemplate.from_pretrained(str(cached.path))
        console.log(f"sandbox: starting a Docker pool of {POOL_SIZE} kernels")
        t0 = time.perf_counter()
        async with SandboxPool(SandboxConfig(backend="docker", pool_size=POOL_SIZE)) as pool:
            report.checks["sandbox pool start s"] = round(time.perf_counter() - t0, 2)
            rig = Rig(server, pool, template)
            for label, step in (
                ("concurrency", lambda: bench_concurrency(plan, report, console, rig, full_sequential)),
                ("overhead", lambda: bench_overhead(plan, report, console, rig)),
                ("cascade", lambda: bench_cascade(plan, report, console, rig)),
            ):
                if label not in sections:
                    continue
                try:
                    await step()
                except Exception as exc:  # noqa: BLE001 - report the other section; printed below
                    report.failures.append(f"{label}: {type(exc).__name__}: {exc}")
                    console.print(f"[red]{label} failed:[/red] {type(exc).__name__}: {exc}")
                    console.print_exception()
            report.checks["sandbox pool status at the end"] = str(pool.status())
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = _report.arguments(__doc__, "K=4, S=4, N=4 and fewer repeats (under a minute)")
    parser.add_argument(
        "--full-sequential",
        action="store_true",
        help="run the sequential baseline on all K solutions instead of extrapolating (minutes)",
    )
    parser.add_argument("--only", choices=SECTIONS, help="run this section alone")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    console = _report.wide_console(180)
    interrupt_on_sigterm()

    command = _report.command_line()
    report = Report(
        command=command,
        mode="quick" if args.quick else "full",
        machine=machine_facts(),
        plan={**asdict(plan), "full_sequential": args.full_sequential},
    )
    m = report.machine
    console.print(f"[bold]command:[/bold] {command}")
    console.print(
        f"[bold]machine:[/bold] {m['cpus usable (affinity)']} usable CPUs ({m['cpu_model']}), "
        f"{m['mem_total_gib']} GiB, Python {platform.python_version()}, aiohttp {m['aiohttp']}, Docker "
        f"{m.get('docker_engine')}, loadavg {m['loadavg_start']}"
    )
    console.print(
        "[bold yellow]Section 1 is a SIMULATION:[/bold yellow] no model runs; a fake server answers after a "
        f"fixed {plan.delay_ms:g} ms, so only critloop's scheduling, HTTP client and sandbox are measured."
    )

    server = FakeCriticServer()
    sections = (args.only,) if args.only else SECTIONS
    interrupted = run_against(
        server,
        lambda: run_all(plan, report, console, server, args.full_sequential, sections),
        report.failures,
        report.checks,
        console,
    )

    m["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    render(report, console)
    if args.json:
        _report.write_json(args.json, {**asdict(report), "targets_config": TARGETS}, console, default=str)
    if interrupted:
        return 130
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
