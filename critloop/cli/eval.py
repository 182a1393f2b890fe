"""``critloop eval ...``: evaluations of the critic (ProcessBench)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from critloop.cli._common import (
    CascadeOption,
    ConfigOption,
    RayOption,
    RayWorkerCpusOption,
    RayWorkersOption,
    TauOption,
    cascade_overrides,
    check_cascade_flags,
    choices_help,
    console,
    err,
    one_of,
    ray_options,
)
from critloop.errors import ConfigError
from critloop.graphs.processbench import SPLITS, Split
from critloop.tools.completion import LogprobsMode

if TYPE_CHECKING:
    from critloop.graphs.processbench import ProcessBenchRecord

app = typer.Typer(help="Evaluations of the critic.", no_args_is_help=True)


@app.command("processbench")
def eval_processbench(
    split: Annotated[str, typer.Option(help=choices_help(Split, "all"))] = "all",
    data: Annotated[
        Path | None,
        typer.Option(
            help="A ProcessBench JSON/JSONL file (its split: the records' `split` field, else the file "
            "name), or a folder of <split>.json files."
        ),
    ] = None,
    config: ConfigOption = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="At most this many records per split, spread evenly through it."),
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", min=1, max=64, help="Critique chains per solution (Maj@N).")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Per-sample results (JSONL); ids already in it are skipped.")
    ] = Path("results/processbench.jsonl"),
    concurrency: Annotated[
        int, typer.Option(min=1, help="Solutions critiqued at once (per worker with --ray).")
    ] = 8,
    critic_logprobs: Annotated[
        str | None, typer.Option(help=f"What the critic server's logprobs are: {choices_help(LogprobsMode)}.")
    ] = None,
    cascade: CascadeOption = None,
    tau: TauOption = None,
    ray: RayOption = None,
    ray_workers: RayWorkersOption = None,
    ray_worker_cpus: RayWorkerCpusOption = 1.0,
) -> None:
    """Run the critic on ProcessBench and print error / correct accuracy and F1 per split."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from critloop.config import load_config
    from critloop.graphs.batch import run_method
    from critloop.graphs.processbench import PAPER_F1, metrics, read_results
    from critloop.methods import ProcessBenchMethod

    wanted_split = one_of("--split", split, Split, "all")
    logprobs = None if critic_logprobs is None else one_of("--critic-logprobs", critic_logprobs, LogprobsMode)
    on_ray = ray_options(ray, ray_workers, ray_worker_cpus)
    cfg = load_config(config, {"critic.logprobs": logprobs, **cascade_overrides(cascade, tau)})
    check_cascade_flags(cfg, tau)
    records = _processbench_records(data, wanted_split, limit)
    method = ProcessBenchMethod(config=cfg, samples=n)

    async def run() -> None:
        with Progress(
            TextColumn("processbench"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        ) as progress:
            task = progress.add_task("critique", total=len(records))
            done = {(r.get("split"), r.get("id")) for r in read_results(out)}
            progress.update(task, completed=sum((r.split, r.id) in done for r in records))
            await run_method(
                method,
                records,
                out,
                ray=on_ray,
                resume=True,
                concurrency=concurrency,
                on_record=lambda _line: progress.advance(task),
            )

    asyncio.run(run())
    wanted = {(r.split, r.id) for r in records}
    lines = [r for r in read_results(out) if (r.get("split"), r.get("id")) in wanted]
    table_rows = metrics(lines)
    table = Table("split", "erroneous", "correct", "error acc", "correct acc", "F1", "failed", *PAPER_F1)
    for m in table_rows:
        table.add_row(
            m.split,
            str(m.erroneous),
            str(m.correct),
            f"{m.error_accuracy:.1f}",
            f"{m.correct_accuracy:.1f}",
            f"{m.f1:.1f}",
            str(m.failed),
            # A file's own split (named by its stem) has no reference number.
            *(f"{ref[m.split]:.1f}" if m.split in ref else "-" for ref in PAPER_F1.values()),
        )
    average = sum(m.f1 for m in table_rows) / len(table_rows) if table_rows else 0.0
    table.add_row(
        "average",
        "",
        "",
        "",
        "",
        f"{average:.1f}",
        "",
        *(f"{ref['average']:.1f}" for ref in PAPER_F1.values()),
    )
    console.print(table)
    mine = [r for r in lines if r.get("usage")]
    calls = sum(r["usage"]["calls"] for r in mine)
    prompt = sum(r["usage"]["prompt_tokens"] for r in mine)
    completion = sum(r["usage"]["completion_tokens"] for r in mine)
    console.print(
        f"critic usage over {len(mine)} solutions: {calls:,} calls, {prompt:,} prompt tokens, "
        f"{completion:,} completion tokens"
    )
    tiers = [tier for r in mine for tier in r.get("tiers") or []]
    if cfg.critic.cascade:
        counts = ", ".join(f"{tier} {tiers.count(tier)}" for tier in ("direct", "analysis", "code"))
        console.print(f"steps decided by tier: {counts}")
    console.print(f"results: {out}")
    for m in table_rows:
        print(f"F1 {m.split}: {m.f1:.1f}")
    print(f"F1 average: {average:.1f}")


def _processbench_records(data: Path | None, split: str, limit: int | None) -> list[ProcessBenchRecord]:
    """The records to evaluate: ``split`` (or every split: ``all``), at most ``limit`` of each,
    spread evenly through it (the benchmark's files list the erroneous samples first).

    From ``--data`` (a file: its records, their split named by their ``split`` field or by the
    file's stem; a folder: its ``<split>.json[l]`` files), else from the hub dataset.

    Raises:
        ConfigError: there is no such data, or it is malformed.
    """
    from critloop.graphs.processbench import load_processbench

    if data is not None and not data.exists():
        raise ConfigError(f"--data {data}: no such file or folder")
    if data is not None and data.is_file():
        # --split names the records without a split field of their own; it keeps only its split.
        records = load_processbench(data, None if split == "all" else split)
        if split != "all":
            records = [r for r in records if r.split == split]
    else:
        records = []
        for name in SPLITS if split == "all" else (split,):
            records.extend(load_processbench(_split_file(data, name), name))
    by_split: dict[str, list[ProcessBenchRecord]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    chosen = [record for group in by_split.values() for record in _evenly(group, limit)]
    if not chosen:
        where = f"{data}" if data is not None else "the hub dataset"
        raise ConfigError(f"no ProcessBench records{'' if split == 'all' else f' of {split}'} in {where}")
    return chosen


def _evenly(records: list[ProcessBenchRecord], limit: int | None) -> list[ProcessBenchRecord]:
    """``limit`` records spread evenly through ``records``, in order (all of them when ``limit``
    is None or not smaller)."""
    if limit is None or len(records) <= limit:
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def _split_file(folder: Path | None, split: str) -> Path:
    """A split's file: ``<split>.json[l]`` in ``folder``, else the hub dataset's."""
    if folder is not None:
        found = next((c for c in (folder / f"{split}.json", folder / f"{split}.jsonl") if c.is_file()), None)
        if found is None:
            raise ConfigError(f"no {split}.json or {split}.jsonl in {folder}")
        return found
    try:  # the hub dataset, when a hub is reachable
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download("Qwen/ProcessBench", f"{split}.json", repo_type="dataset"))
    except Exception as exc:  # noqa: BLE001 - offline, or no such file: say what to do instead
        raise ConfigError(
            f"no --data given and the hub dataset Qwen/ProcessBench is not reachable for {split} "
            f"({type(exc).__name__}): pass --data FILE_OR_FOLDER"
        ) from None
