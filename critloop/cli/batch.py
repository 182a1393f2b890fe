"""``critloop batch`` and ``critloop bon``: a method over a dataset, one graded record per
problem in a resumable results file, then its report.

The options every batch method takes (which problems, which config, resume, concurrency) are
declared once, as the fields of :class:`BatchOptions`; :func:`batch_method` gives them to a
command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self, get_type_hints

import typer
from rich.text import Text

from critloop.cli._common import (
    ConfigOption,
    RayOption,
    RayWorkerCpusOption,
    RayWorkersOption,
    check_cascade_flags,
    choices_help,
    console,
    err,
    one_of,
    ray_options,
)
from critloop.cli.report import print_report
from critloop.errors import ConfigError
from critloop.graphs.bon import Aggregation

if TYPE_CHECKING:
    from critloop.config import CritloopConfig
    from critloop.graphs.batch import BatchMethod, Problem

DataArgument = Annotated[Path, typer.Argument(help="Problems: a JSONL, JSON or CSV file.")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Results file (JSONL), one record per problem.")]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Skip the problems already in --out; continue interrupted ones.")
]
ConcurrencyOption = Annotated[
    int, typer.Option("--concurrency", "-c", min=1, help="Problems in flight at once.")
]
LimitOption = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the first N problems.")]
ShuffleOption = Annotated[bool, typer.Option("--shuffle", help="Shuffle the problems first (with --seed).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of --shuffle.")]
FieldOption = Annotated[str | None, typer.Option(help="Record field (default: detected).")]
SamplesOption = Annotated[
    int | None, typer.Option("--samples", min=1, help="Critique chains per solution (Maj@N).")
]
MaxRoundsOption = Annotated[
    int | None, typer.Option("--max-rounds", min=0, help="Refinement rounds at most.")
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """The options every batch method takes; each field is an option of its command."""

    config: ConfigOption = None
    resume: ResumeOption = False
    concurrency: ConcurrencyOption = 8
    limit: LimitOption = None
    shuffle: ShuffleOption = False
    seed: SeedOption = 0
    problem_field: FieldOption = None
    answer_field: FieldOption = None
    id_field: FieldOption = None
    ray: RayOption = None
    ray_workers: RayWorkersOption = None
    ray_worker_cpus: RayWorkerCpusOption = 1.0


def batch_method(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the fields of :class:`BatchOptions` as options, where its ``options``
    parameter stands (so they show there in ``--help``), their defaults taken from that
    parameter's default; the command is called with them gathered in ``options``."""
    shared = dataclasses.fields(BatchOptions)
    hints = get_type_hints(BatchOptions, include_extras=True)  # keeps the typer.Option metadata
    own = inspect.signature(command, eval_str=True).parameters
    defaults = own["options"].default
    parameters = []
    for parameter in own.values():
        if parameter.name != "options":
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        parameters.extend(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=getattr(defaults, field.name),
                annotation=hints[field.name],
            )
            for field in shared
        )

    @functools.wraps(command)
    def command_with_options(**values: Any) -> None:
        options = BatchOptions(**{field.name: values.pop(field.name) for field in shared})
        command(**values, options=options)

    command_with_options.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return command_with_options


_BATCH_DEFAULTS = BatchOptions()
_BON_DEFAULTS = BatchOptions(concurrency=4)  # each problem has n samples in flight

MethodFor = Callable[["CritloopConfig", bool], "BatchMethod"]
"""A batch method's recipe for a config, and whether the run is on Ray."""


@batch_method
def batch(
    data: DataArgument,
    out: OutOption,
    options: BatchOptions = _BATCH_DEFAULTS,
    samples: SamplesOption = None,
    max_rounds: MaxRoundsOption = None,
    details: Annotated[
        int,
        typer.Option(
            "--details",
            min=0,
            help="Keep each judged step's critique and code runs in the records (for critloop view), "
            "each text cut to this many characters; 0 leaves them out.",
        ),
    ] = 500,
) -> None:
    """Run the refine loop over a dataset: one graded record per problem, resumable, with a report.

    Each record is appended (and fsynced) as its problem finishes; interrupted problems resume
    from their checkpoints (``OUT.checkpoints.sqlite``) with ``--resume``. At the end the summary
    is printed and ``OUT``'s report (Markdown and PNG plots) is written next to it.
    """
    from critloop.methods import RefineMethod

    def refine(cfg: CritloopConfig, on_ray: bool) -> BatchMethod:
        # Ray's nodes share no checkpoint file: there, an interrupted problem starts over.
        checkpoints = None if on_ray else out.with_suffix(".checkpoints.sqlite")
        return RefineMethod(config=cfg, checkpoints=checkpoints, details=details)

    overrides = {"critic.samples": samples, "budget.max_rounds": max_rounds}
    _run_method(refine, data, out, options, overrides)
    print_report(out, f"refine loop: {data.name}")


