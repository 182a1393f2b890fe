"""Benchmark of cache-aware routing over several replicas of the critic's model, a SIMULATION.

Run from the repository root (the sandbox image must be built: ``critloop sandbox build``; the
embedded model's tokenizer is fetched and cached on first use)::

    .venv/bin/python benchmarks/bench_routing.py [--quick] [--json OUT] [--repeats R]
        [--cache-share F | --cache-blocks B] [--parallel-prefill]

No model runs. One fake OpenAI-compatible server (``_fake_server.py``, its own process) plays 4
replicas of a GenPRM critic (``/r/0`` ... ``/r/3``), each with a prefix cache of its own: the
server tokenizes each prompt, counts the leading blocks of 16 tokens its replica holds (chained
block hashes, least recently used evicted first, as vLLM's automatic prefix caching), and
answers after 0.05 ms per uncached prompt token + 10 ms per generated token (a 7B model on one
GPU). A replica prefills one request at a time (prefill is compute-bound; decoding is batched),
so uncached tokens also delay the requests behind them on that replica; ``--parallel-prefill``
drops that queue (each request then pays only its own prefill, the optimistic model). Its analyses begin
with a number unique to the request, so that the Maj@N chains of a solution diverge from their
first generated token, as sampled chains do.

The workload is the critic benchmark's (``bench_critic.workload``): K solutions x S steps x N
chains, all K ``critique(..., scan="all", samples=N)`` calls at once (K x N = 64 chains in
flight), with the real :class:`GenPRMCritic` (``profile="genprm"``, 3 calls per step and chain:
analyze, verify with code run in a Docker :class:`SandboxPool` of 2 kernels, judgement), the
embedded model's chat template and :class:`OpenAICompletionModel`. Three modes, their order
rotating from repeat to repeat (``--repeats``; the medians count), every one on caches emptied
before it:

* ``sticky``: one :class:`ReplicaRouter` (``routing="sticky"``) over 4 clients, one per replica;
* ``round_robin``: the same with ``routing="round_robin"`` (what a generic load balancer does);
* ``ideal``: one replica per chain, each with an unbounded cache: the critic's model is a
  wrapper that sends each chain's calls to a replica of its own (``/r/chain-<solution>-<chain>``;
  the chain is told by a context variable set around each ``critique_step`` of the run's
  critic), so every prompt finds all that its chain wrote before. The chains of one solution do
  not share their first prompt's cache here, so sticky routing, which mostly sends them to one
  replica, can cache slightly more than this "ideal".

A replica's capacity decides how much routing matters, so it is set from the workload: a first,
unmeasured run of the ideal mode (the warm-up) counts the workload's distinct blocks W (every
block any chain's replica held, each counted once), and each of the 4 replicas gets
``--cache-share`` x W blocks (default 0.25: the 4 together hold W). W overstates what has to
stay cached: where a completion meets the text appended after it, the next prompt splits into
tokens differently, so the blocks of a prompt + completion from that point on are never asked
for again. Round robin sends every chain to every replica, so each replica's cache would have to
hold the prefixes of all the chains, more than a quarter of W; a sticky replica needs those of
the chains it serves, about a quarter of them, which fit. Near the share where they stop fitting
(about 0.125 here) the cached fraction of sticky routing swings from run to run, as least recently
used eviction does near its cliff. ``--cache-blocks B`` sets the capacity directly.

Reported per mode: the cached fraction of prompt tokens (the server's per-replica counters),
the simulated prefill per chain (its uncached tokens at 0.05 ms; unless ``--parallel-prefill``, also
the time requests waited for others' prefill), the wall time against the decode floor (a
chain's generated tokens at 10 ms each), the requests per replica (balance: the busiest against
the mean), the share of requests the router sent for a prefix it had served, and the ratios of
sticky against round robin. Targets: sticky's
cached fraction at least 0.9x the ideal's; sticky's wall time below round robin's. The runs are
checked: every chain took the scripted path (3 calls, its code printed 12, a sure Yes) and the
server saw K x S x N x 3 requests per run.

The server process is stopped and the sandbox pool closed at the end, even on error, Ctrl-C or
SIGTERM. This is a benchmark, not a test: it exits 0 when a target is missed (the verdicts are
printed), and 1 when a measurement failed (an error, or a run that did not do the scripted work).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report
from _fake_server import (
    BLOCK_SIZE,
    DECODE_MS_PER_TOKEN,
    PREFILL_MS_PER_TOKEN,
    FakeCriticServer,
    run_against,
)
from _process import interrupt_on_sigterm
from bench_critic import ROUNDS, _critic_config, _paths_ok, machine_facts, verify_reports, workload

from critloop.agent.critic import CritiqueReport, GenPRMCritic
from critloop.sandbox import SandboxConfig, SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionResult, SamplingParams
from critloop.tools.openai_client import OpenAICompletionModel
from critloop.tools.replicas import ReplicaRouter

REPLICAS = 4
POOL_SIZE = 2
MODES = ("sticky", "round_robin", "ideal")
TARGETS = {"sticky_cached_vs_ideal": 0.9, "sticky_wall_below_round_robin": True}
MODEL = "fake-genprm"


@dataclass(frozen=True)
class Plan:
    solutions: int
    """K: solutions critiqued at once."""
    steps: int
    """S: steps per solution (all scored: scan="all")."""
    chains: int
    """N: critique chains per solution (samples); K x N chains are in flight."""
    repeats: int
    """Runs of each mode (their order rotates); the medians count."""


FULL = Plan(solutions=8, steps=6, chains=8, repeats=3)
QUICK = Plan(solutions=8, steps=3, chains=8, repeats=2)


@dataclass
class Report:
    command: str
    mode: str
    machine: dict[str, Any]
    plan: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the chains' identity

_SOLUTION: contextvars.ContextVar[int] = contextvars.ContextVar("solution", default=-1)
_CHAIN: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("chain", default=None)


async def critique_all(
    critic: GenPRMCritic, items: Sequence[tuple[str, list[str]]], samples: int
) -> list[CritiqueReport]:
    """Every solution at once (as ``bench_critic.concurrent_critiques``), each task knowing its
    solution's index."""

    async def one(index: int, problem: str, steps: list[str]) -> CritiqueReport:
        _SOLUTION.set(index)
        return await critic.critique(problem, steps, scan="all", samples=samples)

    return await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(items)))


