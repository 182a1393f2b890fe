"""Benchmark of the critloop code sandbox (Docker backend), with baselines, in one run.

Run from the repository root (the sandbox image must be built: ``critloop sandbox build``)::

    .venv/bin/python benchmarks/bench_sandbox.py [--quick] [--json OUT] [--only {sandbox,tool}]
        [--tool-backend {local,docker}]

What it measures, all end to end as a client sees it (``time.perf_counter`` on the host):

* warm exec latency of ``print(1+1)`` and of a sympy call in a warm session;
* opening a session from a warm pool (``open_session`` + ``close``);
* forking a session that holds some state (``fork`` + ``close`` of the clone);
* throughput of ``print(1+1)`` with 1, 8 and 32 concurrent sessions (one asyncio task each);
* baselines: the same exec, open and fork on kernels with one uid for every session (as before
  sessions had a uid each), ``docker run --rm`` per snippet, ``docker exec`` of a fresh python (importing
  sympy) per snippet into one long-running container, and plain in-process ``exec`` (the
  unsafe floor);
* the LangChain tool (``PythonSandboxTool``, on the local backend unless ``--tool-backend
  docker``): ``print(1+1)`` through ``tool.invoke`` (from the main thread, no loop running) and
  ``await tool.ainvoke`` (from a running loop), next to the same code on a ``Session`` of a
  pool of this process (the baseline) and to a trivial LangChain tool, all interleaved round
  by round, then again beside a thread that runs Python without pause; the tool's overhead is
  its p50 minus the session's. ``--only tool`` runs this part alone (no Docker needed),
  ``--only sandbox`` the rest.

Every container the script starts (the pool's kernels and the baselines' containers) is
removed at the end, even on error or Ctrl-C. This is a benchmark, not a test: it exits 0 even
when a target is missed (the verdicts are printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report
from _machine import cpu_model as _cpu_model
from _machine import mem_total_gib as _mem_total_gib
from _process import interrupt_on_sigterm

from critloop.sandbox import SandboxConfig, SandboxPool, Session
from critloop.sandbox.docker_backend import DockerBackend
from critloop.sandbox.image import image_tag

POOL_SIZE = 2
CONCURRENCY = (1, 8, 32)
TRIVIAL = "print(1+1)"
SYMPY_SETUP = "import sympy; x = sympy.Symbol('x')"
SYMPY_CALL = "print(sympy.factor(x**2 - 1))"
FORK_STATE = (
    "import sympy\n"
    "x = sympy.Symbol('x')\n"
    "expr = sympy.expand((x + 1) ** 20)\n"
    "data = list(range(10_000))\n"
    "with open('notes.txt', 'w') as f:\n"
    "    f.write('hello\\n' * 1000)\n"
)
DOCKER_EXEC_SNIPPET = "import sympy; print(1+1)"

BENCH_LABEL = "io.critloop.bench.owner"
"""Label on the baseline containers (deliberately not critloop's own sandbox label, whose orphan
reaper in other processes would judge them ownerless and remove them mid-run)."""

TARGETS = {
    "warm_exec_p50_ms": 1.0,
    "warm_vs_docker_exec_ratio": 200.0,
    "open_p50_ms": 10.0,
    "fork_p50_ms": 10.0,
    "tool_overhead_p50_ms": 0.5,
}


@dataclass(frozen=True)
class Plan:
    """Iteration counts (and warm-up runs, not counted) of one mode."""

    trivial: int
    sympy: int
    open: int
    fork: int
    throughput_seconds: float
    docker_run: int
    docker_exec: int
    in_process: int
    tool_rounds: int
    tool_busy_rounds: int
    warmup: int = 10


FULL = Plan(
    trivial=1000, sympy=500, open=300, fork=300, throughput_seconds=5.0,
    docker_run=15, docker_exec=20, in_process=20_000, tool_rounds=1000, tool_busy_rounds=200,
)  # fmt: skip
QUICK = Plan(
    trivial=150, sympy=80, open=50, fork=50, throughput_seconds=1.5,
    docker_run=5, docker_exec=6, in_process=2_000, tool_rounds=300, tool_busy_rounds=60, warmup=3,
)  # fmt: skip


Stats = _report.latency_type("Stats", "ms", (50, 99), "Summary of latency samples, in milliseconds.")
ToolStats = _report.latency_type(
    "ToolStats", "ms", (50, 90, 99), "Summary of latency samples of the tool section, in milliseconds."
)


@dataclass
class Throughput:
    concurrency: int
    pool_size: int
    seconds: float
    execs: int
    execs_per_second: float
    latency: Stats
    bad_results: int
    bad_examples: list[str] = field(default_factory=list)


@dataclass
class Report:
    command: str
    mode: str
    machine: dict[str, Any]
    latency: dict[str, Stats] = field(default_factory=dict)
    throughput: list[Throughput] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, ToolStats] = field(default_factory=dict)
    """The tool section: latencies by call kind (session, invoke, ainvoke, trivial tool)."""
    tool_busy: dict[str, ToolStats] = field(default_factory=dict)
    """The same (session, invoke, ainvoke) while another thread runs Python without pause."""
    tool_overhead_ms: dict[str, float] = field(default_factory=dict)
    """p50 of the tool's invoke and ainvoke minus the p50 of the session's own exec (keys
    ``invoke``, ``ainvoke``, and ``invoke_busy``, ``ainvoke_busy`` beside the busy thread)."""


# --------------------------------------------------------------------------- machine facts


def _run_text(argv: list[str], timeout: float = 30.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{argv[0]} failed: {exc}>"
    return (done.stdout or done.stderr).strip()


def _other_containers() -> int:
    out = _run_text(["docker", "ps", "-q"])
    return len(out.split()) if out and not out.startswith("<") else 0


def machine_facts(image: str | None) -> dict[str, Any]:
    """The machine's facts; the Docker engine's too, unless ``image`` is None (no Docker used)."""
    if image is None:
        return {
            "nproc": _run_text(["nproc"]),
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "mem_total_gib": _mem_total_gib(),
            "kernel": platform.release(),
            "python_host": platform.python_version(),
            "python_host_impl": f"{platform.python_implementation()} {sys.executable}",
            "loadavg_start": list(os.getloadavg()),
        }
    fmt = "{{.Server.Version}}|{{.Server.APIVersion}}|{{.Client.Version}}"
    server, api, client = ([*_run_text(["docker", "version", "--format", fmt]).split("|"), "?", "?"])[:3]
    info = _run_text(["docker", "info", "--format", "{{.Driver}}|{{.CgroupVersion}}|{{.KernelVersion}}"])
    driver, cgroup, kernel = ([*info.split("|"), "?", "?"])[:3]
    return {
        "nproc": _run_text(["nproc"]),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "kernel": kernel if kernel != "?" else platform.release(),
        "docker_server": server,
        "docker_api": api,
        "docker_client": client,
        "docker_storage_driver": driver,
        "docker_cgroup_version": cgroup,
        "python_host": platform.python_version(),
        "python_host_impl": f"{platform.python_implementation()} {sys.executable}",
        "image": image,
        "loadavg_start": list(os.getloadavg()),
        "other_running_containers_at_start": _other_containers(),
    }


# --------------------------------------------------------------------------- cleanup


class Cleanup:
    """Removes every container this process started, whatever happens."""

    def __init__(self) -> None:
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pool_prefix = f"critloop-sandbox-{os.getpid()}-"

    def labels(self) -> list[str]:
        return ["--label", f"{BENCH_LABEL}={self.owner}"]

    def leftovers(self) -> list[str]:
        ids: set[str] = set()
        for flt in (f"label={BENCH_LABEL}={self.owner}", f"name={self.pool_prefix}"):
            out = _run_text(["docker", "ps", "-aq", "--filter", flt])
            if out and not out.startswith("<"):
                ids.update(out.split())
        return sorted(ids)

    def run(self) -> int:
        ids = self.leftovers()
        if ids:
            _run_text(["docker", "rm", "-f", *ids], timeout=120)
        return len(self.leftovers())


# --------------------------------------------------------------------------- baselines


def bench_in_process(n: int, warmup: int) -> tuple[list[float], bool]:
    """The unsafe floor: compile and exec in this process, stdout captured to a StringIO."""
    namespace: dict[str, Any] = {"__name__": "__bench__"}
    samples = []
    ok = True
    clock = time.perf_counter
    for i in range(warmup + n):
        buffer = io.StringIO()
        t0 = clock()
        with contextlib.redirect_stdout(buffer):
            exec(compile(TRIVIAL, "<bench>", "exec"), namespace)
        t1 = clock()
        if i >= warmup:
            samples.append(t1 - t0)
        ok = ok and buffer.getvalue() == "2\n"
    return samples, ok


def bench_docker_run(image: str, n: int, cleanup: Cleanup) -> tuple[list[float], int]:
    """A fresh ``docker run --rm`` per snippet (CLI, network none, entrypoint python3)."""
    samples = []
    bad = 0
    for i in range(1 + n):  # one warm-up run
        argv = [
            "docker", "run", "--rm", "--network", "none", *cleanup.labels(),
            "--entrypoint", "python3", image, "-c", TRIVIAL,
        ]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        t1 = time.perf_counter()
        if i >= 1:
            samples.append(t1 - t0)
            bad += done.returncode != 0 or done.stdout != "2\n"
    return samples, bad


def start_sleeper(image: str, cleanup: Cleanup) -> str:
    name = f"critloop-bench-{cleanup.owner}"
    argv = [
        "docker", "run", "-d", "--rm", "--network", "none", *cleanup.labels(), "--name", name,
        "--entrypoint", "sleep", image, "infinity",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"could not start the docker-exec baseline container: {done.stderr.strip()}")
    return name


def bench_docker_exec(container: str, n: int, warmup: int) -> tuple[list[float], int]:
    """A ``docker exec`` of a fresh ``python3 -c 'import sympy; print(1+1)'`` per snippet."""
    samples = []
    bad = 0
    for i in range(warmup + n):
        argv = ["docker", "exec", container, "python3", "-c", DOCKER_EXEC_SNIPPET]
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        t1 = time.perf_counter()
        if i >= warmup:
            samples.append(t1 - t0)
            bad += done.returncode != 0 or done.stdout != "2\n"
    return samples, bad


# --------------------------------------------------------------------------- the sandbox


async def timed_execs(session: Session, code: str, expect: str, n: int, warmup: int):
    """Latencies of ``n`` execs of ``code`` (after ``warmup``), kernel-side durations, and how
    many results were not ``ok`` with the expected stdout."""
    samples, inner = [], []
    bad = 0
    clock = time.perf_counter
    for i in range(warmup + n):
        t0 = clock()
        result = await session.exec(code)
        t1 = clock()
        if i >= warmup:
            samples.append(t1 - t0)
            inner.append(result.duration)
            bad += result.status != "ok" or result.stdout != expect
    return samples, inner, bad


async def timed_pair(
    first: Callable[[], Awaitable[Session]], n: int, warmup: int
) -> tuple[list[float], list[float], list[float]]:
    """Times ``first()`` (which yields a session) and then the ``close`` of that session."""
    opens, closes, totals = [], [], []
    clock = time.perf_counter
    for i in range(warmup + n):
        t0 = clock()
        session = await first()
        t1 = clock()
        await session.close()
        t2 = clock()
        if i >= warmup:
            opens.append(t1 - t0)
            closes.append(t2 - t1)
            totals.append(t2 - t0)
    return opens, closes, totals


async def throughput(pool: SandboxPool, concurrency: int, seconds: float) -> Throughput:
    sessions = await asyncio.gather(*(pool.open_session() for _ in range(concurrency)))
    try:
        for result in await asyncio.gather(*(s.exec(TRIVIAL) for s in sessions)):  # warm each
            if result.stdout != "2\n":
                raise RuntimeError(f"warm-up exec failed: {result!r}")
        latencies: list[float] = []
        bad = 0
        examples: list[str] = []
        clock = time.perf_counter
        start = clock()
        deadline = start + seconds

        async def loop(session: Session) -> int:
            nonlocal bad
            count = 0
            while clock() < deadline:
                t0 = clock()
                result = await session.exec(TRIVIAL)
                latencies.append(clock() - t0)
                if result.status != "ok" or result.stdout != "2\n":
                    bad += 1
                    if len(examples) < 5:
                        examples.append(repr(result))
                count += 1
            return count

        counts = await asyncio.gather(*(loop(s) for s in sessions))
        elapsed = clock() - start
    finally:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    total = sum(counts)
    return Throughput(
        concurrency=concurrency,
        pool_size=POOL_SIZE,
        seconds=elapsed,
        execs=total,
        execs_per_second=total / elapsed,
        latency=Stats.of(f"exec under load x{concurrency}", latencies),
        bad_results=bad,
        bad_examples=examples,
    )


async def bench_sandbox(plan: Plan, report: Report, console: Console) -> None:
    pool = SandboxPool(SandboxConfig(backend="docker", pool_size=POOL_SIZE))
    try:
        t0 = time.perf_counter()
        await pool.start()
        report.checks["pool_start_seconds"] = round(time.perf_counter() - t0, 3)
        status = pool.status()
        report.checks["pool_status"] = asdict(status)
        if status.backend != "docker" or status.kernels != POOL_SIZE:
            raise RuntimeError(f"expected {POOL_SIZE} docker kernels, got {status}")
        # What every figure below was measured with: a uid per session, /proc hidden, a disk each.
        report.checks["isolation"] = (await pool.ping())[0].get("isolation")

        console.log("warm exec: print(1+1)")
        session = await pool.open_session()
        samples, inner, bad = await timed_execs(session, TRIVIAL, "2\n", plan.trivial, plan.warmup * 5)
        report.latency["warm_exec_trivial"] = Stats.of("warm exec print(1+1)", samples)
        report.latency["warm_exec_trivial_kernel"] = Stats.of(
            "  kernel-side duration of it", inner, "ExecResult.duration"
        )
        report.checks["warm_exec_trivial_bad"] = bad

        console.log("warm exec: sympy.factor")
        setup = await session.exec(SYMPY_SETUP)
        if not setup.ok:
            raise RuntimeError(f"sympy setup failed: {setup.text()}")
        samples, inner, bad = await timed_execs(
            session, SYMPY_CALL, "(x - 1)*(x + 1)\n", plan.sympy, plan.warmup
        )
        report.latency["warm_exec_sympy"] = Stats.of("warm exec sympy.factor(x**2-1)", samples)
        report.latency["warm_exec_sympy_kernel"] = Stats.of(
            "  kernel-side duration of it", inner, "ExecResult.duration"
        )
        report.checks["warm_exec_sympy_bad"] = bad
        await session.close()

        console.log("session open + close")
        probe = await pool.open_session()
        fresh = await probe.exec("print(sorted(k for k in globals() if not k.startswith('__')))")
        report.checks["fresh_session_globals"] = fresh.stdout.strip()
        await probe.close()
        opens, closes, totals = await timed_pair(pool.open_session, plan.open, plan.warmup)
        report.latency["open"] = Stats.of("session open (open_session)", opens)
        report.latency["open_close"] = Stats.of("  close of it", closes)
        report.latency["open_cycle"] = Stats.of("session open + close", totals)

        console.log("fork + close of the clone")
        parent = await pool.open_session()
        state = await parent.exec(FORK_STATE)
        if not state.ok:
            raise RuntimeError(f"fork state setup failed: {state.text()}")
        clone = await parent.fork()
        seen = await clone.exec("print(len(data), len(open('notes.txt').read()), expr.coeff(x, 10))")
        report.checks["clone_sees_state"] = seen.stdout.strip() == "10000 6000 184756"
        await clone.close()
        opens, closes, totals = await timed_pair(parent.fork, plan.fork, plan.warmup)
        report.latency["fork"] = Stats.of("fork (session.fork)", opens, "holds sympy expr, list, file")
        report.latency["fork_close"] = Stats.of("  close of the clone", closes)
        report.latency["fork_cycle"] = Stats.of("fork + close of the clone", totals)
        await parent.close()

        for concurrency in CONCURRENCY:
            console.log(f"throughput: {concurrency} concurrent sessions, {plan.throughput_seconds:g} s")
            report.throughput.append(await throughput(pool, concurrency, plan.throughput_seconds))
        report.checks["pool_status_end"] = asdict(pool.status())
    finally:
        await pool.close()


# --------------------------------------------------------------------------- the LangChain tool

TOOL_KINDS = {
    "session": "session.exec (the baseline)",
    "invoke": "tool.invoke (sync)",
    "ainvoke": "await tool.ainvoke (async)",
    "trivial_invoke": "trivial tool .invoke",
    "trivial_ainvoke": "trivial async tool await .ainvoke",
}


def _rounds(
    calls: dict[str, Callable[[], tuple[float, bool]]], n: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """``n`` rounds (after ``warmup``) of every call, in an order that rotates round by round:
    the latencies and the count of wrong results of each."""
    kinds = list(calls)
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    bad = dict.fromkeys(kinds, 0)
    for i in range(warmup + n):
        shift = i % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            seconds, ok = calls[kind]()
            if i >= warmup:
                samples[kind].append(seconds)
                bad[kind] += not ok
    return samples, bad


def bench_tool(plan: Plan, backend: str, report: Report, console: Console) -> None:
    """The tool's per-call cost next to the session's own, interleaved round by round.

    Each round times, in an order that rotates from round to round, ``print(1+1)`` on a session
    of a pool of this process (``await session.exec``, in this thread's event loop), through
    ``PythonSandboxTool.invoke`` (on the main thread, no loop running), through ``await
    PythonSandboxTool.ainvoke`` (in the same event loop), and a trivial LangChain tool's
    ``invoke`` and ``ainvoke`` (a function that returns ``""``: LangChain's own cost per call).
    Then fewer rounds of the first three while another thread of this process runs Python
    without pause (holding the GIL but for the interpreter's switch interval, 5 ms): what a
    thread hop costs when each wake-up waits for the GIL.
    """
    from langchain_core.tools import tool as as_tool

    from critloop.tools import PythonSandboxTool

    @as_tool
    def noop(code: str) -> str:
        """Does nothing (the reference: LangChain's own cost of a tool call)."""
        return ""

    @as_tool
    async def anoop(code: str) -> str:
        """Does nothing, asynchronously."""
        return ""

    config = SandboxConfig(backend=backend, pool_size=1)
    clock = time.perf_counter
    args = {"code": TRIVIAL}
    loop = asyncio.new_event_loop()
    pool = SandboxPool(config)
    tool = PythonSandboxTool(config=config)
    try:
        session = loop.run_until_complete(pool.open_session())

        async def on_session() -> tuple[float, bool]:
            t0 = clock()
            result = await session.exec(TRIVIAL)
            return clock() - t0, result.ok and result.stdout == "2\n"

        def invoke() -> tuple[float, bool]:
            t0 = clock()
            out = tool.invoke(args)
            return clock() - t0, out == "2"

        async def ainvoke() -> tuple[float, bool]:
            t0 = clock()
            out = await tool.ainvoke(args)
            return clock() - t0, out == "2"

        def trivial_invoke() -> tuple[float, bool]:
            t0 = clock()
            out = noop.invoke(args)
            return clock() - t0, out == ""

        async def trivial_ainvoke() -> tuple[float, bool]:
            t0 = clock()
            out = await anoop.ainvoke(args)
            return clock() - t0, out == ""

        calls: dict[str, Callable[[], tuple[float, bool]]] = {
            "session": lambda: loop.run_until_complete(on_session()),
            "invoke": invoke,
            "ainvoke": lambda: loop.run_until_complete(ainvoke()),
            "trivial_invoke": trivial_invoke,
            "trivial_ainvoke": lambda: loop.run_until_complete(trivial_ainvoke()),
        }
        samples, bad = _rounds(calls, plan.tool_rounds, plan.warmup * 5)
        report.checks["tool_backend"] = tool._runner.pool.status().backend if tool._runner else "none"
        report.checks["tool_bad_results"] = bad

        console.log(f"the LangChain tool beside a busy Python thread: {plan.tool_busy_rounds} rounds")
        spinning = [True]

        def spin() -> None:
            while spinning[0]:
                pass

        spinner = threading.Thread(target=spin, name="busy", daemon=True)
        spinner.start()
        try:
            busy = {kind: calls[kind] for kind in ("session", "invoke", "ainvoke")}
            busy_samples, busy_bad = _rounds(busy, plan.tool_busy_rounds, plan.warmup)
        finally:
            spinning[0] = False
            spinner.join()
        report.checks["tool_busy_bad_results"] = busy_bad
    finally:
        tool.close()
        loop.run_until_complete(pool.close())
        loop.close()
    for kind, seconds in samples.items():
        report.tool[kind] = ToolStats.of(TOOL_KINDS[kind], seconds)
    for kind, seconds in busy_samples.items():
        report.tool_busy[kind] = ToolStats.of(TOOL_KINDS[kind], seconds, "another thread busy in Python")
    for kind in ("invoke", "ainvoke"):
        report.tool_overhead_ms[kind] = report.tool[kind].p50_ms - report.tool["session"].p50_ms
        report.tool_overhead_ms[f"{kind}_busy"] = (
            report.tool_busy[kind].p50_ms - report.tool_busy["session"].p50_ms
        )


# --------------------------------------------------------------------------- output


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def compute_ratios_and_targets(report: Report) -> None:
    if report.latency:
        sandbox_ratios_and_targets(report)
    if report.tool:
        tool_ratios_and_targets(report)


def _target(
    report: Report, name: str, value: float, limit: float, op: str, unit: str, note: str = ""
) -> None:
    met = value <= limit if op == "<=" else value >= limit
    report.targets.append(
        {"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met, "note": note}
    )


def tool_ratios_and_targets(report: Report) -> None:
    tool = report.tool
    session = tool["session"].p50_ms
    for kind in ("invoke", "ainvoke"):
        report.ratios[f"tool {kind} / session exec"] = tool[kind].p50_ms / session
        report.ratios[f"tool {kind} overhead / trivial tool {kind}"] = (
            report.tool_overhead_ms[kind] / tool[f"trivial_{kind}"].p50_ms
        )
    for kind, label in (("invoke", "sync invoke"), ("ainvoke", "async ainvoke")):
        _target(
            report,
            f"tool overhead p50, {label}",
            report.tool_overhead_ms[kind],
            TARGETS["tool_overhead_p50_ms"],
            "<=",
            "ms",
            "tool p50 - session p50",
        )


def sandbox_ratios_and_targets(report: Report) -> None:
    lat = report.latency
    warm = lat["warm_exec_trivial"].p50_ms
    ratios = {
        "docker_exec_sympy / warm_exec": lat["docker_exec_sympy"].p50_ms / warm,
        "docker_run / warm_exec": lat["docker_run"].p50_ms / warm,
        "warm_exec / in_process": warm / lat["in_process"].p50_ms,
        "warm_exec_sympy / warm_exec": lat["warm_exec_sympy"].p50_ms / warm,
        "docker_exec_sympy / open_cycle": lat["docker_exec_sympy"].p50_ms / lat["open_cycle"].p50_ms,
        "docker_run / fork_cycle": lat["docker_run"].p50_ms / lat["fork_cycle"].p50_ms,
    }
    for kind in ("exec", "open_cycle", "fork_cycle"):  # what the isolation costs (alternating blocks)
        ratios[f"{kind}: uid per session / one uid"] = (
            lat[f"cost_{kind}_uid per session"].p50_ms / lat[f"cost_{kind}_one uid"].p50_ms
        )
    by_c = {t.concurrency: t.execs_per_second for t in report.throughput}
    for c in CONCURRENCY[1:]:
        ratios[f"throughput x{c} / x1"] = by_c[c] / by_c[1]
    report.ratios.update(ratios)

    def target(name: str, value: float, limit: float, op: str, unit: str, note: str = "") -> None:
        _target(report, name, value, limit, op, unit, note)

    target("warm trivial exec p50", warm, TARGETS["warm_exec_p50_ms"], "<=", "ms")
    target(
        "docker-exec(sympy) / warm trivial exec",
        ratios["docker_exec_sympy / warm_exec"],
        TARGETS["warm_vs_docker_exec_ratio"],
        ">=",
        "x",
        "ratio of medians",
    )
    target("session open p50", lat["open"].p50_ms, TARGETS["open_p50_ms"], "<=", "ms", "open_session alone")
    target("session open + close p50", lat["open_cycle"].p50_ms, TARGETS["open_p50_ms"], "<=", "ms")
    target("fork p50", lat["fork"].p50_ms, TARGETS["fork_p50_ms"], "<=", "ms", "session.fork alone")
    target("fork + close p50", lat["fork_cycle"].p50_ms, TARGETS["fork_p50_ms"], "<=", "ms")


def render(report: Report, console: Console) -> None:
    console.print(_report.machine_table(report.command, report.mode, report.machine))
    if report.latency:
        render_sandbox(report, console)
    if report.tool:
        render_tool(report, console)

    table = _report.table("Ratios (of medians)", ("ratio", "value"), ("value",))
    for name, value in report.ratios.items():
        table.add_row(name, f"{value:,.1f}x" if value >= 10 else f"{value:.2f}x")
    console.print(table)

    table = _report.table("Targets", ("target", "value", "limit", "verdict", "note"), ("value", "limit"))
    for t in report.targets:
        fmt = (lambda v: f"{v:,.1f}x") if t["unit"] == "x" else (lambda v: f"{_ms(v)} ms")
        verdict = _report.verdict(t["met"])
        table.add_row(t["target"], fmt(t["value"]), f"{t['op']} {fmt(t['limit'])}", verdict, t["note"])
    console.print(table)

    console.print(_report.checks_table(report.checks))


def render_tool(report: Report, console: Console) -> None:
    numbers = ("n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "overhead p50 ms")
    table = _report.table(
        f"LangChain tool: print(1+1) per call, {report.checks.get('tool_backend')} backend, interleaved",
        ("measurement", *numbers),
        numbers,
    )
    for kind, s in report.tool.items():
        overhead = report.tool_overhead_ms.get(kind)
        numbers = (s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.min_ms)
        table.add_row(s.name, str(s.n), *map(_ms, numbers), "" if overhead is None else _ms(overhead))
    if report.tool_busy:
        table.add_section()
    for kind, s in report.tool_busy.items():
        overhead = report.tool_overhead_ms.get(f"{kind}_busy")
        numbers = (s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.min_ms)
        name = f"{s.name}, beside a busy thread"
        table.add_row(name, str(s.n), *map(_ms, numbers), "" if overhead is None else _ms(overhead))
    console.print(table)


def render_sandbox(report: Report, console: Console) -> None:
    numbers = ("n", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms")
    table = _report.table(
        "Latency (end to end on the host, time.perf_counter)", ("measurement", *numbers, "note"), numbers
    )
    order = [
        "in_process", "warm_exec_trivial", "warm_exec_trivial_kernel", "warm_exec_sympy",
        "warm_exec_sympy_kernel", "open", "open_close", "open_cycle", "fork", "fork_close",
        "fork_cycle", "docker_exec_sympy", "docker_run",
        *(f"cost_{kind}_{name}" for kind in ("exec", "open_cycle", "fork_cycle")
          for name in ("uid per session", "one uid")),
    ]  # fmt: skip
    for key in order:
        s = report.latency[key]
        numbers = (s.p50_ms, s.p99_ms, s.mean_ms, s.min_ms, s.max_ms)
        table.add_row(s.name, str(s.n), *map(_ms, numbers), s.note)
    console.print(table)

    columns = ("sessions", "pool_size", "seconds", "execs", "execs/s", "lat p50 ms", "lat p99 ms", "bad")
    table = _report.table(
        f"Throughput of print(1+1), pool_size={POOL_SIZE} (kernels = containers)", columns, columns
    )
    for t in report.throughput:
        table.add_row(
            str(t.concurrency), str(t.pool_size), f"{t.seconds:.2f}", str(t.execs),
            f"{t.execs_per_second:,.0f}", _ms(t.latency.p50_ms), _ms(t.latency.p99_ms), str(t.bad_results),
        )  # fmt: skip
    console.print(table)
    for t in report.throughput:
        if t.bad_results:
            console.print(
                f"[red]WRONG RESULTS: {t.bad_results} of {t.execs} execs at x{t.concurrency} did not return "
                "status ok with stdout '2\\n' (examples below)[/red]"
            )
        for example in t.bad_examples:
            console.print(f"[yellow]bad result at x{t.concurrency}:[/yellow] {example}", markup=True)


def to_json(report: Report) -> dict[str, Any]:
    data = asdict(report)
    data["targets_config"] = TARGETS
    data["pool_size"] = POOL_SIZE
    return data


# --------------------------------------------------------------------------- main


def _needs_docker(args: Any) -> bool:
    return args.only != "tool" or args.tool_backend == "docker"


def _image(console: Console) -> str:
    image = image_tag()
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode:
        # The tag is a hash of the kernel: a changed kernel needs its image (seconds when the
        # base is cached). Built before anything is timed.
        console.print(f"the sandbox image {image} is missing: building it (critloop sandbox build)")
        from critloop.sandbox.docker_backend import docker_client
        from critloop.sandbox.image import build_image

        image = build_image(docker_client(), progress=console.log)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = _report.arguments(__doc__, "fewer iterations (a smoke run)")
    parser.add_argument(
        "--only",
        choices=("sandbox", "tool"),
        help="run one part: the Docker sandbox and its baselines, or the LangChain tool's overhead",
    )
    parser.add_argument(
        "--tool-backend",
        choices=("local", "docker"),
        default="local",
        help="the sandbox backend of the tool part (default: local, which needs no Docker)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    console = _report.wide_console(130)
    interrupt_on_sigterm()

    image = _image(console) if _needs_docker(args) else None
    command = _report.command_line()
    report = Report(command=command, mode="quick" if args.quick else "full", machine=machine_facts(image))
    report.checks["plan"] = asdict(plan)
    console.print(f"[bold]command:[/bold] {command}")
    docker = (
        f"docker server {report.machine['docker_server']} (client {report.machine['docker_client']})  "
        if image
        else ""
    )
    console.print(
        f"[bold]machine:[/bold] nproc={report.machine['nproc']}  {docker}"
        f"python {report.machine['python_host']}  image {image or '(not used)'}"
    )

    cleanup = Cleanup()
    try:
        if args.only != "tool":
            bench_docker_sandbox(plan, image or "", report, console, cleanup)
        if args.only != "sandbox":
            console.log(f"the LangChain tool ({args.tool_backend} backend): {plan.tool_rounds} rounds")
            bench_tool(plan, args.tool_backend, report, console)
    finally:
        if image is not None:
            left = cleanup.run()
            report.checks["containers_left_after_cleanup"] = left
            if left:
                console.print(f"[red]{left} containers of this run could not be removed[/red]")

    report.machine["loadavg_end"] = list(os.getloadavg())
    compute_ratios_and_targets(report)
    render(report, console)
    if args.json:
        _report.write_json(args.json, to_json(report), console)
    return 0


class _SharedUidBackend(DockerBackend):
    """The container as it was before each session had a uid of its own: the supervisor and
    every session under uid 10001, no capability, one plain ``/work`` tmpfs, no hidden /proc.
    The baseline of what the per-session isolation costs (never a way to run untrusted code)."""

    def container_options(self) -> dict[str, Any]:
        options = super().container_options()
        environment = {"CRITLOOP_KILL_GRACE": options["environment"]["CRITLOOP_KILL_GRACE"]}
        tmpfs = {"/work": "rw,nosuid,nodev,noexec,size=64m,uid=10001,gid=10001,mode=0700"}
        return {**options, "user": "10001:10001", "cap_add": [], "sysctls": {}, "environment": environment,
                "tmpfs": tmpfs}  # fmt: skip


async def bench_isolation_cost(plan: Plan, report: Report, console: Console) -> None:
    """Warm exec, open + close and fork + close on the real kernels and on kernels with one uid
    for every session, in alternating blocks (a quarter of the samples each) so that the
    machine's load falls on both alike."""
    config = SandboxConfig(backend="docker", pool_size=1)
    shared_backend = await asyncio.to_thread(_SharedUidBackend, config)
    pools = {"uid per session": SandboxPool(config), "one uid": SandboxPool(config, backend=shared_backend)}
    try:
        for pool in pools.values():
            await pool.start()
        report.checks["shared_uid_isolation"] = (await pools["one uid"].ping())[0].get("isolation")
        console.log("the cost of a uid per session: against one uid for every session, alternating")
        samples: dict[tuple[str, str], list[float]] = {}
        sessions = {name: await pool.open_session() for name, pool in pools.items()}
        parents = {name: await pool.open_session() for name, pool in pools.items()}
        for parent in parents.values():
            if not (await parent.exec(FORK_STATE)).ok:
                raise RuntimeError("fork state setup failed")
        for block in range(4):
            order = list(pools.items()) if block % 2 == 0 else list(reversed(pools.items()))
            for name, pool in order:
                execs, _inner, _bad = await timed_execs(
                    sessions[name], TRIVIAL, "2\n", plan.trivial // 4, plan.warmup
                )
                samples.setdefault(("exec", name), []).extend(execs)
                opens = (await timed_pair(pool.open_session, plan.open // 4, plan.warmup))[2]
                samples.setdefault(("open_cycle", name), []).extend(opens)
                forks = (await timed_pair(parents[name].fork, plan.fork // 4, plan.warmup))[2]
                samples.setdefault(("fork_cycle", name), []).extend(forks)
        labels = {"exec": "warm exec", "open_cycle": "open + close", "fork_cycle": "fork + close"}
        for (kind, name), values in samples.items():
            report.latency[f"cost_{kind}_{name}"] = Stats.of(f"  {name}: {labels[kind]}", values)
        for session in [*sessions.values(), *parents.values()]:
            await session.close()
    finally:
        for pool in pools.values():
            await pool.close()


def bench_docker_sandbox(plan: Plan, image: str, report: Report, console: Console, cleanup: Cleanup) -> None:
    """The sandbox on Docker, and its baselines."""
    console.log("in-process floor")
    samples, ok = bench_in_process(plan.in_process, plan.warmup * 100)
    report.latency["in_process"] = Stats.of("in-process exec (unsafe floor)", samples, "redirect_stdout")
    report.checks["in_process_ok"] = ok

    asyncio.run(bench_sandbox(plan, report, console))
    asyncio.run(bench_isolation_cost(plan, report, console))

    console.log("baseline: docker exec into a long-running container")
    sleeper = start_sleeper(image, cleanup)
    report.machine["python_image"] = _run_text(
        ["docker", "exec", sleeper, "python3", "-c", "import platform, sympy; "
         "print(platform.python_version(), 'sympy', sympy.__version__)"]
    )  # fmt: skip
    samples, bad = bench_docker_exec(sleeper, plan.docker_exec, 2)
    report.latency["docker_exec_sympy"] = Stats.of(
        "docker exec python3 -c 'import sympy; print(1+1)'", samples, "CLI, fresh python each"
    )
    report.checks["docker_exec_bad"] = bad
    _run_text(["docker", "rm", "-f", sleeper], timeout=120)

    console.log("baseline: docker run --rm per snippet")
    samples, bad = bench_docker_run(image, plan.docker_run, cleanup)
    report.latency["docker_run"] = Stats.of(
        "docker run --rm python3 -c 'print(1+1)'", samples, "CLI, --network none"
    )
    report.checks["docker_run_bad"] = bad


if __name__ == "__main__":
    sys.exit(main())
