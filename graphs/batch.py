"""Batch refinement: datasets in, one crash-safe JSONL record per problem out, resumable.

Example:
    >>> problems, bad = load_problems("gsm8k_test.jsonl", limit=20)  # doctest: +SKIP
    >>> records = await run_batch(graph, context, problems, "results.jsonl", concurrency=16)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypedDict, Unpack

from critloop.agent.steps import extract_answer, join_steps
from critloop.errors import ConfigError
from critloop.graphs._results import ResultsFile
from critloop.graphs.events import DoneEvent, SolutionEvent, StepEvent, preview
from critloop.graphs.refine import RefineContext, RefineGraph, stream_refine
from critloop.graphs.result import SolveResult
from critloop.tools.grading import agrade, gold_from_gsm8k

if TYPE_CHECKING:
    from critloop.graphs.cluster import RayOptions

__all__ = [
    "BatchMethod",
    "FieldMap",
    "Item",
    "MakeRecord",
    "open_checkpointer",
    "Problem",
    "ResultsFile",
    "RunOptions",
    "error_record",
    "load_problems",
    "record_id",
    "run_batch",
    "run_method",
    "run_records",
    "solve_record",
]

PROBLEM_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("extracted_groundtruth", "answer")
ID_FIELDS = ("id", "unique_id")


@dataclass(frozen=True, kw_only=True)
class FieldMap:
    """Which record fields hold the problem, the gold answer and the id (None: detected)."""

    problem: str | None = None
    """Default: ``problem``, else ``question``."""
    answer: str | None = None
    """Default: ``extracted_groundtruth`` (AIME, AMC), else ``answer`` (MATH-500; for GSM8K the
    number after ``####``)."""
    id: str | None = None
    """Default: ``id``, else ``unique_id``, else ``<file stem>:<line>``."""


class Problem(BaseModel):
    """One problem of a dataset."""

    model_config = ConfigDict(frozen=True)

    id: str
    problem: str
    gold: str | None
    line: int
    """1-based line (JSONL, CSV data rows) or position (JSON array) in the file."""

    @property
    def key(self) -> str:
        """What identifies the problem's record in a results file (see :func:`record_id`)."""
        return self.id


def load_problems(
    source: str | Path,
    *,
    fields: FieldMap = FieldMap(),
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[list[Problem], list[dict[str, Any]]]:
    """The problems of a JSONL, JSON or CSV file, and error records for the bad ones.

    A malformed line, a missing or empty problem, or a duplicate id never stops the load: it
    becomes an error record (``id``, ``error`` naming the line) and the rest goes on.
    ``shuffle`` (with ``seed``) and ``limit`` pick the records before they are checked.

    Raises:
        ConfigError: the file cannot be read, or its format is unknown.
    """
    path = Path(source)
    if not path.exists():
        path = _from_hub(str(source))
    rows = list(_rows(path))
    if shuffle:
        random.Random(seed).shuffle(rows)
    if limit is not None:
        rows = rows[:limit]
    problems: list[Problem] = []
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line, row in rows:
        where = f"{path.name} line {line}"
        if isinstance(row, str):
            bad.append(error_record(f"{path.stem}:{line}", f"{where}: {row}"))
            continue
        key = _pick(row, fields.id, ID_FIELDS)
        pid = str(row[key]) if key else f"{path.stem}:{line}"
        candidates = (fields.problem,) if fields.problem else PROBLEM_FIELDS
        if not any(key in row for key in candidates):
            bad.append(error_record(pid, f"{where}: no {' or '.join(candidates)!r} field"))
            continue
        # Detection passes over a field that is there but null or "": that problem is empty.
        problem_key = _pick(row, fields.problem, PROBLEM_FIELDS)
        text = row[problem_key] if problem_key is not None else None
        if not isinstance(text, str) or not text.strip():
            bad.append(error_record(pid, f"{where}: the problem is empty"))
            continue
        if pid in seen:
            bad.append(error_record(f"{pid}@line{line}", f"{where}: duplicate id {pid!r}"))
            continue
        seen.add(pid)
        problems.append(Problem(id=pid, problem=text.strip(), gold=_gold(row, fields.answer), line=line))
    return problems, bad


_HUB_ID = re.compile(r"^(?:hf://)?([\w.-]+/[\w.-]+)(?::(.+))?$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv")


def _from_hub(source: str) -> Path:
    """A data file of a Hugging Face hub dataset: ``owner/name`` (its one JSONL/JSON/CSV file, or
    the one whose path holds ``test``) or ``owner/name:path/in/repo.jsonl``; from the local hub
    cache when offline (``HF_HUB_OFFLINE=1``)."""
    match = _HUB_ID.match(source)
    if match is None or source.startswith((".", "/")):
        raise ConfigError(
            f"{source}: no such file (give a JSONL, JSON or CSV file, or a hub dataset id such as "
            "openai/gsm8k or owner/name:path/in/repo.jsonl)"
        )
    repo, wanted = match.groups()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        folder = Path(
            snapshot_download(
                repo,
                repo_type="dataset",
                allow_patterns=[wanted] if wanted else [f"*{s}" for s in DATA_SUFFIXES],
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(
            f"{source}: not a file here, and the hub dataset {repo!r} could not be fetched "
            f"({type(exc).__name__}: {exc}); download its data file and give its path"
        ) from None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if wanted:
        files = [p for p in files if p.relative_to(folder).as_posix() == wanted]
    elif len(files) > 1:
        files = [p for p in files if "test" in p.relative_to(folder).as_posix()] or files
    if len(files) != 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in files) or "none"
        raise ConfigError(
            f"{source}: pick one data file of the dataset as {repo}:PATH (JSONL/JSON/CSV: {names})"
        )
    return files[0]


def _rows(path: Path) -> Iterable[tuple[int, dict[str, Any] | str]]:
    """(line, record) pairs; a record that cannot be read is a string saying why."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as exc:
                yield number, f"not valid JSON ({exc})"
                continue
            yield number, row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON array of records (or {{'data': [...]}})")
        for number, row in enumerate(data, 1):
            yield number, row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for number, row in enumerate(reader, 2):  # line 1 is the header
            yield number, dict(row)
    else:
        raise ConfigError(f"{path}: unknown format {suffix or '(none)'!r}; use .jsonl, .json or .csv")


def _pick(row: dict[str, Any], wanted: str | None, defaults: Sequence[str]) -> str | None:
    if wanted is not None:
        return wanted if wanted in row else None
    return next((key for key in defaults if key in row and row[key] not in (None, "")), None)


def _gold(row: dict[str, Any], wanted: str | None) -> str | None:
    key = _pick(row, wanted, ANSWER_FIELDS)
    if key is None:
        return None
    value = row[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # AMC's 27.0
    text = str(value).strip()
    return gold_from_gsm8k(text) if "####" in text else text


# --------------------------------------------------------------------------- checkpoints


@contextlib.asynccontextmanager
async def open_checkpointer(path: str | Path) -> AsyncIterator[Any]:
    """LangGraph's SQLite saver for a batch's checkpoints (resume of interrupted problems).

    SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit no longer waits for the disk,
    which with many problems in flight was the batch's bottleneck (one fsync per checkpoint, all
    through one connection). A killed process loses nothing committed; a power cut may lose the
    last checkpoints, which then simply run again.
    """
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with aiosqlite.connect(str(path)) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        yield AsyncSqliteSaver(conn)


def error_record(
    pid: str, error: str, *, problem: str | None = None, gold: str | None = None
) -> dict[str, Any]:
    """The record of a problem that could not be solved (a bad input record, a failed run)."""
    return {
        "id": pid,
        "problem": problem,
        "gold": gold,
        "answer": None,
        "initial_answer": None,
        "correct_initial": False,
        "correct_final": False,
        "correct_by_round": [],
        "stop_reason": "error",
        "rounds": [],
        "error": error,
    }


# --------------------------------------------------------------------------- the runner


class Item(Protocol):
    """What a batch runs over: a :class:`Problem`, a ProcessBench sample."""

    @property
    def key(self) -> Hashable:
        """What identifies the item's record in the results file (its ``record_key``)."""
        ...


MakeRecord = Callable[[Any], Awaitable[dict[str, Any]]]
"""What a batch method does with one item: its record (a failure included, as an error record)."""


def record_id(record: dict[str, Any]) -> Hashable:
    """The key of a problem's record: its ``id``."""
    return record.get("id")


class BatchMethod(Protocol):
    """A batch method as a run opens it: once per process, or once per Ray worker.

    Implementations (``critloop.methods``) are picklable recipes, a config and the method's
    parameters, so that each Ray worker can open its own models, sandbox pool and clients.
    """

    def open(self) -> contextlib.AbstractAsyncContextManager[MakeRecord]:
        """Build the roles (models, sandbox pool) and give the per-item record maker; leaving
        the context releases them."""
        ...

    def record_key(self, record: dict[str, Any]) -> Hashable:
        """The key of a record, equal to its item's ``key`` (what resume skips)."""
        ...

    def failed(self, item: Any, error: str) -> dict[str, Any]:
        """The error record of an item that could not be run at all (``error`` says why)."""
        ...


class RunOptions(TypedDict, total=False):
    """How a batch method runs over its problems (see :func:`run_batch`)."""

    concurrency: int
    """Problems in flight at once (default 8); on Ray, in flight on each worker."""
    resume: bool
    """Skip the ids already in the results file; without it, a non-empty file is an error."""
    bad: Sequence[dict[str, Any]]
    """Error records of bad input records, written first (once)."""
    on_record: Callable[[dict[str, Any]], None] | None
    """Called with each record as it is written (progress display)."""


async def run_method(
    method: BatchMethod,
    items: Sequence[Item],
    out: str | Path,
    *,
    ray: RayOptions | None = None,
    **options: Unpack[RunOptions],
) -> list[dict[str, Any]]:
    """Run a batch ``method`` over ``items`` into ``out``: in this process, or on a Ray cluster.

    Both ways run the same method and write the same results file, from this process, one
    record per item, with the same resume (see :func:`run_records`). On Ray, every worker opens
    the method itself and runs ``concurrency`` items at once; items a lost worker was running
    run again on another (see :class:`~critloop.graphs.cluster.RayWorkers`).

    Args:
        method: the recipe of the method (``critloop.methods``).
        items: what to run (problems, ProcessBench samples).
        out: the results file (JSONL).
        ray: where the Ray cluster is and how many workers; None: run here.
        **options: see :class:`RunOptions`.

    Example:
        >>> method = RefineMethod(config=load_config("critloop.toml"))  # doctest: +SKIP
        >>> on_ray = RayOptions(address="auto")  # doctest: +SKIP
        >>> await run_method(method, problems, "results.jsonl", ray=on_ray)  # doctest: +SKIP
    """
    if options.get("resume"):
        done = {method.record_key(record) for record in ResultsFile(out).records()}
        keys = [*(item.key for item in items), *(method.record_key(r) for r in options.get("bad", ()))]
        if all(key in done for key in keys):
            return []  # nothing left: no models to load, no cluster to join
    if ray is None:
        async with method.open() as make_record:
            return await run_records(items, make_record, out, record_key=method.record_key, **options)
    from critloop.graphs.cluster import RayWorkers

    per_worker = options.get("concurrency", 8)
    async with RayWorkers(method, ray, concurrency=per_worker) as workers:
        options["concurrency"] = per_worker * workers.size
        return await run_records(items, workers.record, out, record_key=method.record_key, **options)


async def run_batch(
    graph: RefineGraph,
    context: RefineContext,
    problems: Sequence[Problem],
    out: str | Path,
    **options: Unpack[RunOptions],
) -> list[dict[str, Any]]:
    """Run every problem through the refine ``graph`` and append one record each to ``out``.

    Args:
        graph: the compiled refine graph; with a checkpointer, interrupted problems resume from
            their last finished node (the thread id is the problem id).
        context: the roles and budget, shared by all problems (one sandbox pool, one client set).
        problems: what to solve.
        out: the results file (JSONL).
        **options: ``concurrency``, ``resume``, ``bad``, ``on_record`` (see :class:`RunOptions`).

    Returns:
        The records written by this call.

    Raises:
        ConfigError: ``concurrency`` is below 1, or ``out`` holds results and ``resume`` is off.
    """
    return await run_records(problems, lambda problem: solve_record(graph, context, problem), out, **options)


async def run_records(
    items: Sequence[Item],
    make_record: MakeRecord,
    out: str | Path,
    *,
    record_key: Callable[[dict[str, Any]], Hashable] = record_id,
    **options: Unpack[RunOptions],
) -> list[dict[str, Any]]:
    """The runner under every batch method: ``make_record`` for each item whose key is not yet
    in ``out``, ``concurrency`` at a time, each record appended as soon as it is made (see
    :func:`run_batch` for the arguments; ``record_key`` gives a record's key)."""
    concurrency = options.get("concurrency", 8)
    on_record = options.get("on_record")
    if concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    results = ResultsFile(out)
    done = {record_key(record) for record in results.open_for_append(resume=options.get("resume", False))}
    written: list[dict[str, Any]] = []

    async def emit(record: dict[str, Any]) -> None:
        await results.append(record)
        written.append(record)
        if on_record is not None:
            on_record(record)

    for record in options.get("bad", ()):
        if record_key(record) not in done:
            done.add(record_key(record))
            await emit(record)
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Item) -> None:
        async with gate:
            await emit(await make_record(item))

    await asyncio.gather(*(one(item) for item in items if item.key not in done))
    return written


async def solve_record(
    graph: RefineGraph, context: RefineContext, problem: Problem, *, details: int = 0
) -> dict[str, Any]:
    """One problem's record: the run's result, graded, with the steps the critic judged.

    With ``details`` > 0 the record also holds ``critiques``: every step the critic judged, in
    order, with the round of the solution it belongs to (0: the first), the step, its reward,
    verdict, tier, the start of the critique and the code the critic ran with its output (what
    ``critloop view`` shows), each text cut to ``details`` characters.
    """
    critiqued: list[list[Any]] = []
    critiques: list[dict[str, Any]] = []
    steps: list[str] = []
    round_number = 0
    result: SolveResult | None = None
    try:
        async for event in stream_refine(graph, context, problem.problem, thread_id=problem.id):
            match event:
                case SolutionEvent():
                    steps, round_number = event.steps, event.round
                case StepEvent(reused=False):
                    critiqued.append([event.reward, event.flagged])
                    if details:
                        critiques.append(_critique_detail(event, round_number, steps, details))
                case DoneEvent():
                    result = event.result
    except Exception as exc:  # noqa: BLE001 - one problem's failure is its record, the batch goes on
        return error_record(
            problem.id, f"{type(exc).__name__}: {exc}", problem=problem.problem, gold=problem.gold
        )
    assert result is not None
    initial_answer = extract_answer(join_steps(result.initial_steps))
    by_round = [initial_answer, *(extract_answer(join_steps(r["steps"])) for r in result.rounds)]
    correct_by_round = [await agrade(answer, problem.gold) for answer in by_round]
    record = result.model_dump(mode="json", exclude={"last_report"})
    record.update(
        {
            "id": problem.id,
            "gold": problem.gold,
            "initial_answer": initial_answer,
            "correct_initial": correct_by_round[0],
            "correct_final": await agrade(result.answer, problem.gold),
            "correct_by_round": correct_by_round,
            "critiqued": critiqued,
            **({"critiques": critiques} if details else {}),
        }
    )
    return record


def _critique_detail(event: StepEvent, round_number: int, steps: Sequence[str], limit: int) -> dict[str, Any]:
    """A judged step as ``critiques`` keeps it, each text cut to ``limit`` characters."""
    return {
        "round": round_number,
        "index": event.index,
        "step": preview(steps[event.index], limit) if event.index < len(steps) else "",
        "reward": event.reward,
        "flagged": event.flagged,
        "verdict": event.verdict,
        "tier": event.tier,
        "critique": preview(event.critique, limit),
        "code_runs": [
            {"code": preview(run.code, limit), "output": preview(run.output, limit), "status": run.status}
            for run in event.code_runs
        ],
    }
