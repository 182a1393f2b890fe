"""The code sandbox: persistent Python sessions in locked-down containers.

Example:
    >>> import asyncio
    >>> from critloop.sandbox import SandboxPool
    >>> async def main():
    ...     async with SandboxPool() as pool, await pool.open_session() as session:
    ...         return (await session.exec("import sympy; sympy.factor('x**2 - 1')")).stdout
    >>> asyncio.run(main())  # doctest: +SKIP
    '(x - 1)*(x + 1)\\n'
"""

from critloop.sandbox.backend import SandboxBackend
from critloop.sandbox.config import SandboxBackendName, SandboxConfig
from critloop.sandbox.pool import PoolStatus, SandboxPool, Session, create_backend
from critloop.sandbox.types import ExecResult, ExecStatus

__all__ = [
    "ExecResult",
    "ExecStatus",
    "PoolStatus",
    "SandboxBackend",
    "SandboxBackendName",
    "SandboxConfig",
    "SandboxPool",
    "Session",
    "create_backend",
]
