"""``critloop synth``: GenPRM-style training data, stage by stage or all at once.

``paths`` samples step-forced solutions per problem; ``mc`` scores every step prefix with
Monte Carlo completions and labels the steps (Relative Progress Estimation); ``rationales`` has
the teacher critique every path with code; ``conversations`` keeps the paths whose labels the
teacher agrees with and writes them as chat conversations; ``run`` chains the four. Each model
stage writes one record per problem, appended as it finishes, and resumes with ``--resume``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.table import Table

from critloop.cli._common import (
    ConfigOption,
    RayOption,
    RayWorkerCpusOption,
    RayWorkersOption,
    console,
    err,
    ray_options,
)
from critloop.cli.batch import (
    BatchOptions,
    DataArgument,
    RecordProgress,
    ResumeOption,
    batch_method,
    load_batch_problems,
)
from critloop.errors import ConfigError

if TYPE_CHECKING:
    from critloop.config import CritloopConfig
    from critloop.graphs.batch import Problem
    from critloop.graphs.cluster import RayOptions
    from critloop.graphs.synth import Stage

app = typer.Typer(
    help="Make GenPRM-style training data: paths, Monte Carlo labels, teacher rationales, conversations.",
    no_args_is_help=True,
)

_DEFAULTS = BatchOptions(concurrency=32)
StageOut = Annotated[Path, typer.Option("--out", "-o", help="The stage's records (JSONL), one per problem.")]
StageConcurrency = Annotated[
    int, typer.Option("--concurrency", "-c", min=1, help="Model requests in flight (per worker with --ray).")
]
RecordsArgument = Annotated[Path, typer.Argument(help="The previous stage's records (JSONL).")]


@app.command("paths")
@batch_method
def paths(data: DataArgument, out: StageOut, options: BatchOptions = _DEFAULTS) -> None:
    """Sample step-forced solution paths per problem until n/2 are right and n/2 wrong.

    n is paths in the config's \\[synth] table (16); the other options are there too.
    """
    cfg, ray = _config(options.config), _ray(options)
    problems, bad = _problems(data, options)
    _run_stage("paths", cfg, problems, bad, out, options.concurrency, options.resume, ray)


def _next_stage(stage: Literal["mc", "rationales"], doc: str) -> Callable[..., None]:
    """The command of a stage that reads the previous stage's records."""

    def command(
        records: RecordsArgument,
        out: StageOut,
        config: ConfigOption = None,
        resume: ResumeOption = False,
        concurrency: StageConcurrency = 32,
        ray: RayOption = None,
        ray_workers: RayWorkersOption = None,
        ray_worker_cpus: RayWorkerCpusOption = 1.0,
    ) -> None:
        from critloop.graphs.synth import load_stage

        on_ray = ray_options(ray, ray_workers, ray_worker_cpus)
        items, carried = load_stage(records, stage)
        _run_stage(stage, _config(config), items, carried, out, concurrency, resume, on_ray)

    command.__doc__ = doc
    return command


app.command("mc")(
    _next_stage(
        "mc", "Score every step prefix of every path by Monte Carlo completions; label the steps (RPE)."
    )
)
app.command("rationales")(
    _next_stage(
        "rationales", "Have the teacher critique every labelled path with code, several samples each."
    )
)


@app.command("conversations")
def conversations(
    records: RecordsArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Training conversations (chat messages JSONL).")],
    config: ConfigOption = None,
) -> None:
    """Keep the paths whose labels the teacher agrees with; write them as training conversations.

    OUT is replaced; the summary goes to OUT's stem + ``.summary.json`` and to the terminal.
    """
    from critloop.graphs.synth import load_stage

    items, carried = load_stage(records, "conversations")
    _export(
        [*carried, *(item.record for item in items)], out, _config(config), out.with_suffix(".summary.json")
    )


@app.command("run")
@batch_method
def run(
    data: DataArgument,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Folder of the stages' files.")],
    options: BatchOptions = _DEFAULTS,
) -> None:
    """Every stage in turn: DIR/paths.jsonl, mc.jsonl, rationales.jsonl, train.jsonl, summary.json.

    With --resume each stage continues its file; without, files holding records are an error.
    """
    from critloop.graphs.synth import STAGES, load_stage

    cfg, ray = _config(options.config), _ray(options)
    problems, bad = _problems(data, options)
    if not options.resume:
        for name in (*(f"{stage}.jsonl" for stage in STAGES), "train.jsonl"):
            if (out_dir / name).exists() and (out_dir / name).stat().st_size:
                raise ConfigError(
                    f"{out_dir / name} already holds results: pass --resume, or choose another --out-dir"
                )
    _run_stage("paths", cfg, problems, bad, out_dir / "paths.jsonl", options.concurrency, options.resume, ray)
    items, carried = load_stage(out_dir / "paths.jsonl", "mc")
    _run_stage("mc", cfg, items, carried, out_dir / "mc.jsonl", options.concurrency, options.resume, ray)
    items, carried = load_stage(out_dir / "mc.jsonl", "rationales")
    _run_stage(
        "rationales",
        cfg,
        items,
        carried,
        out_dir / "rationales.jsonl",
        options.concurrency,
        options.resume,
        ray,
    )
    items, carried = load_stage(out_dir / "rationales.jsonl", "conversations")
    _export(
        [*carried, *(item.record for item in items)], out_dir / "train.jsonl", cfg, out_dir / "summary.json"
    )


