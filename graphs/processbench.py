"""ProcessBench evaluation of a critic: predict the earliest wrong step of labelled solutions.

ProcessBench (Zheng et al., 2024) labels each solution with the 0-based index of its earliest
wrong step, or -1 when every step is right. The critic runs a first-error scan; its prediction is
the first flagged step (-1 when all pass). Per split: accuracy on erroneous samples, accuracy on
correct samples, and their harmonic mean (F1); the benchmark's score is the mean of the split F1s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from critloop.agent.critic import GenPRMCritic
from critloop.errors import ConfigError, CritloopError
from critloop.graphs._results import ResultsFile
from critloop.graphs.batch import run_records

__all__ = [
    "PAPER_F1",
    "SPLITS",
    "ProcessBenchRecord",
    "Split",
    "SplitMetrics",
    "evaluate_processbench",
    "failed_line",
    "load_processbench",
    "metrics",
    "read_results",
    "result_key",
    "result_line",
]

Split = Literal["gsm8k", "math", "olympiadbench", "omnimath"]
"""The splits of the benchmark (its four source datasets)."""
SPLITS: tuple[Split, ...] = get_args(Split)
PAPER_F1 = {
    "GenPRM-7B Pass@1": {
        "gsm8k": 78.7,
        "math": 80.3,
        "olympiadbench": 72.2,
        "omnimath": 69.8,
        "average": 75.2,
    },
    "GenPRM-7B Maj@8": {
        "gsm8k": 81.0,
        "math": 85.7,
        "olympiadbench": 78.4,
        "omnimath": 76.8,
        "average": 80.5,
    },
}
"""The paper's ProcessBench F1 for GenPRM-7B (Zhao et al., AAAI 2026), for comparison."""


@dataclass(frozen=True, kw_only=True)
class ProcessBenchRecord:
    id: str
    split: str
    problem: str
    steps: tuple[str, ...]
    label: int
    """0-based index of the earliest wrong step; -1 when every step is right."""

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the sample's line in a results file (see :func:`result_key`)."""
        return (self.split, self.id)


def result_key(line: dict[str, Any]) -> Hashable:
    """The key of a result line: its (split, id) pair (ids repeat across splits)."""
    return (line.get("split"), line.get("id"))


def _records(rows: Iterable[Any], split: str | None, source: Path) -> list[ProcessBenchRecord]:
    records = []
    for line, row in enumerate(rows, start=1):
        where = f"{source}: record {line}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not an object")
        missing = [k for k in ("id", "problem", "steps", "label") if k not in row]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}")
        steps = row["steps"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise ConfigError(f"{where}: `steps` must be a non-empty list of strings")
        label = row["label"]
        if not isinstance(label, int) or not -1 <= label < len(steps):
            raise ConfigError(f"{where}: `label` must be -1 or a step index, not {label!r}")
        own_split = row.get("split")
        records.append(
            ProcessBenchRecord(
                id=str(row["id"]),
                split=split or (str(own_split) if own_split else source.stem),
                problem=str(row["problem"]),
                steps=tuple(steps),
                label=label,
            )
        )
    return records


def load_processbench(source: str | Path, split: str | None = None) -> list[ProcessBenchRecord]:
    """Records from a ProcessBench file (JSON list or JSONL).

    Args:
        source: the file.
        split: the split of every record; None: a record's own ``split`` field where it has
            one, else the file's stem (the benchmark's files are ``<split>.json``).

    Raises:
        ConfigError: the file cannot be read, or a record is malformed (the message names it).
    """
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return _records(rows, split, path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {number} is not valid JSON: {exc.msg}") from None
    return _records(rows, split, path)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The result lines of an evaluation file (a torn last line, from a crash, is ignored)."""
    return ResultsFile(path).records()


async def evaluate_processbench(
    critic: GenPRMCritic,
    records: Sequence[ProcessBenchRecord],
    out: str | Path,
    *,
    samples: int | None = None,
    concurrency: int = 8,
    on_result: Callable[[dict[str, Any]], None] = lambda _r: None,
) -> list[dict[str, Any]]:
    """Critique every record not yet in ``out`` and append one JSON line per record.

    Resumable: the (split, id) pairs already in ``out`` are skipped. ``out`` is the crash-safe
    results file of the batch runners: each line is written whole and fsynced, and a line torn
    by a crash is cut before the run appends. A record whose critique fails (endpoint down after
    retries, sandbox gone) is written with ``error`` set.
    """
    return await run_records(
        records,
        lambda record: result_line(critic, record, samples=samples),
        out,
        record_key=result_key,
        resume=True,
        concurrency=concurrency,
        on_record=on_result,
    )


async def result_line(
    critic: GenPRMCritic, record: ProcessBenchRecord, *, samples: int | None = None
) -> dict[str, Any]:
    """The result line of one sample: the critic's prediction (the first flagged step, or -1),
    its step rewards, tiers, usage and critiques; a failed critique is a line with ``error``."""
    try:
        report = await critic.critique(record.problem, record.steps, samples=samples)
    except CritloopError as exc:
        return failed_line(record, f"{type(exc).__name__}: {exc}")
    first = report.first_error
    return {
        "id": record.id,
        "split": record.split,
        "label": record.label,
        "prediction": -1 if first is None else first,
        "step_rewards": report.rewards,
        "tiers": [s.tier for s in report.step_reports],
        "error": None,
        "usage": report.usage.model_dump(),
        "critiques": [
            [
                {"text": c.text, "verdict": c.verdict, "reward": c.reward, "forced": c.forced, "tier": c.tier}
                for c in s.chains
            ]
            for s in report.step_reports
        ],
    }


def failed_line(record: ProcessBenchRecord, error: str) -> dict[str, Any]:
    """The result line of a sample that could not be critiqued (not counted in the metrics)."""
    return {
        "id": record.id,
        "split": record.split,
        "label": record.label,
        "prediction": None,
        "step_rewards": [],
        "error": error,
    }


@dataclass(frozen=True, kw_only=True)
class SplitMetrics:
    split: str
    erroneous: int
    correct: int
    error_accuracy: float
    """Share of erroneous samples whose earliest wrong step was found exactly (percent)."""
    correct_accuracy: float
    """Share of all-correct samples predicted all-correct (percent)."""
    f1: float
    """Harmonic mean of the two accuracies (percent)."""
    failed: int
    """Records that ended in an error (not counted in the accuracies)."""


def metrics(results: Iterable[dict[str, Any]]) -> list[SplitMetrics]:
    """Per-split ProcessBench metrics of result lines, in :data:`SPLITS` order (others after)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_split.setdefault(str(result.get("split")), []).append(result)
    order = [s for s in SPLITS if s in by_split] + sorted(s for s in by_split if s not in SPLITS)
    table = []
    for split in order:
        rows = [r for r in by_split[split] if r.get("error") is None and r.get("prediction") is not None]
        wrong = [r for r in rows if r["label"] != -1]
        right = [r for r in rows if r["label"] == -1]
        error_acc = 100.0 * sum(r["prediction"] == r["label"] for r in wrong) / len(wrong) if wrong else 0.0
        correct_acc = 100.0 * sum(r["prediction"] == -1 for r in right) / len(right) if right else 0.0
        f1 = 2 * error_acc * correct_acc / (error_acc + correct_acc) if error_acc + correct_acc else 0.0
        table.append(
            SplitMetrics(
                split=split,
                erroneous=len(wrong),
                correct=len(right),
                error_accuracy=error_acc,
                correct_accuracy=correct_acc,
                f1=f1,
                failed=len(by_split[split]) - len(rows),
            )
        )
    return table
