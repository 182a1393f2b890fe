"""Benchmark of batch refinement: many problems at once versus one at a time, and peak memory.

Run from the repository root (the sandbox image must be built: ``critloop sandbox build``)::

    .venv/bin/python benchmarks/bench_batch.py [--quick] [--problems N] [--concurrency C] [--json OUT]
    .venv/bin/python benchmarks/bench_batch.py --ray [--problems N] [--concurrency C] [--json OUT]

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

With ``--ray`` it measures Ray's overhead instead: the same problems at the same concurrency
through ``critloop.methods.RefineMethod`` (what ``critloop batch`` runs), (a) in this process,
with the SQLite checkpoints a local ``critloop batch`` keeps, and (b) on one Ray worker of a Ray
instance started on this machine (``--ray local``; no checkpoints, as on Ray), the two
alternating ``--repeats`` times; medians, their ratio (target: Ray within 1.15x of local), Ray's
start-up, and the CPU seconds per problem of the driver, the Ray worker and the sandbox
containers (Docker's accounting), from which the README's projection is made.

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
from critloop.config import CritloopConfig, load_config
from critloop.graphs.batch import Problem, ResultsFile, load_problems, open_checkpointer, run_batch
from critloop.graphs.refine import build_refine_graph

TARGET_SPEEDUP = 40.0
TARGET_PEAK_MIB = 1024.0
TARGET_RAY_RATIO = 1.15
MODES = {
    "local": "local, with checkpoints (critloop batch)",
    "bare": "local, no checkpoints",
    "ray": "one Ray worker (critloop batch --ray local)",
}
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


def fake_config(url: str, tokenizer: str) -> CritloopConfig:
    """The policy and a GenPRM critic (one chain) on the fake server, the Docker sandbox."""
    endpoint = {"kind": "openai", "base_url": url, "model": "fake", "tokenizer": tokenizer}
    overrides = {f"{role}.{key}": value for role in ("policy", "critic") for key, value in endpoint.items()}
    overrides |= {"critic.profile": "genprm", "critic.samples": 1, "sandbox.backend": "docker"}
    overrides |= {"sandbox.pool_size": 2}
    return load_config(None, overrides)


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
        config = fake_config(server.base_url(args.delay_ms), tokenizer)
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


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    """CPU seconds of process ``pid`` (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sandbox_cpu(client: Any) -> float:
    """CPU seconds of every critloop sandbox container now running (Docker's accounting)."""
    import docker

    from critloop.sandbox.docker_backend import LABEL

    total = 0
    for container in client.containers.list(filters={"label": LABEL}):
        try:
            stats = container.stats(stream=False, one_shot=True)
        except (docker.errors.DockerException, ValueError):
            continue  # a closed pool's container, going away (gone, or answering nothing)
        total += int(stats["cpu_stats"]["cpu_usage"]["total_usage"])
    return total / 1e9


async def ray_async(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Local runs against runs on one Ray worker, alternating (see the module's docstring)."""
    from critloop.graphs.batch import MakeRecord, run_records
    from critloop.graphs.cluster import RayOptions, RayWorkers
    from critloop.methods import RefineMethod
    from critloop.sandbox.docker_backend import docker_client
    from critloop.tools.embedded import fetch_model

    tokenizer = str(fetch_model(progress=console.log).path)
    items = problems(args.problems)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "simulation": True,
        "machine": machine("langgraph", "ray"),
        "plan": {"problems": len(items), "concurrency": args.concurrency, "delay_ms": args.delay_ms},
    }
    docker = docker_client()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with FakeCriticServer() as server, tempfile.TemporaryDirectory() as tmp:
        config = fake_config(server.base_url(args.delay_ms), tokenizer)

        async def measure(
            mode: str, make: MakeRecord, todo: list[Problem], worker: int | None
        ) -> dict[str, Any]:
            out = Path(tmp, f"{mode}-{len(runs.get(mode, []))}-{len(todo)}.jsonl")
            server.reset()
            sandbox0, driver0 = _sandbox_cpu(docker), _cpu_self()
            worker0 = _cpu_of(worker) if worker else 0.0
            t0 = time.perf_counter()
            await run_records(todo, make, out, concurrency=args.concurrency)
            wall = time.perf_counter() - t0
            driver = _cpu_self() - driver0
            worker_cpu = _cpu_of(worker) - worker0 if worker else 0.0
            sandbox = _sandbox_cpu(docker) - sandbox0
            records = ResultsFile(out).records()
            return {
                "wall_s": wall,
                "records": len(records),
                "stop_reasons": sorted({r["stop_reason"] for r in records}),
                "errors": [r["error"] for r in records if r.get("error")][:3],
                "driver_cpu_s": driver,
                "worker_cpu_s": worker_cpu,
                "sandbox_cpu_s": sandbox,
                "server": server.stats(),
            }

        t0 = time.perf_counter()
        on_ray = RayOptions(address="local", workers=1)
        async with RayWorkers(RefineMethod(config=config), on_ray, concurrency=args.concurrency) as workers:
            ray_start = time.perf_counter() - t0
            worker_pid = int(workers.hosts[0].rsplit(" ", 1)[1])
            console.log(f"Ray up in {ray_start:.1f} s: one worker, {workers.hosts[0]}")
            await measure("ray-warm", workers.record, problems(4), worker_pid)
            warm = RefineMethod(config=config, checkpoints=Path(tmp, "checkpoints-warm.sqlite"))
            async with warm.open() as make:
                await measure("local-warm", make, problems(4), None)
            for i in range(args.repeats):
                # A fresh checkpoint file per local run: a finished thread would not run again.
                for mode, checkpoints in (("local", Path(tmp, f"checkpoints-{i}.sqlite")), ("bare", None)):
                    async with RefineMethod(config=config, checkpoints=checkpoints).open() as make:
                        console.log(
                            f"{MODES[mode]} #{i + 1}: {len(items)} problems, {args.concurrency} at a time"
                        )
                        runs[mode].append(await measure(mode, make, items, None))
                    console.log(f"  {runs[mode][-1]['wall_s']:.2f} s")
                console.log(f"{MODES['ray']} #{i + 1}: {len(items)} problems, {args.concurrency} at a time")
                runs["ray"].append(await measure("ray", workers.record, items, worker_pid))
                console.log(f"  {runs['ray'][-1]['wall_s']:.2f} s")
    n = len(items)

    def median(mode: str, key: str) -> float:
        values = sorted(r[key] for r in runs[mode])
        return values[len(values) // 2]

    walls = {mode: median(mode, "wall_s") for mode in MODES}
    ratio = walls["ray"] / walls["local"]
    per_problem = {
        **{f"{mode}_driver_cpu_s": median(mode, "driver_cpu_s") / n for mode in MODES},
        "ray_worker_cpu_s": median("ray", "worker_cpu_s") / n,
        "sandbox_cpu_s": median("local", "sandbox_cpu_s") / n,
    }
    report.update(
        {
            "runs": runs,
            "walls_s": walls,
            "ratio": ratio,
            "ratio_to_bare": walls["ray"] / walls["bare"],
            "ray_start_s": ray_start,
            "per_problem": per_problem,
            "problems_per_hour": {
                "per_driver_core": 3600 / per_problem["local_driver_cpu_s"],
                "per_sandbox_core": (
                    3600 / per_problem["sandbox_cpu_s"] if per_problem["sandbox_cpu_s"] else None
                ),
            },
            "targets": [
                {
                    "target": f"Ray wall within {TARGET_RAY_RATIO}x of local",
                    "value": round(ratio, 3),
                    "met": ratio <= TARGET_RAY_RATIO,
                }
            ],
        }
    )
    expected = n * CALLS_PER_PROBLEM
    report["failures"] = [
        f"{mode}: {r['records']} records, {r['stop_reasons']}, {r['errors']}, "
        f"{r['server']['requests']} requests"
        for mode in runs
        for r in runs[mode]
        if r["records"] != n or r["stop_reasons"] != ["all_steps_pass"] or r["server"]["requests"] != expected
    ]
    return report


def render_ray(report: dict[str, Any], console: Console) -> None:
    plan = report["plan"]
    title = f"Local against Ray, a SIMULATION ({plan['delay_ms']:g} ms per model call)"
    table = Table(title=f"{title}: {plan['problems']} problems, {plan['concurrency']} at a time")
    for column in ("run", "wall s (median)", "walls s", "driver CPU s/problem", "worker CPU s/problem"):
        table.add_column(column)
    for mode, name in MODES.items():
        table.add_row(
            name,
            f"{report['walls_s'][mode]:.2f}",
            ", ".join(f"{r['wall_s']:.2f}" for r in report["runs"][mode]),
            f"{report['per_problem'][f'{mode}_driver_cpu_s']:.4f}",
            f"{report['per_problem']['ray_worker_cpu_s']:.4f}" if mode == "ray" else "-",
        )
    console.print(table)
    per_hour = report["problems_per_hour"]
    console.print(
        f"ratio ray/local {report['ratio']:.3f} (target <= {TARGET_RAY_RATIO}); ray/local without "
        f"checkpoints {report['ratio_to_bare']:.3f}; Ray start-up {report['ray_start_s']:.1f} s; "
        f"sandbox CPU {report['per_problem']['sandbox_cpu_s']:.4f} s/problem"
    )
    console.print(
        f"problems per hour: {per_hour['per_driver_core']:,.0f} per driver core, "
        + (f"{per_hour['per_sandbox_core']:,.0f} per sandbox core" if per_hour["per_sandbox_core"] else "")
    )
    for t in report["targets"]:
        console.print(f"target {t['target']}: {t['value']} {'MET' if t['met'] else 'NOT MET'}")
    console.print("failures: " + ("; ".join(report["failures"]) or "none"))


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
    parser.add_argument("--ray", action="store_true", help="local runs against runs on a local Ray worker")
    args = parser.parse_args()
    if args.quick:
        args.problems, args.concurrency = 40, 16
    console = Console(width=140)
    if args.ray:
        report = asyncio.run(ray_async(args, console))
        render_ray(report, console)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
            console.print(f"wrote {args.json}")
        sys.exit(1 if report["failures"] else 0)
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
