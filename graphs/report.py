"""Reports on batch results: a summary of a results file, a Markdown report with plots, comparisons.

A results file is the JSONL that :func:`critloop.graphs.batch.run_batch` writes (one record per
problem). Best-of-N results use the same keys where they apply; every key but ``stop_reason`` and
the correctness flags is optional here.

Example:
    >>> paths = write_report("runs/results.jsonl")  # doctest: +SKIP
    >>> paths.markdown  # doctest: +SKIP
    PosixPath('runs/results.report.md')
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from rich.table import Table

from critloop.errors import ConfigError
from critloop.graphs.batch import ResultsFile

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BatchSummary",
    "ReportPaths",
    "RewardStats",
    "compare",
    "read_records",
    "render_markdown",
    "summarize",
    "summary_table",
    "write_comparison",
    "write_report",
]

ROLES = ("policy", "critic", "refiner")


class RewardStats(BaseModel):
    """The distribution of some critic rewards."""

    model_config = ConfigDict(frozen=True)

    count: int
    """How many rewards (at least 1)."""
    mean: float
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> RewardStats | None:
        """The stats of ``values``; None when there are none."""
        if not values:
            return None
        return cls(
            count=len(values),
            mean=statistics.fmean(values),
            median=float(statistics.median(values)),
            min=min(values),
            max=max(values),
        )


class BatchSummary(BaseModel):
    """What a batch of results adds up to."""

    model_config = ConfigDict(frozen=True)

    n: int
    """All records, error records included."""
    errors: int
    """Records whose ``stop_reason`` is ``error``."""
    accuracy_initial: float
    """Share of all ``n`` records whose first solution is right. An error record counts as wrong
    (whatever its flags say)."""
    accuracy_final: float
    """Share of all ``n`` records whose final answer is right (the refine loop's final answer is
    the best solution seen, not merely the last one). An error record counts as wrong."""
    accuracy_by_round: list[float]
    """Entry ``r``: the accuracy over all ``n`` records when every problem takes its solution after
    round ``min(r, its last round)`` (a problem that stopped earlier carries its last solution
    forward), for ``r`` = 0 up to the most rounds any record ran. Entry 0 equals
    ``accuracy_initial``; the last entry grades the *last* solutions, so it may differ from
    ``accuracy_final``. Error records count as wrong in every round."""
    flips_wrong_to_right: int
    """Records wrong at first and right at the end."""
    flips_right_to_wrong: int
    """Records right at first and wrong at the end (refinement broke them)."""
    stop_reasons: dict[str, int]
    """How many records stopped for each reason, sorted by reason (``unknown`` when missing)."""
    rounds_mean: float | None
    """Mean refinement rounds over the non-error records that have ``rounds``; None when none."""
    rounds_histogram: dict[int, int]
    """Rounds -> how many of those records ran that many, sorted by rounds."""
    tokens_mean: float | None
    """Mean completion tokens (all roles summed) per non-error record that has ``usage``; None
    when none."""
    tokens_total: int
    """Completion tokens (all roles summed) over the non-error records that have ``usage``."""
    seconds_mean: float | None
    """Mean wall seconds per non-error record that has ``seconds``; None when none."""
    rewards_flagged: RewardStats | None
    """Rewards of the steps the critic flagged (from ``critiqued``); None when none."""
    rewards_passed: RewardStats | None
    """Rewards of the steps the critic passed (from ``critiqued``); None when none."""


class ReportPaths(BaseModel):
    """The files :func:`write_report` wrote."""

    model_config = ConfigDict(frozen=True)

    markdown: Path
    accuracy_plot: Path
    rewards_plot: Path


# --------------------------------------------------------------------------- summary


def _is_error(record: Mapping[str, Any]) -> bool:
    return record.get("stop_reason") == "error"


def _correct_series(record: Mapping[str, Any]) -> list[bool]:
    """Correctness after each round (index 0: the first solution); empty for an error record."""
    if _is_error(record):
        return []
    series = record.get("correct_by_round")
    if isinstance(series, list) and series:
        return [bool(c) for c in series]
    return [bool(record.get("correct_initial"))]


def _initial(record: Mapping[str, Any]) -> bool:
    return not _is_error(record) and bool(record.get("correct_initial"))


def _final(record: Mapping[str, Any]) -> bool:
    return not _is_error(record) and bool(record.get("correct_final"))


def _tokens(record: Mapping[str, Any]) -> int | None:
    """Completion tokens summed over the roles; None without ``usage``."""
    usage = record.get("usage")
    if not isinstance(usage, Mapping):
        return None
    total = 0
    for role in ROLES:
        entry = usage.get(role)
        if isinstance(entry, Mapping):
            total += int(entry.get("completion_tokens") or 0)
    return total


def _rewards(records: Iterable[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """(flagged, passed) rewards of every step the critic judged."""
    flagged: list[float] = []
    passed: list[float] = []
    for record in records:
        for pair in record.get("critiqued") or []:
            reward, is_flagged = pair
            (flagged if is_flagged else passed).append(float(reward))
    return flagged, passed


def summarize(records: Sequence[Mapping[str, Any]]) -> BatchSummary:
    """Sum up result records (see :class:`BatchSummary` for what each number means).

    Raises:
        ConfigError: there are no records.
    """
    n = len(records)
    if n == 0:
        raise ConfigError("no result records to summarize")
    ok = [r for r in records if not _is_error(r)]
    series = [_correct_series(r) for r in records]
    last_round = max((len(s) - 1 for s in series if s), default=0)
    by_round = [sum(s[min(r, len(s) - 1)] for s in series if s) / n for r in range(last_round + 1)]
    initial = [_initial(r) for r in records]
    final = [_final(r) for r in records]

    with_rounds = [len(r.get("rounds") or []) for r in ok if "rounds" in r]
    tokens = [t for t in (_tokens(r) for r in ok) if t is not None]
    seconds = [float(r["seconds"]) for r in ok if isinstance(r.get("seconds"), int | float)]
    flagged, passed = _rewards(records)
    reasons = Counter(str(r.get("stop_reason") or "unknown") for r in records)
    return BatchSummary(
        n=n,
        errors=n - len(ok),
        accuracy_initial=sum(initial) / n,
        accuracy_final=sum(final) / n,
        accuracy_by_round=by_round,
        flips_wrong_to_right=sum(not i and f for i, f in zip(initial, final, strict=True)),
        flips_right_to_wrong=sum(i and not f for i, f in zip(initial, final, strict=True)),
        stop_reasons=dict(sorted(reasons.items())),
        rounds_mean=statistics.fmean(with_rounds) if with_rounds else None,
        rounds_histogram=dict(sorted(Counter(with_rounds).items())),
        tokens_mean=statistics.fmean(tokens) if tokens else None,
        tokens_total=sum(tokens),
        seconds_mean=statistics.fmean(seconds) if seconds else None,
        rewards_flagged=RewardStats.of(flagged),
        rewards_passed=RewardStats.of(passed),
    )


def read_records(results_path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file.

    Raises:
        ConfigError: the file is missing or holds no complete record (naming the file).
    """
    path = Path(results_path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such results file")
    records = ResultsFile(path).records()
    if not records:
        raise ConfigError(f"{path}: the results file holds no records (nothing to report)")
    return records


# --------------------------------------------------------------------------- rendering


def _pct(value: float, n: int) -> str:
    return f"{100 * value:.1f}% ({round(value * n)}/{n})"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _stats_cells(stats: RewardStats | None) -> list[str]:
    if stats is None:
        return ["0", "—", "—", "—", "—"]
    return [str(stats.count), *(f"{v:.3f}" for v in (stats.mean, stats.median, stats.min, stats.max))]


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def render_markdown(summary: BatchSummary, *, title: str, plots: Mapping[str, Path] | None = None) -> str:
    """A Markdown report of ``summary``; ``plots`` (caption -> image) are linked by file name, so
    the images belong next to the report."""
    s = summary
    out = [f"# {title}", ""]
    out.append(f"Problems: {s.n}; errors: {s.errors} (an error counts as wrong in every accuracy).")
    out += ["", "## Accuracy", ""]
    rows = [["initial", _pct(s.accuracy_initial, s.n)]]
    rows += [[f"after round {r}", _pct(acc, s.n)] for r, acc in enumerate(s.accuracy_by_round) if r > 0]
    rows.append(["final (best solution seen)", _pct(s.accuracy_final, s.n)])
    out += _md_table(["solution", "accuracy"], rows)
    out += [
        "",
        "After round r, a problem that stopped earlier keeps its last solution.",
        "",
        f"- wrong → right: {s.flips_wrong_to_right}",
        f"- right → wrong: {s.flips_right_to_wrong}",
        "",
        "## Stop reasons",
        "",
    ]
    out += _md_table(["reason", "count"], ([reason, str(c)] for reason, c in s.stop_reasons.items()))
    out += ["", "## Rounds and tokens", ""]
    out += _md_table(
        ["measure", "value"],
        [
            ["mean rounds", _num(s.rounds_mean, 2)],
            ["mean completion tokens", _num(s.tokens_mean)],
            ["total completion tokens", f"{s.tokens_total:,}"],
            ["mean seconds", _num(s.seconds_mean, 2)],
        ],
    )
    if s.rounds_histogram:
        out += [""]
        out += _md_table(["rounds", "problems"], ([str(k), str(v)] for k, v in s.rounds_histogram.items()))
    out += ["", "Tokens and seconds count the non-error records.", "", "## Critic rewards", ""]
    out += _md_table(
        ["steps", "count", "mean", "median", "min", "max"],
        [
            ["flagged", *_stats_cells(s.rewards_flagged)],
            ["passed", *_stats_cells(s.rewards_passed)],
        ],
    )
    if plots:
        out += ["", "## Plots", ""]
        for caption, path in plots.items():
            out += [f"![{caption}]({Path(path).name})", ""]
    return "\n".join(out).rstrip() + "\n"


def summary_table(summary: BatchSummary, *, title: str | None = None) -> Table:
    """The summary as a two-column table for the terminal."""
    s = summary
    table = Table("measure", "value", title=title)
    table.add_row("problems", str(s.n))
    table.add_row("errors", str(s.errors))
    table.add_row("accuracy, initial", _pct(s.accuracy_initial, s.n))
    for r, acc in enumerate(s.accuracy_by_round):
        if r > 0:
            table.add_row(f"accuracy, after round {r}", _pct(acc, s.n))
    table.add_row("accuracy, final", _pct(s.accuracy_final, s.n))
    table.add_row("wrong → right", str(s.flips_wrong_to_right))
    table.add_row("right → wrong", str(s.flips_right_to_wrong))
    table.add_row("stop reasons", ", ".join(f"{k} {v}" for k, v in s.stop_reasons.items()))
    table.add_row("mean rounds", _num(s.rounds_mean, 2))
    table.add_row("mean completion tokens", _num(s.tokens_mean))
    table.add_row("total completion tokens", f"{s.tokens_total:,}")
    table.add_row("mean seconds", _num(s.seconds_mean, 2))
    for label, stats in (("flagged", s.rewards_flagged), ("passed", s.rewards_passed)):
        cells = _stats_cells(stats)
        table.add_row(
            f"rewards, {label} steps",
            f"n={cells[0]}" if stats is None else f"n={cells[0]} mean {cells[1]} median {cells[2]}",
        )
    return table


# --------------------------------------------------------------------------- plots


def _accuracy_figure(summary: BatchSummary, title: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    rounds = list(range(len(summary.accuracy_by_round)))
    ax.plot(rounds, summary.accuracy_by_round, marker="o", label="after round r (carried forward)")
    ax.axhline(summary.accuracy_final, color="tab:green", linestyle="--", label="final (best seen)")
    for r, acc in zip(rounds, summary.accuracy_by_round, strict=True):
        ax.annotate(f"{100 * acc:.1f}%", (r, acc), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xticks(rounds)
    ax.set_xlabel("refinement round (0 = first solution)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title}: accuracy by round (n={summary.n})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _rewards_figure(flagged: Sequence[float], passed: Sequence[float], title: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    values = [*flagged, *passed]
    if values:
        low, high = min(0.0, *values), max(1.0, *values)
        bins = [low + (high - low) * i / 20 for i in range(21)]
        ax.hist(
            [list(passed), list(flagged)],
            bins=bins,
            color=["tab:green", "tab:red"],
            label=[f"passed ({len(passed)})", f"flagged ({len(flagged)})"],
            alpha=0.7,
        )
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no step was critiqued", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("critic reward")
    ax.set_ylabel("steps")
    ax.set_title(f"{title}: rewards of critiqued steps")
    ax.grid(alpha=0.3)
    return fig


def write_report(results_path: str | Path, out_dir: str | Path | None = None) -> ReportPaths:
    """Write ``<stem>.report.md``, ``<stem>.accuracy.png`` and ``<stem>.rewards.png`` for a
    results file, in ``out_dir`` (default: the results file's folder). Prints nothing.

    Raises:
        ConfigError: the results file is missing or empty.
    """
    path = Path(results_path)
    records = read_records(path)
    summary = summarize(records)
    folder = Path(out_dir) if out_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    paths = ReportPaths(
        markdown=folder / f"{stem}.report.md",
        accuracy_plot=folder / f"{stem}.accuracy.png",
        rewards_plot=folder / f"{stem}.rewards.png",
    )
    _accuracy_figure(summary, stem).savefig(paths.accuracy_plot, format="png")
    flagged, passed = _rewards(records)
    _rewards_figure(flagged, passed, stem).savefig(paths.rewards_plot, format="png")
    markdown = render_markdown(
        summary,
        title=f"Report: {path.name}",
        plots={"accuracy by round": paths.accuracy_plot, "critic rewards": paths.rewards_plot},
    )
    paths.markdown.write_text(markdown, encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- comparison


def _names(paths: Sequence[Path]) -> list[str]:
    """File stems, or whole paths where two stems collide."""
    stems = [p.stem for p in paths]
    return [str(p) if stems.count(p.stem) > 1 else p.stem for p in paths]


def compare(results_paths: Sequence[str | Path]) -> tuple[str, Figure]:
    """A Markdown table with one row per results file, and a figure of final accuracy (filled)
    and initial accuracy (hollow) against mean completion tokens, one labelled point per file.

    A file with no non-error record (no mean tokens) is in the table but not in the figure.

    Raises:
        ConfigError: no files, or a file is missing or empty.
    """
    from matplotlib.figure import Figure

    paths = [Path(p) for p in results_paths]
    if not paths:
        raise ConfigError("compare needs at least one results file")
    summaries = [summarize(read_records(p)) for p in paths]
    names = _names(paths)
    rows = [
        [
            name,
            str(s.n),
            f"{100 * s.accuracy_initial:.1f}%",
            f"{100 * s.accuracy_final:.1f}%",
            f"+{s.flips_wrong_to_right} / -{s.flips_right_to_wrong}",
            _num(s.tokens_mean),
            str(s.errors),
        ]
        for name, s in zip(names, summaries, strict=True)
    ]
    header = ["results", "n", "accuracy initial", "accuracy final", "flips (+/-)", "mean tokens", "errors"]
    markdown = "\n".join(_md_table(header, rows)) + "\n"

    fig = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, (name, s) in enumerate(zip(names, summaries, strict=True)):
        if s.tokens_mean is None:
            continue
        color = f"C{i % 10}"
        x = s.tokens_mean
        ax.plot([x, x], [s.accuracy_initial, s.accuracy_final], color=color, alpha=0.4)
        ax.scatter([x], [s.accuracy_initial], facecolors="none", edgecolors=color, s=60)
        ax.scatter([x], [s.accuracy_final], color=color, s=60)
        ax.annotate(name, (x, s.accuracy_final), textcoords="offset points", xytext=(6, 4))
    ax.scatter([], [], color="gray", label="final")
    ax.scatter([], [], facecolors="none", edgecolors="gray", label="initial")
    ax.legend(loc="lower right")
    ax.margins(x=0.2)
    ax.set_xlabel("mean completion tokens per problem")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy against tokens spent")
    ax.grid(alpha=0.3)
    return markdown, fig


def write_comparison(results_paths: Sequence[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Write the comparison of ``results_paths`` as ``out`` with suffix ``.md`` (the table, linking
    the plot) and ``.png`` (the plot), side by side. Returns (markdown, png).

    Raises:
        ConfigError: as :func:`compare`.
    """
    target = Path(out)
    md_path, png_path = target.with_suffix(".md"), target.with_suffix(".png")
    markdown, fig = compare(results_paths)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")
    text = f"# Comparison\n\n{markdown}\n![accuracy against tokens spent]({png_path.name})\n"
    md_path.write_text(text, encoding="utf-8")
    return md_path, png_path
