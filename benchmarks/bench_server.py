"""Benchmark of ``critloop serve``: requests per second and latency at 1, 16 and 64 clients, and
the server's own overhead over calling the Solver directly.

Run from the repository root (the sandbox image must be built: ``critloop sandbox build``)::

    .venv/bin/python benchmarks/bench_server.py [--quick] [--json OUT]

The models are instant (a SIMULATION): the fake OpenAI-compatible server (``_fake_server.py``,
its own process, no delay) plays the policy (a three-step solution) and a GenPRM critic (code,
then Yes), so a request costs the refine graph 10 model calls and 3 sandbox execs, and the
measured time is critloop's own. ``critloop serve`` runs as a real subprocess (the CLI, with
the same config); clients post to ``/v1/chat/completions`` concurrently. The baseline is the
same work without HTTP: ``Solver.asolve`` called in this process by as many concurrent callers.
Overhead = server latency - direct latency (medians, and p99s), at each concurrency.

This is a benchmark, not a test: it exits 0 when a target is missed, 1 when a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _fake_server import FakeCriticServer
from _machine import machine

from critloop import Solver
from critloop.config import load_config

TARGET_OVERHEAD_MS = 20.0
TARGET_CLIENTS = 16
PROBLEM = "What is 2 + 3 * 4?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def load(call: Any, clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` concurrent loops of ``per_client`` calls; latencies and throughput."""
    latencies: list[float] = []

    async def loop() -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": _pct(latencies, 99) * 1e3,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_ms", "p99_ms")} | {
        "clients": runs[0]["clients"],
        "requests": sum(r["requests"] for r in runs),
    }


async def main_async(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from critloop.tools.embedded import fetch_model

    tokenizer = str(fetch_model(progress=console.log).path)
    levels = args.levels or ([1, 16] if args.quick else [1, 16, 64])
    per_client = 3 if args.quick else 6
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "simulation": True,
        "machine": machine("uvicorn", "fastapi"),
        "levels": {},
    }
    with FakeCriticServer() as fake, tempfile.TemporaryDirectory() as tmp:
        endpoint = f'kind = "openai"\nbase_url = "{fake.base_url(0)}"\nmodel = "fake"\n'
        endpoint += f'tokenizer = "{tokenizer}"\n'
        config = Path(tmp) / "critloop.toml"
        config.write_text(
            f'[policy]\n{endpoint}\n[critic]\n{endpoint}profile = "genprm"\nsamples = 1\n'
            # 64 runs hold ~200 sandbox sessions at ~8 MB each (after sympy): 4 kernels of 1 GiB.
            '[sandbox]\nbackend = "docker"\npool_size = 4\nmemory_mb = 1024\n'
        )
        port = _free_port()
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("critloop")), "serve", "--config", str(config),
             "--port", str(port), "--max-concurrency", "64", "--max-queue", "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            limits = httpx.Limits(max_connections=128)
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
                deadline = time.monotonic() + 120
                while True:
                    if server.poll() is not None:
                        why = server.stderr.read() if server.stderr else ""
                        raise RuntimeError(f"critloop serve exited: {why}")
                    try:
                        if (await http.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError("critloop serve did not start in 120 s")
                    await asyncio.sleep(0.2)
                body = {"model": "critloop", "messages": [{"role": "user", "content": PROBLEM}]}

                async def via_http() -> None:
                    response = await http.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    extension = response.json()["critloop"]
                    assert extension["stop_reason"] == "all_steps_pass", extension["error"]

                async with Solver.from_config(load_config(config)) as solver:

                    async def direct() -> None:
                        result = await solver.asolve(PROBLEM)
                        assert result.stop_reason == "all_steps_pass", result.error

                    console.log("warm-up")
                    await load(via_http, 4, 2)
                    await load(direct, 4, 2)
                    gc.collect()
                    gc.freeze()  # as the server does after start-up
                    for clients in levels:
                        # Alternate server and direct runs: the machine's noise drifts, and a
                        # difference of medians taken side by side is what is reported.
                        served_runs, direct_runs = [], []
                        for repeat in range(args.repeats):
                            console.log(f"{clients} clients x {per_client} requests (repeat {repeat + 1})")
                            served_runs.append(await load(via_http, clients, per_client))
                            direct_runs.append(await load(direct, clients, per_client))
                        report["levels"][clients] = {
                            "server": _median_run(served_runs),
                            "direct": _median_run(direct_runs),
                            "overhead_p50_ms": statistics.median(
                                s["p50_ms"] - d["p50_ms"]
                                for s, d in zip(served_runs, direct_runs, strict=True)
                            ),
                            "overhead_p99_ms": statistics.median(
                                s["p99_ms"] - d["p99_ms"]
                                for s, d in zip(served_runs, direct_runs, strict=True)
                            ),
                            "repeats": args.repeats,
                        }
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    at = report["levels"].get(TARGET_CLIENTS, {}).get("overhead_p50_ms", float("nan"))
    report["target"] = {
        "target": f"p50 overhead under {TARGET_OVERHEAD_MS:g} ms at {TARGET_CLIENTS} clients",
        "value_ms": round(at, 2),
        "met": at < TARGET_OVERHEAD_MS,
    }
    return report


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title="critloop serve, instant models (a SIMULATION): latency, throughput")
    columns = ("clients", "server rps", "server p50 ms", "server p99 ms", "direct p50 ms", "direct p99 ms")
    for column in (*columns, "overhead p50 ms", "overhead p99 ms"):
        table.add_column(column, justify="right")
    for clients, level in report["levels"].items():
        s, d = level["server"], level["direct"]
        table.add_row(
            str(clients), f"{s['rps']:.1f}", f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}", f"{d['p50_ms']:.1f}",
            f"{d['p99_ms']:.1f}", f"{level['overhead_p50_ms']:.1f}", f"{level['overhead_p99_ms']:.1f}",
        )  # fmt: skip
    console.print(table)
    t = report["target"]
    console.print(f"target: {t['target']}: {t['value_ms']} ms -> {'MET' if t['met'] else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 and 16 clients, fewer requests")
    parser.add_argument("--levels", type=int, nargs="+", help="client counts (default 1 16 64)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating server/direct runs per level")
    parser.add_argument("--json", metavar="OUT", help="also write every number as JSON to OUT")
    args = parser.parse_args()
    console = Console(width=150)
    try:
        report = asyncio.run(main_async(args, console))
    except (RuntimeError, AssertionError, httpx.HTTPError) as exc:
        console.print(f"[red]failed: {type(exc).__name__}: {exc!r}")
        console.print_exception()
        sys.exit(1)
    render(report, console)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
