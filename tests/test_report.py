"""Batch reports: a summary of hand-made records with every number worked out by hand, the
Markdown report with its plots, comparisons, the terminal table, and empty files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from critloop.errors import ConfigError
from critloop.graphs.batch import error_record
from critloop.graphs.report import (
    RewardStats,
    compare,
    render_markdown,
    summarize,
    summary_table,
    write_comparison,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def usage(policy: int, critic: int, refiner: int) -> dict[str, Any]:
    return {
        role: {"calls": 1, "prompt_tokens": 10, "completion_tokens": tokens, "seconds": 0.5}
        for role, tokens in (("policy", policy), ("critic", critic), ("refiner", refiner))
    }


def record(
    pid: str,
    by_round: list[bool],
    final: bool,
    stop: str,
    tokens: tuple[int, int, int],
    seconds: float,
    critiqued: list[list[Any]] | None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": pid,
        "problem": f"problem {pid}",
        "gold": "1",
        "answer": "1" if final else "2",
        "initial_answer": "1" if by_round[0] else "2",
        "correct_initial": by_round[0],
        "correct_final": final,
        "correct_by_round": by_round,
        "stop_reason": stop,
        "rounds": [{"round": r, "index": 0, "flagged_step": 0} for r in range(1, len(by_round))],
        "error": None,
        "usage": usage(*tokens),
        "seconds": seconds,
        "final_steps": ["a"],
        "initial_steps": ["a"],
        "step_rewards": [],
    }
    if critiqued is not None:
        rec["critiqued"] = critiqued
    return rec


T, F = True, False

RECORDS: list[dict[str, Any]] = [
    # p1: wrong, fixed in round 1.
    record(
        "p1", [F, T], T, "all_steps_pass", (100, 40, 60), 2.0, [[0.75, F], [0.25, T], [1.0, F], [0.75, F]]
    ),
    # p2: right, still right after round 1, broken by round 2 (right -> wrong).
    record("p2", [T, T, F], F, "max_rounds", (150, 100, 50), 4.0, [[1.0, F], [0.5, T], [0.75, F]]),
    # p3: wrong, never fixed after 2 rounds.
    record(
        "p3", [F, F, F], F, "max_rounds", (120, 200, 80), 6.0, [[0.0, T], [0.25, T], [0.5, F], [0.125, T]]
    ),
    # p4: passes the first time.
    record("p4", [T], T, "all_steps_pass", (80, 20, 0), 1.0, [[1.0, F], [0.875, F]]),
    # p5: an error record (no usage, critiqued or seconds).
    error_record("p5", "ModelEndpointError: gone", problem="problem p5", gold="1"),
    # p6: right, the token budget ran out before any critique: no `critiqued`.
    record("p6", [T], T, "max_tokens", (200, 0, 0), 3.0, None),
]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_summary_numbers_are_worked_out_by_hand() -> None:
    s = summarize(RECORDS)
    assert s.n == 6 and s.errors == 1
    assert s.accuracy_initial == 3 / 6  # p2 p4 p6
    # round 0: p2 p4 p6; round 1: p1 p2 p4 p6; round 2: p1 p4 p6 (p4 p6 carried forward)
    assert s.accuracy_by_round == [3 / 6, 4 / 6, 3 / 6]
    assert s.accuracy_final == 3 / 6  # p1 p4 p6
    assert s.flips_wrong_to_right == 1 and s.flips_right_to_wrong == 1  # p1; p2
    assert s.stop_reasons == {"all_steps_pass": 2, "error": 1, "max_rounds": 2, "max_tokens": 1}
    assert list(s.stop_reasons) == sorted(s.stop_reasons)
    assert s.rounds_mean == (1 + 2 + 2 + 0 + 0) / 5  # the error record is left out
    assert s.rounds_histogram == {0: 2, 1: 1, 2: 2}
    assert s.tokens_total == 200 + 300 + 400 + 100 + 200
    assert s.tokens_mean == 1200 / 5
    assert s.seconds_mean == 16 / 5
    assert s.rewards_flagged == RewardStats(count=5, mean=1.125 / 5, median=0.25, min=0.0, max=0.5)
    assert s.rewards_passed == RewardStats(count=8, mean=6.625 / 8, median=0.8125, min=0.5, max=1.0)


def test_error_records_count_as_wrong_whatever_their_flags() -> None:
    failed = {**record("e", [T, T], T, "error", (10, 10, 10), 1.0, []), "error": "boom"}
    s = summarize([failed, record("ok", [T], T, "all_steps_pass", (1, 2, 3), 1.0, [])])
    assert s.errors == 1
    assert s.accuracy_initial == s.accuracy_final == 1 / 2
    assert s.accuracy_by_round == [1 / 2]
    assert s.flips_wrong_to_right == s.flips_right_to_wrong == 0
    assert s.tokens_total == 6 and s.rewards_flagged is None and s.rewards_passed is None


def test_best_of_n_style_records_without_optional_keys() -> None:
    bon = [
        {"id": "a", "answer": "1", "gold": "1", "correct_initial": F, "correct_final": T,
         "stop_reason": "all_steps_pass", "usage": usage(500, 100, 0), "error": None},
        {"id": "b", "answer": "2", "gold": "1", "correct_initial": F, "correct_final": F,
         "stop_reason": "all_steps_pass", "error": None},
    ]  # fmt: skip
    s = summarize(bon)
    assert s.accuracy_by_round == [0.0] and s.accuracy_final == 0.5
    assert s.flips_wrong_to_right == 1
    assert s.rounds_mean is None and s.rounds_histogram == {}
    assert s.tokens_mean == 600 and s.tokens_total == 600 and s.seconds_mean is None


def test_render_markdown_shows_the_numbers() -> None:
    md = render_markdown(summarize(RECORDS), title="Run A", plots={"accuracy": Path("/x/run.accuracy.png")})
    assert md.startswith("# Run A\n")
    for text in (
        "| initial | 50.0% (3/6) |",
        "| after round 1 | 66.7% (4/6) |",
        "| after round 2 | 50.0% (3/6) |",
        "| final (best solution seen) | 50.0% (3/6) |",
        "wrong → right: 1",
        "right → wrong: 1",
        "| max_rounds | 2 |",
        "| error | 1 |",
        "| mean rounds | 1.00 |",
        "| mean completion tokens | 240.0 |",
        "| total completion tokens | 1,200 |",
        "| mean seconds | 3.20 |",
        "| flagged | 5 | 0.225 | 0.250 | 0.000 | 0.500 |",
        "| passed | 8 | 0.828 |",
        "![accuracy](run.accuracy.png)",
    ):
        assert text in md, text


def test_write_report_writes_pngs_next_to_the_results_and_links_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = write_jsonl(tmp_path / "results.jsonl", RECORDS)
    paths = write_report(results)
    assert paths.markdown == tmp_path / "results.report.md"
    assert paths.accuracy_plot == tmp_path / "results.accuracy.png"
    assert paths.rewards_plot == tmp_path / "results.rewards.png"
    for png in (paths.accuracy_plot, paths.rewards_plot):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    md = paths.markdown.read_text()
    assert "(results.accuracy.png)" in md and "(results.rewards.png)" in md
    assert "| after round 1 | 66.7% (4/6) |" in md
    assert capsys.readouterr() == ("", "")

    elsewhere = write_report(results, tmp_path / "out")
    assert elsewhere.markdown.parent == tmp_path / "out" and elsewhere.rewards_plot.is_file()


def test_rewards_plot_without_any_critique(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "plain.jsonl", [RECORDS[5], RECORDS[4]])
    paths = write_report(results)
    assert paths.rewards_plot.read_bytes().startswith(PNG_MAGIC)
    assert "| flagged | 0 | — |" in paths.markdown.read_text()


def test_compare_two_files(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "refine.jsonl", RECORDS)
    b = write_jsonl(tmp_path / "baseline.jsonl", [RECORDS[3], RECORDS[0]])
    md, _fig = compare([a, b])
    assert "| refine | 6 | 50.0% | 50.0% | +1 / -1 | 240.0 | 1 |" in md
    assert "| baseline | 2 | 50.0% | 100.0% | +1 / -0 | 150.0 | 0 |" in md
    md_path, png_path = write_comparison([a, b], tmp_path / "cmp" / "compare.md")
    assert (md_path, png_path) == (tmp_path / "cmp" / "compare.md", tmp_path / "cmp" / "compare.png")
    data = png_path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    text = md_path.read_text()
    assert "refine" in text and "baseline" in text and "(compare.png)" in text


def test_compare_names_colliding_stems_by_path(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a" / "results.jsonl", RECORDS)
    b = write_jsonl(tmp_path / "b" / "results.jsonl", RECORDS)
    md, _ = compare([a, b])
    assert f"| {a} |" in md and f"| {b} |" in md


def test_empty_or_missing_results_are_config_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.jsonl.*no records"):
        write_report(empty)
    with pytest.raises(ConfigError, match=r"empty\.jsonl"):
        compare([write_jsonl(tmp_path / "ok.jsonl", RECORDS), empty])
    with pytest.raises(ConfigError, match=r"missing\.jsonl: no such"):
        write_report(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="no result records"):
        summarize([])
    assert not list(tmp_path.glob("*.png"))


def test_summary_table_for_the_terminal() -> None:
    console = Console(record=True, width=120)
    console.print(summary_table(summarize(RECORDS), title="results.jsonl"))
    text = console.export_text()
    assert "results.jsonl" in text
    assert "accuracy, after round 1" in text and "66.7% (4/6)" in text
    assert "all_steps_pass 2, error 1, max_rounds 2, max_tokens 1" in text
    assert "n=5 mean 0.225" in text