def tag_chains(critic: GenPRMCritic) -> None:
    """Each of ``critic``'s ``critique_step`` calls runs with ``_CHAIN`` = (solution, chain),
    the chain numbered in the order its solution's chains first come (0 to N - 1)."""
    inner = critic.critique_step
    slots: dict[int, dict[int, int]] = {}

    async def step(problem: str, steps: Sequence[str], chain: Any, **options: Any) -> Any:
        solution = _SOLUTION.get()
        seen = slots.setdefault(solution, {})
        _CHAIN.set((solution, seen.setdefault(id(chain), len(seen))))
        return await inner(problem, steps, chain, **options)

    critic.critique_step = step  # type: ignore[method-assign]


class PerChainModel:
    """The ideal: each chain's calls go to a replica of its own (with an unbounded cache)."""

    def __init__(self, server: FakeCriticServer) -> None:
        """Clients are made on first use and kept (their connections stay open from run to run)."""
        self.server = server
        self.name = "one replica per chain"
        self.models: dict[tuple[int, int], OpenAICompletionModel] = {}

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        chain = _CHAIN.get()
        if chain is None or chain[0] < 0:
            raise RuntimeError("a call outside a tagged critique_step: its chain is unknown")
        model = self.models.get(chain)
        if model is None:
            url = self.server.base_url(replica=f"chain-{chain[0]}-{chain[1]}", cache_blocks="inf")
            model = self.models[chain] = OpenAICompletionModel(url, MODEL, timeout_seconds=300.0)
        return await model.complete(prompt, params)

    async def aclose(self) -> None:
        for model in self.models.values():
            await model.aclose()


# --------------------------------------------------------------------------- runs


async def sandbox_config(console: Console, report: Report) -> SandboxConfig:
    """A Docker pool as ``bench_critic`` runs, or the local backend where Docker is unavailable."""
    try:
        from critloop.sandbox.docker_backend import docker_client

        await asyncio.to_thread(lambda: docker_client(timeout=5).ping())
        report.setup["sandbox"] = f"docker, {POOL_SIZE} kernels"
        return SandboxConfig(backend="docker", pool_size=POOL_SIZE)
    except Exception as exc:  # noqa: BLE001 - reported; the local backend stands in
        report.setup["sandbox"] = (
            f"local, {POOL_SIZE} kernels (Docker unavailable: {type(exc).__name__}: {exc})"
        )
        console.print(
            f"[yellow]Docker is unavailable ({exc}): the sandbox runs on the local backend[/yellow]"
        )
        return SandboxConfig(backend="local", pool_size=POOL_SIZE)


