"""Benchmark of the ``mc`` stage of ``critloop synth``: Monte Carlo rollouts of many step
prefixes at once versus one request at a time, and the requests it sends.

Run from the repository root::

    .venv/bin/python benchmarks/bench_synth.py [--problems N] [--paths P] [--steps S] [--json OUT]

A SIMULATION: the fake OpenAI-compatible server (``_fake_server.py``, its own process) answers
every request after a fixed delay (100 ms), ``n`` samples each, as vLLM does. Each problem has
P paths of S steps with distinct prefixes, so the stage asks one Pass@1 request and one request
per step prefix but the last, each for ``n = K`` completions (every completion is right, so
Pass@1 is 1 and K is the easy bucket, 32). The stage runs through ``critloop.methods.SynthMethod``
and ``run_method``, what ``critloop synth mc`` runs (the real OpenAI client, chat template,
grading and the crash-safe results file), (a) with ``--concurrency`` requests in flight, the
median of ``--repeats`` runs, and (b) one request at a time (the baseline). The report gives the
walls, their ratio (target: at least 40x), and the requests the server saw against the
expected count (one per prefix, not K).

This is a benchmark, not a test: it exits 0 when a target is missed, 1 when a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
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

from critloop.config import load_config
from critloop.graphs.batch import ResultsFile, run_method
from critloop.graphs.synth import StageItem
from critloop.methods import SynthMethod

TARGET_SPEEDUP = 40.0
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "tokenizer"


def path_records(problems: int, paths: int, steps: int) -> list[StageItem]:
    """What ``critloop synth paths`` writes: per problem, ``paths`` paths of ``steps`` steps, no
    two paths sharing a prefix."""
    return [
        StageItem(
            {
                "id": f"p{i}",
                "problem": f"What is 2 + 3 * 4? (#{i})",
                "gold": "14",
                "paths": [
                    {
                        "steps": [f"Path {p}, step {s}: 3 * 4 = 12." for s in range(1, steps + 1)],
                        "answer": "14",
                        "correct": True,
                    }
                    for p in range(paths)
                ],
            }
        )
        for i in range(problems)
    ]


async def run(
    items: list[StageItem], concurrency: int, url: str, workdir: Path, server: FakeCriticServer
) -> dict[str, Any]:
    endpoint = {"kind": "openai", "base_url": url, "model": "fake", "tokenizer": str(TOKENIZER)}
    config = load_config(None, {f"policy.{key}": value for key, value in endpoint.items()})
    method = SynthMethod(config=config, stage="mc", requests=concurrency)
    out = workdir / f"mc-c{concurrency}.jsonl"
    server.reset()
    t0 = time.perf_counter()
    await run_method(method, items, out, concurrency=concurrency)
    wall = time.perf_counter() - t0
    records = ResultsFile(out).records()
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "records": len(records),
        "errors": [r["error"] for r in records if r.get("error")][:3],
        "rollouts": sorted({r.get("rollouts") for r in records}, key=str),
        "requests_recorded": sum(int(r.get("requests", 0)) for r in records),
        "server": server.stats(),
    }


async def main_async(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    items = path_records(args.problems, args.paths, args.steps)
    expected = args.problems * (1 + args.paths * (args.steps - 1))
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "simulation": True,
        "machine": machine("openai"),
        "plan": {
            "problems": args.problems,
            "paths": args.paths,
            "steps": args.steps,
            "concurrency": args.concurrency,
            "delay_ms": args.delay_ms,
            "expected_requests": expected,
        },
    }
    with FakeCriticServer() as server, tempfile.TemporaryDirectory() as tmp:
        url = server.base_url(args.delay_ms)
        console.log("warm-up: 2 problems")
        await run(path_records(2, 2, 2), 8, url, Path(tmp), server)
        gc.collect()
        gc.freeze()
        runs = []
        for i in range(args.repeats):
            workdir = Path(tmp, f"concurrent-{i}")
            workdir.mkdir()
            runs.append(await run(items, args.concurrency, url, workdir, server))
            console.log(f"concurrent #{i + 1}: {runs[-1]['wall_s']:.2f} s")
        runs.sort(key=lambda r: r["wall_s"])
        concurrent = runs[len(runs) // 2] | {"walls_s": sorted(r["wall_s"] for r in runs)}
        workdir = Path(tmp, "sequential")
        workdir.mkdir()
        console.log(f"one request at a time: {expected} requests of {args.delay_ms} ms")
        sequential = await run(items, 1, url, workdir, server)
    speedup = sequential["wall_s"] / concurrent["wall_s"]
    report |= {
        "concurrent": concurrent,
        "sequential": sequential,
        "speedup": speedup,
        "targets": {
            "speedup_min": TARGET_SPEEDUP,
            "speedup_met": speedup >= TARGET_SPEEDUP,
            "one_request_per_prefix": concurrent["server"]["requests"]
            == expected
            == sequential["server"]["requests"],
        },
    }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--paths", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--delay-ms", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(stderr=True)
    report = asyncio.run(main_async(args, console))
    table = Table("run", "wall", "requests (server)", "requests (records)", "K", "errors")
    for name in ("concurrent", "sequential"):
        r = report[name]
        table.add_row(
            f"{name} (c={r['concurrency']})",
            f"{r['wall_s']:.2f} s",
            str(r["server"]["requests"]),
            str(r["requests_recorded"]),
            ",".join(str(k) for k in r["rollouts"]),
            str(len(r["errors"])),
        )
    Console().print(table)
    targets = report["targets"]
    Console().print(
        f"speedup {report['speedup']:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: "
        f"{'met' if targets['speedup_met'] else 'MISSED'}); expected requests "
        f"{report['plan']['expected_requests']}: {'met' if targets['one_request_per_prefix'] else 'MISSED'}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = any(
        report[name]["errors"] or report[name]["records"] != args.problems
        for name in ("concurrent", "sequential")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