def _config(path: Path | None) -> CritloopConfig:
    from critloop.config import load_config

    return load_config(path)


def _ray(options: BatchOptions) -> RayOptions | None:
    return ray_options(options.ray, options.ray_workers, options.ray_worker_cpus)


def _problems(data: Path, options: BatchOptions) -> tuple[list[Problem], list[dict[str, Any]]]:
    """The problems, and the bad ones as synth's error records."""
    from critloop.graphs.synth import failed_record

    problems, bad = load_batch_problems(data, options)
    return problems, [failed_record(record, record["error"]) for record in bad]


def _run_stage(
    stage: Stage,
    cfg: CritloopConfig,
    items: list[Any],
    carried: list[dict[str, Any]],
    out: Path,
    concurrency: int,
    resume: bool,
    ray: RayOptions | None,
) -> None:
    """Run one model stage over ``items`` into ``out`` (``carried``: failed problems, written
    as they are), here or on Ray, showing its progress."""
    from critloop.graphs.batch import ResultsFile, run_method
    from critloop.methods import SynthMethod

    method = SynthMethod(config=cfg, stage=stage, requests=concurrency)
    done_before = len({r.get("id") for r in ResultsFile(out).open_for_append(resume=resume)})
    if ray is not None:
        err.print(f"on Ray ({ray.address}): {concurrency} requests in flight per worker")

    async def go() -> None:
        with _StageProgress(stage, len(items) + len(carried), done_before) as progress:
            await run_method(
                method,
                items,
                out,
                ray=ray,
                concurrency=concurrency,
                resume=resume,
                bad=carried,
                on_record=progress.record,
            )

    asyncio.run(go())


def _export(records: list[dict[str, Any]], out: Path, cfg: CritloopConfig, summary_file: Path) -> None:
    from critloop.graphs.synth import export_conversations

    summary = export_conversations(
        records, out, profile=cfg.critic.profile, first_step_format=cfg.critic.first_step_format
    )
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    console.print(f"{summary['conversations']} conversations in {out}; summary in {summary_file}")


def print_summary(summary: dict[str, Any]) -> None:
    """The summary of a synth run as tables: what was made, and each stage's requests and tokens."""
    labels = summary["step_labels"]
    steps = labels["1"] + labels["0"]
    kept = summary["kept_fraction"]
    made = Table("problems", "failed", "paths", "correct paths", "step labels 1 / 0", "kept", "dropped")
    made.add_row(
        str(summary["problems"]),
        str(summary["failed"]),
        str(summary["paths"]),
        str(summary["correct_paths"]),
        f"{labels['1']} / {labels['0']}"
        + (f" ({labels['1'] / steps:.0%} / {labels['0'] / steps:.0%})" if steps else ""),
        f"{summary['kept']}" + (f" ({kept:.0%})" if kept is not None else ""),
        ", ".join(f"{reason} {n}" for reason, n in summary["dropped"].items()) or "-",
    )
    console.print(made)
    costs = Table(
        "stage", "requests", "prompt tokens", "completion tokens", "per problem (requests / tokens)"
    )
    ran = max(1, summary["problems"] - summary["failed"])
    for stage, usage in summary["stages"].items():
        tokens = usage["prompt_tokens"] + usage["completion_tokens"]
        costs.add_row(
            stage,
            f"{usage['calls']:,}",
            f"{usage['prompt_tokens']:,}",
            f"{usage['completion_tokens']:,}",
            f"{usage['calls'] / ran:,.1f} / {tokens / ran:,.0f}",
        )
    console.print(costs)


class _StageProgress(RecordProgress):
    """The live progress of a stage: problems done, paths, requests, tokens, failures."""

    def __init__(self, stage: str, total: int, done_before: int) -> None:
        super().__init__(stage, total, done_before)
        self.stage = stage
        self.paths = self.requests = self.tokens = self.failed = 0

    def record(self, record: dict[str, Any]) -> None:
        self.failed += bool(record.get("error"))
        self.paths += len(record.get("paths") or ())
        usage = (record.get("usage") or {}).get(self.stage) or {}
        self.requests += int(usage.get("calls", 0))
        self.tokens += int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
        self.advance(
            f"{self.paths:,} paths  {self.requests:,} requests  {self.tokens:,} tokens  {self.failed} failed"
        )
