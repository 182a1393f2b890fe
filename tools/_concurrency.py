"""Concurrency helpers shared by the roles and the runners."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")


async def all_or_nothing(coroutines: Sequence[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run concurrently; if one fails, cancel the others and raise that failure itself (a
    typed critloop error, not an exception group)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]