def replica_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """A run's numbers from the server's per-replica counters."""
    replicas = stats["replicas"]
    prompt = sum(r["prompt_tokens"] for r in replicas.values())
    cached = sum(r["cached_prompt_tokens"] for r in replicas.values())
    requests = [r["requests"] for r in replicas.values()]
    return {
        "replicas": len(replicas),
        "requests": stats["requests"],
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "uncached_prompt_tokens": prompt - cached,
        "completion_tokens": sum(r["completion_tokens"] for r in replicas.values()),
        "cached_fraction": cached / prompt if prompt else math.nan,
        "requests_per_replica": requests,
        "balance_max_over_mean": max(requests) / statistics.mean(requests) if requests else math.nan,
        "max_in_flight_per_replica": [r["max_in_flight"] for r in replicas.values()],
        "evicted_blocks": sum(r["evicted_blocks"] for r in replicas.values()),
        "prefill_wait_s": sum(r["prefill_wait_s"] for r in replicas.values()),
        "distinct_blocks": stats["distinct_blocks"],
    }


async def run_mode(
    mode: str,
    critic: GenPRMCritic,
    items: Sequence[tuple[str, list[str]]],
    plan: Plan,
    server: FakeCriticServer,
    pool: SandboxPool,
) -> tuple[dict[str, Any], list[CritiqueReport]]:
    """One measured run on emptied caches."""
    server.reset(caches=True)
    gc.collect()
    gc.freeze()  # as critloop's CLI and server do after start-up
    try:
        t0 = time.perf_counter()
        reports = await critique_all(critic, items, plan.chains)
        wall = time.perf_counter() - t0
    finally:
        gc.unfreeze()
    await pool.settle()
    run = {"mode": mode, "wall_s": wall, **replica_stats(server.stats())}
    router = critic.model
    if isinstance(router, ReplicaRouter):
        status = router.status()
        run["router_sticky_share"] = sum(s.sticky for s in status) / max(1, sum(s.requests for s in status))
        run["router_failures"] = sum(s.failures for s in status)
    check = verify_reports(reports, plan.steps, plan.chains)
    run["paths_ok"] = _paths_ok(check)
    run["requests_expected"] = plan.solutions * plan.steps * plan.chains * ROUNDS
    return run, reports


async def bench(
    plan: Plan,
    report: Report,
    console: Console,
    server: FakeCriticServer,
    cache_share: float,
    cache_blocks: int | None,
) -> None:
    from critloop.tools.embedded import fetch_model

    cached = fetch_model(progress=console.log)
    report.machine["tokenizer"] = str(cached.path)
    template = ChatTemplate.from_pretrained(str(cached.path))
    k, s, n = plan.solutions, plan.steps, plan.chains
    items = workload(k, s)
    config = await sandbox_config(console, report)
    console.log(f"sandbox: starting a pool ({report.setup['sandbox']})")
    t0 = time.perf_counter()
    ideal_model = PerChainModel(server)
    clients: list[OpenAICompletionModel] = []
    async with SandboxPool(config) as pool:
        report.checks["sandbox pool start s"] = round(time.perf_counter() - t0, 2)
        try:

            def make(mode: str) -> GenPRMCritic:
                # A fresh critic per run; for a router mode, a fresh router (its prefix memory
                # starts empty, as the caches do) over the same clients (connections stay open).
                if mode == "ideal":
                    critic = GenPRMCritic(
                        ideal_model, template, pool, _critic_config(_config_model(server), n)
                    )
                    tag_chains(critic)
                    return critic
                router = ReplicaRouter(clients, routing=mode, name=mode)  # type: ignore[arg-type]
                return GenPRMCritic(router, template, pool, _critic_config(_config_model(server), n))

            # Warm-up, unmeasured: the ideal mode on the whole workload opens its connections,
            # runs every code path once and counts the workload's distinct blocks.
            console.log(f"warm-up: the ideal mode ({k} x {s} x {n}), counting the workload's blocks")
            warm, _ = await run_mode("ideal", make("ideal"), items, plan, server, pool)
            distinct = warm["distinct_blocks"]
            capacity = cache_blocks or max(1, round(cache_share * distinct))
            report.setup.update(
                {
                    "workload_distinct_blocks": distinct,
                    "capacity_blocks_per_replica": capacity,
                    "capacity_source": "--cache-blocks" if cache_blocks else f"--cache-share {cache_share:g}",
                    "capacity_x_workload": capacity / distinct if distinct else math.nan,
                    "warmup_wall_s": warm["wall_s"],
                    "warmup_paths_ok": warm["paths_ok"],
                }
            )
            console.log(
                f"  {warm['wall_s']:.2f} s; the workload caches {distinct} distinct blocks of {BLOCK_SIZE} "
                f"tokens; each of the {REPLICAS} replicas holds {capacity}"
            )
            clients.extend(
                OpenAICompletionModel(
                    server.base_url(replica=i, cache_blocks=capacity), MODEL, timeout_seconds=300.0
                )
                for i in range(REPLICAS)
            )
            console.log("warm-up: one step through a round-robin router (opens the clients' connections)")
            await critique_all(make("round_robin"), workload(k, 1), n)
            await pool.settle()

            report.runs = {mode: [] for mode in MODES}
            for repeat in range(plan.repeats):
                order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
                for mode in order:
                    console.log(f"repeat {repeat + 1}/{plan.repeats}: {mode}")
                    run, _ = await run_mode(mode, make(mode), items, plan, server, pool)
                    report.runs[mode].append(run)
                    console.log(
                        f"  {run['wall_s']:.2f} s, cached {run['cached_fraction']:.1%} of "
                        f"{run['prompt_tokens']:,} prompt tokens, requests per replica "
                        f"{_spread(run['requests_per_replica'])}"
                    )
        finally:
            await ideal_model.aclose()
            for client in clients:
                await client.aclose()
        report.checks["sandbox pool status at the end"] = str(pool.status())


