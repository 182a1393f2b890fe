"""What the benchmark scripts' reports share: the command line, latency summaries, tables, JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

_SCALE = {"ms": 1e3, "us": 1e6}


def arguments(doc: str | None, quick: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` (its help: ``quick``) and ``--json OUT``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", metavar="OUT", help="also write every number as JSON to OUT")
    return parser


def command_line() -> str:
    """The command that started this run, quoted as a shell takes it."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def wide_console(min_width: int) -> Console:
    """A console at least ``min_width`` columns wide (the tables are wide; a pipe has 80)."""
    return Console(width=max(Console().width, min_width))


def latency_type(type_name: str, unit: str, percentiles: Sequence[int], doc: str) -> type:
    """A dataclass that summarises latency samples in ``unit`` ("ms" or "us"), with the fields
    ``name``, ``n``, ``p<q>_<unit>`` for each percentile ``q``, ``mean_<unit>``, ``min_<unit>``,
    ``max_<unit>`` and ``note`` (its JSON, by :func:`dataclasses.asdict`, has those keys).
    ``of(name, seconds, note="")`` builds one from samples in seconds."""
    stats = [*(f"p{q}" for q in percentiles), "mean", "min", "max"]

    def of(cls: type, name: str, seconds: Sequence[float], note: str = "") -> Any:
        if not seconds:
            raise ValueError(f"no samples for {name}")
        values = np.asarray(seconds) * _SCALE[unit]
        found = {f"p{q}": np.percentile(values, q) for q in percentiles}
        found.update(mean=values.mean(), min=values.min(), max=values.max())
        return cls(name=name, n=len(values), note=note, **{f"{k}_{unit}": float(found[k]) for k in stats})

    fields = [("name", str), ("n", int), *((f"{k}_{unit}", float) for k in stats)]
    return dataclasses.make_dataclass(
        type_name,
        [*fields, ("note", str, dataclasses.field(default=""))],
        namespace={"__doc__": doc, "of": classmethod(of)},
    )


def table(title: str, columns: Iterable[str], right: Iterable[str] = (), **options: Any) -> Table:
    """A table with ``columns``, those named in ``right`` right-justified (numbers), the others left."""
    right = set(right)
    new = Table(title=title, **options)
    for column in columns:
        new.add_column(column, justify="right" if column in right else "left")
    return new


def _key_values(title: str, key: str, rows: Iterable[tuple[str, object]]) -> Table:
    new = Table(title=title, show_header=False)
    new.add_column(key, style="bold")
    new.add_column("value")
    for name, value in rows:
        new.add_row(name, str(value))
    return new


def machine_table(command: str, mode: str, machine: Mapping[str, object]) -> Table:
    """The run's command, mode and machine facts, the first table of every report."""
    return _key_values("Machine", "fact", [("command", command), ("mode", mode), *machine.items()])


def checks_table(checks: Mapping[str, object]) -> Table:
    """The report's checks, one row each (add more rows to the table returned)."""
    return _key_values("Checks", "check", checks.items())


def verdict(met: bool) -> str:
    return "[green]MET[/green]" if met else "[red]NOT MET[/red]"


def write_json(path: str, data: object, console: Console, **options: Any) -> None:
    """Writes the report's numbers to ``path`` (``options`` go to :func:`json.dump`)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, **options)
    console.print(f"wrote {path}")
