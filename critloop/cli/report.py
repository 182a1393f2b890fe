"""``critloop report``: the report of a results file, or a comparison of several."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from critloop.cli._common import console


def report(
    results: Annotated[list[Path], typer.Argument(help="Results files (JSONL) of batch or bon runs.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="One file: the folder; several: the comparison's path stem."),
    ] = None,
) -> None:
    """Re-render the report of a results file, or compare several side by side.

    One file: its Markdown report and PNG plots, next to it (or in --out). Several: a table and
    a plot of accuracy against tokens spent.
    """
    from critloop.graphs.report import write_comparison

    if len(results) == 1:
        print_report(results[0], results[0].name, out)
        return
    markdown, plot = write_comparison(results, out or results[0].with_name("comparison"))
    console.print(markdown.read_text())
    console.print(f"comparison: {markdown}  plot: {plot}")


def print_report(results: Path, title: str, folder: Path | None = None) -> None:
    """Print the summary of a results file and write its report (next to it, or in ``folder``).

    Raises:
        ConfigError: the file is missing or holds no records.
    """
    from critloop.graphs.report import read_records, summarize, summary_table, write_report

    summary = summarize(read_records(results))
    paths = write_report(results, folder)
    console.print(summary_table(summary, title=title))
    console.print(f"report: {paths.markdown}  plots: {paths.accuracy_plot}, {paths.rewards_plot}")