def _config_model(server: FakeCriticServer) -> OpenAICompletionModel:
    """An unused client whose URL and model name fill the critic's config (the critic calls the
    model it is given)."""
    return OpenAICompletionModel(server.base_url(), MODEL)


def _spread(requests: Sequence[int]) -> str:
    if len(requests) <= REPLICAS:
        return " / ".join(str(r) for r in requests)
    return f"{len(requests)} replicas, {min(requests)} to {max(requests)} each"


def summarize(plan: Plan, report: Report) -> None:
    decode_floor = None
    for mode, runs in report.runs.items():
        if not runs:
            continue
        walls = [r["wall_s"] for r in runs]
        first = runs[0]
        # The decode floor: one chain's generated tokens (all chains write as many) at 10 ms each.
        chain_tokens = first["completion_tokens"] / (plan.solutions * plan.chains)
        decode_floor = chain_tokens * DECODE_MS_PER_TOKEN / 1000.0
        report.summary[mode] = {
            "runs": len(runs),
            "walls_s": walls,
            "wall_s_median": statistics.median(walls),
            "cached_fraction_median": statistics.median(r["cached_fraction"] for r in runs),
            "uncached_prompt_tokens_median": statistics.median(r["uncached_prompt_tokens"] for r in runs),
            "prefill_s_per_chain_median": statistics.median(
                r["uncached_prompt_tokens"] for r in runs
            ) * PREFILL_MS_PER_TOKEN / 1000.0 / (plan.solutions * plan.chains),
            "prefill_wait_s_per_chain_median": statistics.median(r["prefill_wait_s"] for r in runs)
            / (plan.solutions * plan.chains),
            "prompt_tokens": first["prompt_tokens"],
            "requests_per_replica": [r["requests_per_replica"] for r in runs],
            "balance_max_over_mean_median": statistics.median(r["balance_max_over_mean"] for r in runs),
            "router_sticky_share_median": statistics.median(r["router_sticky_share"] for r in runs)
            if "router_sticky_share" in first
            else None,
            "decode_floor_s": decode_floor,
            "vs_decode_floor": statistics.median(walls) / decode_floor if decode_floor else math.nan,
        }  # fmt: skip
        expected = first["requests_expected"]
        report.checks[f"{mode}: every chain took the scripted path (3 calls, code printed 12, Yes)"] = all(
            r["paths_ok"] for r in runs
        )
        report.checks[f"{mode}: the server saw {expected} requests per run"] = all(
            r["requests"] == expected for r in runs
        )
        for r in runs:
            if not r["paths_ok"] or r["requests"] != expected:
                report.failures.append(
                    f"{mode}: a run saw {r['requests']} requests (expected {expected}), "
                    f"paths ok: {r['paths_ok']}"
                )
        if "router_failures" in first:
            report.checks[f"{mode}: replica failures seen by the router"] = sum(
                r["router_failures"] for r in runs
            )
    summary = report.summary
    if not all(mode in summary for mode in MODES):
        return
    sticky, robin, ideal = summary["sticky"], summary["round_robin"], summary["ideal"]
    report.ratios = {
        "sticky_vs_round_robin_cached_fraction_x": sticky["cached_fraction_median"]
        / robin["cached_fraction_median"],
        "round_robin_vs_sticky_uncached_tokens_x": robin["uncached_prompt_tokens_median"]
        / sticky["uncached_prompt_tokens_median"],
        "round_robin_vs_sticky_wall_x": robin["wall_s_median"] / sticky["wall_s_median"],
        "sticky_vs_ideal_cached_fraction_x": sticky["cached_fraction_median"]
        / ideal["cached_fraction_median"],
        "sticky_vs_ideal_wall_x": sticky["wall_s_median"] / ideal["wall_s_median"],
    }
    vs_ideal = report.ratios["sticky_vs_ideal_cached_fraction_x"]
    report.targets = [
        {
            "target": f"sticky cached fraction >= {TARGETS['sticky_cached_vs_ideal']:g}x the ideal's",
            "value": f"{sticky['cached_fraction_median']:.1%} vs {ideal['cached_fraction_median']:.1%} "
            f"({vs_ideal:.2f}x)",
            "met": vs_ideal >= TARGETS["sticky_cached_vs_ideal"],
        },
        {
            "target": "sticky wall time < round robin's",
            "value": f"{sticky['wall_s_median']:.2f} s vs {robin['wall_s_median']:.2f} s",
            "met": sticky["wall_s_median"] < robin["wall_s_median"],
        },
    ]


