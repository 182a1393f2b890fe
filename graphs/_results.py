"""The crash-safe results file of every batch runner (refine batch, Best-of-N, ProcessBench).

Example:
    >>> results = ResultsFile("results.jsonl")  # doctest: +SKIP
    >>> done = {record["id"] for record in results.open_for_append(resume=True)}  # doctest: +SKIP
    >>> await results.append({"id": "q1", "answer": "14"})  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from critloop.errors import ConfigError

__all__ = ["ResultsFile"]


class ResultsFile:
    """An append-only JSONL file of records, one a line, crash-safe.

    Each record is written with one ``write`` of the whole line, fsynced before the next. A line
    torn by a crash (no final newline) is cut off when the file is opened for append again, so
    the finished records before it are untouched and the torn record's work simply runs again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # One writer at a time: two appends in flight could interleave their bytes.
        self._lock = asyncio.Lock()

    def records(self) -> list[dict[str, Any]]:
        """The complete records in the file (a torn last line is not one); none when it is missing."""
        if not self.path.exists():
            return []
        records = []
        with self.path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    records.append(json.loads(raw))
                except ValueError:
                    continue  # this writer never leaves one; a hand-edited line must not lose the rest
        return records

    def holds_records(self) -> bool:
        """Whether the file exists and is not empty."""
        return self.path.exists() and self.path.stat().st_size > 0

    def open_for_append(self, *, resume: bool) -> list[dict[str, Any]]:
        """Get the file ready for :meth:`append` and return the records it holds already.

        Creates the parent folder and cuts a torn last line (see :meth:`repair`).

        Args:
            resume: whether records already in the file continue a run; without it, a file that
                holds records is an error (a new run must not mix with an old one).

        Raises:
            ConfigError: the file holds records and ``resume`` is off.
        """
        if not resume and self.holds_records():
            raise ConfigError(
                f"{self.path} already holds results: pass --resume to continue it, or choose another --out"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repair()
        return self.records()

    def repair(self) -> None:
        """Cut a torn last line (a crash in the middle of a write)."""
        if not self.path.exists():
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    async def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line, and wait until it is on disk."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        async with self._lock:
            await asyncio.to_thread(self._write, line)

    def _write(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
