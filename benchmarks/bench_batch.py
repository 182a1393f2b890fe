"""Benchmark of batch refinement: many problems at once versus one at a time, and peak memory.

Run from the repository root (the sandbox image must be built: ``critloop sandbox build``)::

    .venv/bin/python benchmarks/bench_batch.py [--quick] [--problems N] [--concurrency C] [--json OUT]

A SIMULATION: the fake OpenAI-compatible server (``_fake_server.py``, its own process) plays
both the policy (a three-step solution) and a GenPRM critic (analysis, code, Yes) and answers
every request after a fixed delay (100 ms). Each problem then costs 1 policy call and, per
step, 3 critic calls plus one sandbox exec, all through the real refine graph, the real
``OpenAICompletionModel``, the real chat template and a Docker sandbox pool, with a SQLite
checkpointer and the crash-safe results file, as ``critloop batch`` runs them. The same
problems run (a) ``--concurrency`` at a time, ``--repeats`` times (the median counts: this
machine is shared) and (b) one at a time (the baseline); the report gives the walls, their
ratio, the server's request count, and the peak resident memory of this process
(``ru_maxrss``, which includes the tokenizer and everything imported).

This is a benchmark, not a test: it exits 0 when a target is missed, 1 when a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _fake_server import FakeCriticServer
from _machine import machine

from critloop import Solver
from critloop.config import load_config
from critloop.graphs.batch import Problem, ResultsFile, load_problems, open_checkpointer, run_batch
from critloop.graphs.refine import build_refine_graph

TARGET_SPEEDUP = 40.0
TARGET_PEAK_MIB = 1024.0
STEPS = 3
CALLS_PER_PROBLEM = 1 + STEPS * 3
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "problems" / "gsm8k_test.jsonl"


def problems(n: int) -> list[Problem]:
    if GSM8K.is_file():
        loaded, _ = load_problems(GSM8K, limit=n)
        if len(loaded) == n:
            return loaded
    return [
        Problem(id=f"p{i}", problem=f"What is 2 + 3 * 4? (#{i})", gold="14", line=i + 1) for i in range(n)
    ]


async def run(
    solver: Solver, items: list[Problem], concurrency: int, workdir: Path, server: FakeCriticServer
) -> dict[str, Any]:
    out = workdir / f"results-c{concurrency}.jsonl"
    server.reset()
    async with open_checkpointer(workdir / f"checkpoints-c{concurrency}.sqlite") as saver:
        graph = build_refine_graph(checkpointer=saver)
        t0 = time.perf_counter()
        await run_batch(graph, solver.context(), items, out, concurrency=concurrency)
        wall = time.perf_counter() - t0
    records = ResultsFile(out).records()
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "records": len(records),
        "stop_reasons": sorted({r["stop_reason"] for r in records}),
        "errors": [r["error"] for r in records if r.get("error")][:3],
        "server": server.stats(),
    }


async def main_async(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from critloop.tools.embedded import fetch_model

    tokenizer = str(fetch_model(progress=console.log).path)
    items = problems(args.problems)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "simulation": True,
        "machine": machine("langgraph"),
        "plan": {"problems": len(items), "concurrency": args.concurrency, "delay_ms": args.delay_ms},
    }
    with FakeCriticServer() as server, tempfile.TemporaryDirectory() as tmp:
        url = server.base_url(args.delay_ms)
        endpoint = {"kind": "openai", "base_url": url, "model": "fake", "tokenizer": tokenizer}
        overrides = {
            f"{role}.{key}": value for role in ("policy", "critic") for key, value in endpoint.items()
        }
        overrides |= {"critic.profile": "genprm", "critic.samples": 1, "sandbox.backend": "docker"}
        overrides |= {"sandbox.pool_size": 2}
        config = load_config(None, overrides)
        async with Solver.from_config(config) as solver:
            console.log("warm-up: 4 problems")
            warm = Path(tmp) / "warm"
            warm.mkdir()
            await run(solver, problems(4), 4, warm, server)
            # As the CLI does after start-up: what lives now stays out of the collector's scans.
            gc.collect()
            gc.freeze()
            # The concurrent run is short and this machine is shared: its median of several
            # runs (each in a fresh directory) is what the ratio uses.
            concurrent_runs = []
            for i in range(args.repeats):
                console.log(f"concurrent #{i + 1}: {len(items)} problems, {args.concurrency} at a time")
                workdir = Path(tmp, f"concurrent-{i}")
                workdir.mkdir()
                concurrent_runs.append(await run(solver, items, args.concurrency, workdir, server))
                console.log(f"  {concurrent_runs[-1]['wall_s']:.2f} s")
            concurrent_runs.sort(key=lambda r: r["wall_s"])
            concurrent = concurrent_runs[len(concurrent_runs) // 2] | {
                "walls_s": [r["wall_s"] for r in concurrent_runs]
            }
            if args.no_baseline:  # for profiling the concurrent run alone
                return report | {"concurrent": concurrent}
            seconds = len(items) * CALLS_PER_PROBLEM * args.delay_ms / 1000
            console.log(f"sequential: {len(items)} problems one at a time (~{seconds:.0f} s)")
            sequential = await run(solver, items, 1, Path(tmp), server)
            console.log(f"  {sequential['wall_s']:.2f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    speedup = sequential["wall_s"] / concurrent["wall_s"]
    ideal = len(items) * CALLS_PER_PROBLEM * args.delay_ms / 1000 / args.concurrency
    report.update(
        {
            "concurrent": concurrent,
            "sequential": sequential,
            "speedup": speedup,
            "ideal_concurrent_s": ideal,
            "peak_rss_mib": peak,
            "targets": [
                {
                    "target": "speedup >= 40x",
                    "value": round(speedup, 1),
                    "met": speedup >= TARGET_SPEEDUP,
                },
                {"target": "peak RSS < 1 GiB", "value": round(peak), "met": peak < TARGET_PEAK_MIB},
            ],
        }
    )
    failures = [
        f"{run_['concurrency']}: {run_['records']} records, {run_['errors']}"
        for run_ in (*concurrent_runs, sequential)
        if run_["records"] != len(items) or run_["stop_reasons"] != ["all_steps_pass"]
    ]
    expected = len(items) * CALLS_PER_PROBLEM
    failures += [
        f"server saw {run_['server']['requests']} requests, expected {expected}"
        for run_ in (*concurrent_runs, sequential)
        if run_["server"]["requests"] != expected
    ]
    report["failures"] = failures
    return report


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Batch refinement, a SIMULATION ({report['plan']['delay_ms']:g} ms per model call)")
    for column in ("run", "wall s", "requests", "note"):
        table.add_column(column)
    c, s = report["concurrent"], report["sequential"]
    table.add_row(
        f"{report['plan']['problems']} problems, {c['concurrency']} at a time",
        f"{c['wall_s']:.2f} (median of " + ", ".join(f"{w:.2f}" for w in c["walls_s"]) + ")",
        str(c["server"]["requests"]),
        f"ideal {report['ideal_concurrent_s']:.2f} s; most in flight {c['server']['max_in_flight']}",
    )
    table.add_row("one problem at a time", f"{s['wall_s']:.2f}", str(s["server"]["requests"]), "the baseline")
    console.print(table)
    targets = Table(title="Targets")
    for column in ("target", "value", "verdict"):
        targets.add_column(column)
    for t in report["targets"]:
        targets.add_row(t["target"], str(t["value"]), "MET" if t["met"] else "NOT MET")
    console.print(targets)
    console.print(f"speedup {report['speedup']:.1f}x; peak RSS {report['peak_rss_mib']:.0f} MiB")
    console.print("failures: " + ("; ".join(report["failures"]) or "none"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="40 problems, 16 at a time")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3, help="concurrent runs; the median is used")
    parser.add_argument("--no-baseline", action="store_true", help="skip the sequential run (profiling)")
    parser.add_argument("--json", metavar="OUT", help="also write every number as JSON to OUT")
    args = parser.parse_args()
    if args.quick:
        args.problems, args.concurrency = 40, 16
    console = Console(width=140)
    report = asyncio.run(main_async(args, console))
    if args.no_baseline:
        console.print(f"concurrent: {report['concurrent']['wall_s']:.2f} s")
        return
    render(report, console)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        console.print(f"wrote {args.json}")
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