# --------------------------------------------------------------------------- report


LABELS = {
    "sticky": f"sticky (router, {REPLICAS} replicas)",
    "round_robin": f"round robin (router, {REPLICAS} replicas)",
    "ideal": "ideal (a replica per chain)",
}


def render(report: Report, console: Console) -> None:
    console.print(_report.machine_table(report.command, report.mode, report.machine))
    setup = report.setup
    plan = report.plan
    if report.summary:
        title = (
            f"Routing over replicas, a SIMULATION: K={plan['solutions']} x S={plan['steps']} x "
            f"N={plan['chains']} ({plan['solutions'] * plan['chains']} chains in flight), "
            f"{PREFILL_MS_PER_TOKEN:g} ms per uncached prompt token + {DECODE_MS_PER_TOKEN:g} ms per "
            f"generated token{', serial prefill' if plan['serial_prefill'] else ''}, "
            f"{setup.get('capacity_blocks_per_replica')} blocks of {BLOCK_SIZE} tokens "
            f"per replica ({setup.get('capacity_x_workload', math.nan):.2f}x the workload's "
            f"{setup.get('workload_distinct_blocks')} blocks)"
        )
        columns = (
            "mode", "wall s (median)", "x decode floor", "cached", "uncached prompt tokens",
            "prefill / wait s per chain", "requests per replica", "busiest / mean", "sent for a prefix",
        )  # fmt: skip
        table = _report.table(title, columns, right=columns[1:])
        for mode in MODES:
            m = report.summary.get(mode)
            if m is None:
                continue
            walls = ", ".join(f"{w:.2f}" for w in m["walls_s"])
            sticky_share = m["router_sticky_share_median"]
            table.add_row(
                LABELS[mode],
                f"{m['wall_s_median']:.2f} ({walls})",
                f"{m['vs_decode_floor']:.2f}x",
                f"{m['cached_fraction_median']:.1%}",
                f"{m['uncached_prompt_tokens_median']:,.0f} of {m['prompt_tokens']:,}",
                f"{m['prefill_s_per_chain_median']:.2f} / {m['prefill_wait_s_per_chain_median']:.2f}",
                _spread(m["requests_per_replica"][0]),
                f"{m['balance_max_over_mean_median']:.2f}",
                "-" if sticky_share is None else f"{sticky_share:.1%}",
            )
        console.print(table)
        floor = report.summary[next(iter(report.summary))]["decode_floor_s"]
        console.print(
            f"decode floor: one chain's generated tokens at {DECODE_MS_PER_TOKEN:g} ms each = {floor:.2f} s; "
            f"sandbox: {setup.get('sandbox')}"
        )
    if report.ratios:
        r = report.ratios
        table = _report.table(
            "Sticky against round robin and the ideal", ("ratio", "value"), right=("value",)
        )
        table.add_row(
            "cached fraction, sticky / round robin", f"{r['sticky_vs_round_robin_cached_fraction_x']:.2f}x"
        )
        table.add_row(
            "uncached prompt tokens, round robin / sticky",
            f"{r['round_robin_vs_sticky_uncached_tokens_x']:.2f}x",
        )
        table.add_row("wall time, round robin / sticky", f"{r['round_robin_vs_sticky_wall_x']:.3f}x")
        table.add_row("cached fraction, sticky / ideal", f"{r['sticky_vs_ideal_cached_fraction_x']:.3f}x")
        table.add_row("wall time, sticky / ideal", f"{r['sticky_vs_ideal_wall_x']:.3f}x")
        console.print(table)
    if report.targets:
        table = _report.table("Targets", ("target", "value", "verdict"))
        for t in report.targets:
            table.add_row(t["target"], t["value"], _report.verdict(t["met"]))
        console.print(table)
    checks = _report.checks_table(report.checks)
    for key, value in setup.items():
        if key.startswith("warmup"):
            checks.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console.print(checks)
    if report.failures:
        console.print("[red]failures:[/red] " + "; ".join(report.failures))


