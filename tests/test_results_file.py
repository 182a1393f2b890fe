"""The crash-safe results file shared by the batch, Best-of-N and ProcessBench runners."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from critloop.errors import ConfigError
from critloop.graphs._results import ResultsFile


def test_a_missing_file_holds_no_records(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "none.jsonl")
    assert results.records() == [] and not results.holds_records()
    results.repair()  # nothing to repair, nothing created
    assert not results.path.exists()


def test_opening_for_append_cuts_a_torn_last_line_and_returns_the_finished_records(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "ans')
    results = ResultsFile(out)
    assert [r["id"] for r in results.open_for_append(resume=True)] == ["a", "b"]
    assert out.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'


def test_a_file_with_records_needs_resume(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text('{"id": "a"}\n')
    with pytest.raises(ConfigError, match="already holds results: pass --resume"):
        ResultsFile(out).open_for_append(resume=False)
    assert out.read_text() == '{"id": "a"}\n'  # untouched
    (tmp_path / "empty.jsonl").write_text("")
    assert ResultsFile(tmp_path / "empty.jsonl").open_for_append(resume=False) == []


def test_the_folder_is_created(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "deep" / "er" / "r.jsonl")
    assert results.open_for_append(resume=False) == []
    assert results.path.parent.is_dir()


async def test_concurrent_appends_after_a_crash_give_whole_lines_each_once(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": "done"}\n{"id": "torn", "answer": "1')
    results = ResultsFile(out)
    results.open_for_append(resume=True)
    records = [{"id": f"p{i}", "text": "é" * (i * 500)} for i in range(40)]
    await asyncio.gather(*(results.append(record) for record in records))
    lines = out.read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines)
    assert json.loads(lines[0])["id"] == "done"
    assert sorted(r["id"] for r in results.records()) == sorted(["done", *(r["id"] for r in records)])
    assert {r["id"]: r for r in results.records()}["p39"] == records[39]  # non-ASCII kept as is


def test_a_bad_line_in_the_middle_does_not_lose_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": "a"}\n{edited by hand\n{"id": "b"}\n')
    assert [r["id"] for r in ResultsFile(out).records()] == ["a", "b"]