@batch_method
def bon(
    data: DataArgument,
    out: OutOption,
    n: Annotated[int, typer.Option("--n", min=1, help="Policy samples per problem.")] = 8,
    aggregation: Annotated[
        str, typer.Option(help=f"Solution score from step rewards: {choices_help(Aggregation)}")
    ] = "min",
    options: BatchOptions = _BON_DEFAULTS,
    samples: SamplesOption = None,
) -> None:
    """Best-of-N, the baseline: N solutions per problem, the critic's pick, and majority vote.

    Every step of every sample is scored by the critic; the sample with the best aggregation of
    its step rewards is graded, next to the first sample alone and the answers' majority vote.
    """
    from critloop.graphs.batch import ResultsFile
    from critloop.methods import BestOfNMethod

    scoring: Aggregation = one_of("--aggregation", aggregation, Aggregation)

    def best_of_n(cfg: CritloopConfig, on_ray: bool) -> BatchMethod:
        return BestOfNMethod(config=cfg, n=n, aggregation=scoring)

    _run_method(best_of_n, data, out, options, {"critic.samples": samples})
    print_report(out, f"best-of-{n} ({aggregation}): {data.name}")
    records = ResultsFile(out).records()
    if records:
        majority = sum(bool(r.get("correct_majority")) for r in records) / len(records)
        console.print(f"answer majority vote over the {n} samples: {majority:.1%}")


def load_batch_problems(data: Path, options: BatchOptions) -> tuple[list[Problem], list[dict[str, Any]]]:
    """The problems of ``data`` as ``options`` pick them, and error records of the bad ones
    (each named on stderr).

    Raises:
        ConfigError: ``data`` cannot be read, or holds no problem at all.
    """
    from critloop.graphs.batch import FieldMap, load_problems

    problems, bad = load_problems(
        data,
        fields=FieldMap(problem=options.problem_field, answer=options.answer_field, id=options.id_field),
        limit=options.limit,
        shuffle=options.shuffle,
        seed=options.seed,
    )
    for record in bad:
        err.print(Text.assemble(("skipped: ", "yellow"), record["error"]), soft_wrap=True)
    if not problems and not bad:
        raise ConfigError(f"{data} holds no problems")
    return problems, bad


def _run_method(
    method_for: MethodFor, data: Path, out: Path, options: BatchOptions, overrides: dict[str, Any]
) -> None:
    """Run a batch method over the problems of ``data`` into ``out``, here or on Ray (``--ray``),
    with the config and ``overrides``, showing its progress."""
    from critloop.config import load_config
    from critloop.graphs.batch import ResultsFile, run_method

    ray = ray_options(options.ray, options.ray_workers, options.ray_worker_cpus)
    problems, bad = load_batch_problems(data, options)
    cfg = load_config(options.config, overrides)
    check_cascade_flags(cfg, overrides.get("critic.tau"))
    method = method_for(cfg, ray is not None)
    done_before = len({r.get("id") for r in ResultsFile(out).open_for_append(resume=options.resume)})
    if ray is not None:
        err.print(f"on Ray ({ray.address}): {options.concurrency} problems in flight per worker")

    async def run() -> None:
        with _BatchProgress(len(problems) + len(bad), done_before) as progress:
            await run_method(
                method,
                problems,
                out,
                ray=ray,
                concurrency=options.concurrency,
                resume=options.resume,
                bad=bad,
                on_record=progress.record,
            )

    asyncio.run(run())


class RecordProgress:
    """A live bar of the records a run writes, with a line of figures after it; a subclass's
    ``record`` counts what each record holds and calls :meth:`advance` with its figures."""

    def __init__(self, label: str, total: int, done_before: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"),
            console=err,
        )
        self.task = self.progress.add_task(label, total=total, completed=done_before, stats="")

    def __enter__(self) -> Self:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def advance(self, stats: str) -> None:
        """One more record written; ``stats`` replaces the figures shown."""
        self.progress.update(self.task, advance=1, stats=stats)


class _BatchProgress(RecordProgress):
    """The live progress of a batch: problems done, running accuracy, rate, tokens, errors."""

    def __init__(self, total: int, done_before: int) -> None:
        super().__init__("problems", total, done_before)
        self.count = self.initial = self.final = self.errors = self.tokens = 0
        self.started = time.perf_counter()

    def record(self, record: dict[str, Any]) -> None:
        self.count += 1
        self.initial += bool(record.get("correct_initial"))
        self.final += bool(record.get("correct_final"))
        self.errors += record.get("stop_reason") == "error"
        usage = record.get("usage") or {}
        self.tokens += sum(int((usage.get(role) or {}).get("completion_tokens", 0)) for role in usage)
        minutes = max(1e-9, (time.perf_counter() - self.started) / 60)
        self.advance(
            f"accuracy {self.initial / self.count:.1%} -> {self.final / self.count:.1%}  "
            f"{self.count / minutes:.1f}/min  {self.tokens:,} tokens  {self.errors} errors"
        )