# --------------------------------------------------------------------------- main


async def run_all(
    plan: Plan,
    report: Report,
    console: Console,
    server: FakeCriticServer,
    cache_share: float,
    cache_blocks: int | None,
) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await bench(plan, report, console, server, cache_share, cache_blocks)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = _report.arguments(
        __doc__, "S=3 steps (K=8, N=8: still 64 chains) and 2 repeats (under a minute)"
    )
    parser.add_argument("--repeats", type=int, help="runs of each mode, order rotating (default 3; quick 2)")
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument(
        "--cache-share",
        type=float,
        default=0.25,
        help="each replica's capacity as a share of the workload's distinct blocks (default 0.25)",
    )
    parser.add_argument(
        "--parallel-prefill",
        action="store_true",
        help="no prefill queue at a replica: each request pays only its own prefill",
    )
    sizing.add_argument(
        "--cache-blocks", type=int, help="each replica's capacity in blocks (overrides the share)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = Plan(plan.solutions, plan.steps, plan.chains, args.repeats)
    console = _report.wide_console(180)
    interrupt_on_sigterm()

    command = _report.command_line()
    report = Report(
        command=command,
        mode="quick" if args.quick else "full",
        machine=machine_facts(),
        plan={
            **asdict(plan),
            "replicas": REPLICAS,
            "block_size": BLOCK_SIZE,
            "prefill_ms_per_token": PREFILL_MS_PER_TOKEN,
            "decode_ms_per_token": DECODE_MS_PER_TOKEN,
            "cache_share": args.cache_share,
            "cache_blocks": args.cache_blocks,
            "serial_prefill": not args.parallel_prefill,
        },
    )
    console.print(f"[bold]command:[/bold] {command}")
    console.print(
        "[bold yellow]A SIMULATION:[/bold yellow] no model runs; a fake server plays 4 replicas with prefix "
        f"caches, {PREFILL_MS_PER_TOKEN:g} ms per uncached prompt token and {DECODE_MS_PER_TOKEN:g} ms per "
        "generated token, so only the routing's effect on the caches (and critloop's own work) is measured."
    )
    server = FakeCriticServer(
        block_size=BLOCK_SIZE,
        prefill_ms_per_token=PREFILL_MS_PER_TOKEN,
        decode_ms_per_token=DECODE_MS_PER_TOKEN,
        serial_prefill=not args.parallel_prefill,
    )
    interrupted = run_against(
        server,
        lambda: run_all(plan, report, console, server, args.cache_share, args.cache_blocks),
        report.failures,
        report.checks,
        console,
    )

    report.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    try:
        summarize(plan, report)
    except Exception as exc:  # noqa: BLE001 - a run's numbers were missing
        report.failures.append(f"summary: {type(exc).__name__}: {exc}")
    render(report, console)
    if args.json:
        _report.write_json(args.json, {**asdict(report), "targets_config": TARGETS}, console, default=str)
    if interrupted:
        return 130
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
