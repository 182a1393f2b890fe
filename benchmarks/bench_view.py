"""Benchmark of ``critloop view`` on a large batch: the page's size and how fast headless
Chromium loads it.

Run from the repository root (needs Debian's ``chromium``)::

    .venv/bin/python benchmarks/bench_view.py [--problems N] [--loads L] [--json OUT]

The batch is synthetic (the tests' ``synthetic_records``: 4 to 8 steps of 150 to 450
characters, up to 3 refinement rounds, a critique and mostly a code run for every judged step,
about 3% errors). The report gives the results file's size, the page's, the time
``write_view`` takes, and over ``--loads`` fresh loads in headless Chromium the time to the load
event (``performance`` navigation timing) and to opening one problem; medians. No target: the
numbers go in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' synthetic batch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine
from browser import Chromium
from test_view import click, synthetic_records, write_jsonl

from critloop.graphs.view import write_view


async def measure(problems: int, loads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        results = write_jsonl(Path(tmp) / "big.jsonl", synthetic_records(problems))
        started = time.perf_counter()
        page = write_view(results)
        written = time.perf_counter() - started
        load_ms, open_ms = [], []
        for _ in range(loads):
            async with await Chromium.open() as browser:
                await browser.navigate(page.as_uri())
                await browser.wait_for("document.body.dataset.ready === '1'")
                load_ms.append(
                    await browser.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
                )
                last = f"gsm8k-{problems - 1:04d}"
                open_ms.append(
                    await browser.evaluate(
                        f"(() => {{ const t = performance.now(); {click(f'[data-id={last}]')}; "
                        "return performance.now() - t; })()"
                    )
                )
        return {
            "problems": problems,
            "results_mb": results.stat().st_size / 1e6,
            "page_mb": page.stat().st_size / 1e6,
            "write_view_s": written,
            "load_ms": sorted(load_ms),
            "load_ms_median": statistics.median(load_ms),
            "open_problem_ms_median": statistics.median(open_ms),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        **asyncio.run(measure(args.problems, args.loads)),
    }
    print(
        f"{report['problems']} problems: results {report['results_mb']:.2f} MB, "
        f"page {report['page_mb']:.2f} MB "
        f"(written in {report['write_view_s']:.2f} s); Chromium load event: median "
        f"{report['load_ms_median']:.0f} ms of {report['load_ms']}; opening a problem: median "
        f"{report['open_problem_ms_median']:.1f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
