"""Batch methods for the Ray tests that Ray workers import (the tests' folder is on their path)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from typing import Any

from critloop.graphs.batch import MakeRecord, Problem
from critloop.methods import RefineMethod


@dataclass(frozen=True, kw_only=True)
class PoisonedMethod:
    """The refine method, except that the problem ``poison`` kills the worker process running it
    (as a segfault or the kernel's OOM killer would)."""

    inner: RefineMethod
    poison: str

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[MakeRecord]:
        async with self.inner.open() as make_record:

            async def poisoned(problem: Problem) -> dict[str, Any]:
                if problem.id == self.poison:
                    os._exit(1)
                return await make_record(problem)

            yield poisoned

    def record_key(self, record: dict[str, Any]) -> Hashable:
        return self.inner.record_key(record)

    def failed(self, item: Problem, error: str) -> dict[str, Any]:
        return self.inner.failed(item, error)
