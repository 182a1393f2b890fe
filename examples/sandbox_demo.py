"""A tour of the critloop sandbox: what the GenPRM critic does with it, step by step.

Run with `.venv/bin/python examples/sandbox_demo.py` after `critloop sandbox build` (`make demo`
runs the whole refine loop instead).
"""

from __future__ import annotations

import asyncio
import time

from critloop.sandbox import SandboxPool
from critloop.tools import PythonSandboxTool

STEPS = [
    (
        "Paragraph 1",
        "The roots of x^2 - 5x + 6 = 0 are 2 and 3.",
        "import sympy\nx = sympy.Symbol('x')\nroots = sympy.solve(x**2 - 5*x + 6, x)\nprint(roots)",
    ),
    (
        "Paragraph 2",
        "So the sum of the roots is 6.",
        "print(sum(roots), 'claimed 6 ->', 'correct' if sum(roots) == 6 else 'WRONG')",
    ),
]


async def critic_session() -> None:
    async with SandboxPool() as pool:
        status = pool.status()
        print(f"backend: {status.backend} (isolated: {status.isolated}), kernels: {status.kernels}")
        async with await pool.open_session() as session:
            for name, claim, code in STEPS:
                result = await session.exec(code)
                elapsed = f"{result.duration * 1e3:.1f} ms"
                print(f"{name}: {claim}\n  [Code Output] {result.stdout.strip()}  ({elapsed})")
            snapshot = await session.fork()
            await snapshot.exec("roots.append(99)")
            print(
                "fork diverges:",
                (await snapshot.exec("print(roots)")).stdout.strip(),
                "vs",
                (await session.exec("print(roots)")).stdout.strip(),
            )
            await snapshot.close()
            started = time.perf_counter()
            hostile = await session.exec("while True:\n    pass", timeout=0.5)
            print(
                f"infinite loop: {hostile.status} after {time.perf_counter() - started:.2f}s,"
                f" state survived: {hostile.state_survived}"
            )
            escape = await session.exec("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
            print("network egress:", escape.error)


def langchain_tool() -> None:
    tool = PythonSandboxTool()
    try:
        tool.invoke({"code": "total = sum(k**2 for k in range(1, 11))"})
        print("LangChain tool python_sandbox ->", tool.invoke({"code": "print(total)"}))
    finally:
        tool.close()


if __name__ == "__main__":
    asyncio.run(critic_session())
    langchain_tool()
