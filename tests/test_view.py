"""``critloop view``: the page of hand-made records (self-contained, model text escaped, its data
block, the round's diff, critiques matched to steps), the command, and the page in a real headless
Chromium driven over the DevTools protocol (filters, search, a problem's steps and diff, a
screenshot, and a 1,000-problem page)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import Chromium, chromium_binary
from typer.testing import CliRunner

from critloop.cli import app
from critloop.errors import ConfigError
from critloop.graphs.batch import error_record
from critloop.graphs.view import make_server, read_results, render_view, word_diff, write_view

EVIL = "</script><script>alert(1)</script>"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "view.png"

runner = CliRunner()


# --------------------------------------------------------------------------- records


def usage(policy: int, critic: int, refiner: int) -> dict[str, Any]:
    return {
        role: {
            "calls": calls,
            "prompt_tokens": 40 * tokens,
            "completion_tokens": tokens,
            "seconds": tokens / 50,
        }
        for role, calls, tokens in (("policy", 1, policy), ("critic", 6, critic), ("refiner", 1, refiner))
    }


def critique(
    round_: int,
    index: int,
    step: str,
    reward: float,
    text: str,
    code: str | None = None,
    output: str = "",
) -> dict[str, Any]:
    runs = [] if code is None else [{"code": code, "output": output, "status": "ok"}]
    return {
        "round": round_,
        "index": index,
        "step": step,
        "reward": reward,
        "flagged": reward < 0.5,
        "verdict": "no" if reward < 0.5 else "yes",
        "tier": "code" if runs else "analysis",
        "critique": text,
        "code_runs": runs,
    }


APPLES = [
    "Tom starts with 3 boxes of 4 apples, so he has 3 * 4 = 12 apples.",
    "He gives away 5 apples, so he has 12 - 5 = 8 apples left.",
    "The answer is $\\boxed{8}$.",
]
APPLES_FIXED = [
    APPLES[0],
    "He gives away 5 apples, so he has 12 - 5 = 7 apples left.",
    "The answer is $\\boxed{7}$.",
]

WRONG_TO_RIGHT: dict[str, Any] = {
    "id": "apples",
    "problem": "Tom has 3 boxes of 4 apples. He gives away 5 apples. How many apples does he have left?",
    "gold": "7",
    "answer": "7",
    "initial_answer": "8",
    "correct_initial": False,
    "correct_final": True,
    "correct_by_round": [False, True],
    "stop_reason": "all_steps_pass",
    "error": None,
    "error_source": None,
    "rounds": [
        {
            "round": 1,
            "index": 1,
            "flagged_step": APPLES[1],
            "reward": 0.08,
            "critique": "12 - 5 is 7, not 8: the subtraction is wrong.",
            "rewrite": APPLES_FIXED[1],
            "steps": APPLES_FIXED,
        }
    ],
    "initial_steps": APPLES,
    "final_steps": APPLES_FIXED,
    "step_rewards": [0.97, 0.93, 0.99],
    "usage": usage(60, 900, 30),
    "seconds": 4.2,
    "critiqued": [[0.97, False], [0.08, True], [0.93, False], [0.99, False]],
    "critiques": [
        critique(0, 0, APPLES[0], 0.97, "3 boxes of 4 apples make 12.", "print(3 * 4)", "12"),
        critique(
            0, 1, APPLES[1], 0.08, "12 - 5 is 7, not 8: the subtraction is wrong.", "print(12 - 5)", "7"
        ),
        critique(1, 1, APPLES_FIXED[1], 0.93, "12 - 5 = 7 is right.", "print(12 - 5)", "7"),
        critique(1, 2, APPLES_FIXED[2], 0.99, "The boxed answer follows."),
    ],
}

TRAIN = [
    "The train covers 60 km in 1.5 hours.",
    "Its speed is 60 / 1.5 = 40 km/h.",
    "The answer is $\\boxed{40}$.",
]
TRAIN_BROKEN = [TRAIN[0], "Its speed is 60 * 1.5 = 90 km/h.", "The answer is $\\boxed{90}$."]

RIGHT_TO_WRONG: dict[str, Any] = {
    "id": "train",
    "problem": "A train covers 60 km in 1.5 hours. What is its average speed in km/h?",
    "gold": "40",
    "answer": "90",
    "initial_answer": "40",
    "correct_initial": True,
    "correct_final": False,
    "correct_by_round": [True, False],
    "stop_reason": "max_rounds",
    "error": None,
    "rounds": [
        {
            "round": 1,
            "index": 1,
            "flagged_step": TRAIN[1],
            "reward": 0.31,
            "critique": "Speed should be distance times time.",
            "rewrite": TRAIN_BROKEN[1],
            "steps": TRAIN_BROKEN,
        }
    ],
    "initial_steps": TRAIN,
    "final_steps": TRAIN_BROKEN,
    "step_rewards": [0.95, 0.62, 0.7],
    "usage": usage(50, 700, 25),
    "seconds": 3.1,
    "critiqued": [[0.95, False], [0.31, True], [0.62, False], [0.7, False]],
}

FAILED = error_record(
    "broken", "ModelError: critic endpoint http 503", problem="What is 17 * 23?", gold="391"
)

HOSTILE: dict[str, Any] = {
    "id": "hostile",
    "problem": f"What is 1 + 1? {EVIL} <b>bold</b> <!--<script>",
    "gold": "2",
    "answer": "2",
    "initial_answer": "2",
    "correct_initial": True,
    "correct_final": True,
    "correct_by_round": [True],
    "stop_reason": "all_steps_pass",
    "error": None,
    "rounds": [],
    "initial_steps": [f"1 + 1 = 2 {EVIL}", "The answer is $\\boxed{2}$ <img src=x onerror=alert(2)>."],
    "final_steps": [f"1 + 1 = 2 {EVIL}", "The answer is $\\boxed{2}$ <img src=x onerror=alert(2)>."],
    "step_rewards": [0.9, 0.95],
    "usage": usage(20, 300, 0),
    "seconds": 1.0,
    "critiqued": [[0.9, False], [0.95, False]],
    "critiques": [
        critique(0, 0, f"1 + 1 = 2 {EVIL}", 0.9, f"Fine. {EVIL}", f"print(2) # {EVIL}", EVIL),
    ],
}

PASSED: dict[str, Any] = {
    "id": "squares",
    "problem": "What is the sum of the first 4 squares?",
    "gold": "30",
    "answer": "30",
    "initial_answer": "30",
    "correct_initial": True,
    "correct_final": True,
    "correct_by_round": [True],
    "stop_reason": "all_steps_pass",
    "error": None,
    "rounds": [],
    "initial_steps": ["1 + 4 + 9 + 16 = 30.", "The answer is $\\boxed{30}$."],
    "final_steps": ["1 + 4 + 9 + 16 = 30.", "The answer is $\\boxed{30}$."],
    "step_rewards": [0.88, 0.97],
    "usage": usage(30, 400, 0),
    "seconds": 1.7,
    "critiqued": [[0.88, False], [0.97, False]],
}

STUCK: dict[str, Any] = {
    "id": "coins",
    "problem": "Ann has 7 coins of 5 cents and 3 of 10 cents. How many cents does she have?",
    "gold": "65",
    "answer": "60",
    "initial_answer": "60",
    "correct_initial": False,
    "correct_final": False,
    "correct_by_round": [False, False],
    "stop_reason": "no_progress",
    "error": None,
    "rounds": [
        {
            "round": 1,
            "index": 0,
            "flagged_step": "7 coins of 5 cents make 30 cents.",
            "reward": 0.2,
            "critique": "7 * 5 is 35.",
            "rewrite": "7 coins of 5 cents make 30 cents in total.",
            "steps": ["7 coins of 5 cents make 30 cents in total.", "Total: 30 + 30 = 60. $\\boxed{60}$"],
        }
    ],
    "initial_steps": ["7 coins of 5 cents make 30 cents.", "Total: 30 + 30 = 60. $\\boxed{60}$"],
    "final_steps": ["7 coins of 5 cents make 30 cents.", "Total: 30 + 30 = 60. $\\boxed{60}$"],
    "step_rewards": [0.2],
    "usage": usage(40, 500, 20),
    "seconds": 2.5,
    "critiqued": [[0.2, True], [0.25, True]],
}

RECORDS = [WRONG_TO_RIGHT, RIGHT_TO_WRONG, FAILED, HOSTILE, PASSED, STUCK]
IDS = [r["id"] for r in RECORDS]

SOLVE_RESULT: dict[str, Any] = {
    "problem": "What is 2 + 3 * 4?",
    "answer": "14",
    "final_steps": ["3 * 4 = 12.", "2 + 12 = 14. $\\boxed{14}$"],
    "initial_steps": ["3 * 4 = 12.", "2 + 12 = 14. $\\boxed{14}$"],
    "step_rewards": [0.9, 0.95],
    "rounds": [],
    "stop_reason": "all_steps_pass",
    "error": None,
    "error_source": None,
    "last_report": {"steps": ["3 * 4 = 12."], "step_reports": []},
    "usage": usage(20, 200, 0),
    "seconds": 1.2,
}

BEST_OF_N: dict[str, Any] = {
    "id": "bon1",
    "method": "best_of_n",
    "problem": "What is 6 * 7?",
    "gold": "42",
    "answer": "42",
    "initial_answer": "41",
    "majority_answer": "42",
    "correct_initial": False,
    "correct_final": True,
    "correct_majority": True,
    "correct_by_round": [False, True],
    "stop_reason": "all_steps_pass",
    "rounds": [],
    "error": None,
    "aggregation": "min",
    "picked": 1,
    "samples": [
        {"answer": "41", "score": 0.2, "step_rewards": [0.2], "steps": ["6 * 7 = 41."]},
        {"answer": "42", "score": 0.9, "step_rewards": [0.9], "steps": ["6 * 7 = 42."]},
        {"answer": None, "score": None, "step_rewards": [], "steps": []},
    ],
    "final_steps": ["6 * 7 = 42."],
    "initial_steps": ["6 * 7 = 41."],
    "step_rewards": [0.9],
    "critiqued": [[0.2, True], [0.9, False]],
    "usage": usage(30, 100, 0),
    "seconds": 0.8,
}


def synthetic_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` batch records of realistic size: 4 to 8 steps of 150 to 450 characters, up to 3
    rounds, every judged step in ``critiques`` with a critique of up to 280 characters (the
    preview's length) and, mostly, a code run; about 3% errors."""
    rng = random.Random(seed)
    words = [
        "the",
        "total",
        "so",
        "each",
        "then",
        "we",
        "find",
        "that",
        "number",
        "of",
        "apples",
        "is",
        "equal",
        "to",
        "twice",
        "plus",
        "minus",
        "times",
        "divided",
        "by",
        "cost",
        "price",
        "dollars",
        "per",
        "hour",
        "hours",
        "minutes",
        "left",
        "remaining",
        "after",
        "first",
        "second",
        "third",
        "half",
        "sum",
        "difference",
        "product",
        "ratio",
        "percent",
        "Tom",
        "Ann",
        "buys",
        "sells",
        "gives",
        "=",
        "+",
        "-",
        "*",
        "/",
    ]

    def text(low: int, high: int) -> str:
        size = rng.randint(low, high)
        out = []
        while sum(len(w) + 1 for w in out) < size:
            out.append(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(1, 999)))
        return " ".join(out)

    records = []
    for i in range(n):
        pid = f"gsm8k-{i:04d}"
        if rng.random() < 0.03:
            records.append(error_record(pid, "ModelError: timed out", problem=text(100, 300), gold="1"))
            continue
        steps = [text(150, 450) for _ in range(rng.randint(4, 8))]
        solutions, rounds, critiques, critiqued = [steps], [], [], []

        def judge(
            round_: int,
            solution: list[str],
            start: int,
            critiques: list[dict[str, Any]] = critiques,
            critiqued: list[list[Any]] = critiqued,
        ) -> int | None:
            for index in range(start, len(solution)):
                reward = rng.random() ** 0.4 if rng.random() < 0.85 else rng.random() * 0.4
                runs = (
                    []
                    if rng.random() < 0.3
                    else [{"code": text(80, 300), "output": text(5, 40), "status": "ok"}]
                )
                critiques.append(
                    {
                        "round": round_,
                        "index": index,
                        "step": solution[index],
                        "reward": reward,
                        "flagged": reward < 0.5,
                        "verdict": "no" if reward < 0.5 else "yes",
                        "tier": "code" if runs else "analysis",
                        "critique": text(100, 280),
                        "code_runs": runs,
                    }
                )
                critiqued.append([reward, reward < 0.5])
                if reward < 0.5:
                    return index
            return None

        flagged = judge(0, steps, 0)
        for k in range(1, 4):
            if flagged is None:
                break
            before = solutions[-1]
            tokens = before[flagged].split(" ")  # a rewrite changes some words of the step
            rewrite = " ".join(t if rng.random() < 0.8 else str(rng.randint(1, 999)) for t in tokens)
            after = [*before[:flagged], rewrite, *(text(150, 450) for _ in range(rng.randint(0, 3)))]
            reward = critiques[-1]["reward"]
            rounds.append(
                {
                    "round": k,
                    "index": flagged,
                    "flagged_step": before[flagged],
                    "reward": reward,
                    "critique": critiques[-1]["critique"],
                    "rewrite": rewrite,
                    "steps": after,
                }
            )
            solutions.append(after)
            flagged = judge(k, after, flagged)
        by_round = [rng.random() < 0.6 for _ in solutions]
        final = solutions[-1]
        records.append(
            {
                "id": pid,
                "problem": text(100, 400),
                "gold": str(rng.randint(1, 999)),
                "answer": "1",
                "initial_answer": "2",
                "correct_initial": by_round[0],
                "correct_final": by_round[-1],
                "correct_by_round": by_round,
                "stop_reason": "all_steps_pass" if flagged is None else "max_rounds",
                "error": None,
                "error_source": None,
                "rounds": rounds,
                "initial_steps": steps,
                "final_steps": final,
                "step_rewards": [c["reward"] for c in critiques if c["round"] == len(rounds)],
                "usage": usage(rng.randint(100, 400), rng.randint(500, 3000), 50 * len(rounds)),
                "seconds": rng.uniform(2, 30),
                "critiqued": critiqued,
                "critiques": critiques,
            }
        )
    return records


def data_of(page: str) -> dict[str, Any]:
    """The page's JSON data block, parsed back."""
    found = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert found is not None
    return json.loads(found.group(1).replace("<\\/", "</"))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the page


@pytest.fixture(scope="module")
def page() -> str:
    return render_view(RECORDS, title="results.jsonl")


def test_the_page_loads_nothing_from_the_network(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page.lower()
    assert not re.search(r"<script[^>]*\bsrc=", page, re.I)
    # Attributes of the page's own tags (the data block holds no "<" at all).
    sources = re.findall(r"""<[a-z][^<>]*?\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert len(sources) == 2  # the two plots
    assert all(s.startswith("data:image/png;base64,") for s in sources), [s[:40] for s in sources]
    assert "default-src 'none'" in page  # and the CSP forbids anything else


def test_model_text_never_appears_unescaped(page: str) -> None:
    assert "alert(1)" in page  # it is there, as data
    assert EVIL not in page
    assert "<script>alert" not in page and "<b>" not in page and "<img src=x" not in page
    assert "<!--" not in page
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", page)
    # The only script elements are the page's own: its data block and its code.
    assert page.count("</script>") == 2 and page.lower().count("<script") == 2


def test_the_data_block_parses_back_with_the_texts_intact(page: str) -> None:
    data = data_of(page)
    assert data["graded"] is True
    records = {r["id"]: r for r in data["records"]}
    assert list(records) == IDS
    hostile = records["hostile"]
    assert hostile["problem"] == HOSTILE["problem"]
    assert [data["strings"][s[0]] for s in hostile["final"]] == HOSTILE["final_steps"]
    assert hostile["critiques"][0]["code_runs"][0]["output"] == EVIL
    assert {k for k, r in records.items() if r["w2r"]} == {"apples"}
    assert {k for k, r in records.items() if r["r2w"]} == {"train"}
    assert {k for k, r in records.items() if r["failed"]} == {"broken"}


def test_the_round_is_a_word_diff_of_the_flagged_step_and_its_rewrite(page: str) -> None:
    apples = data_of(page)["records"][0]
    [round_] = apples["rounds"]
    assert round_["diff"] == [
        ["=", "He gives away 5 apples, so he has 12 - 5 = "],
        ["-", "8"],
        ["+", "7"],
        ["=", " apples left."],
    ]
    assert (round_["round"], round_["index"], round_["reward"]) == (1, 1, 0.08)
    assert "createTextNode(run[1])" in page and '"del" : "ins"' in page  # the page renders it so


def test_word_diff_gives_back_both_texts() -> None:
    before, after = "so  x = 5 and y = 2", "so x = 6 and y = 2 then"
    runs = word_diff(before, after)
    assert "".join(t for op, t in runs if op != "+") == before
    assert "".join(t for op, t in runs if op != "-") == after
    assert word_diff("", "") == [] and word_diff("a", "") == [["-", "a"]]


def test_steps_take_the_reward_and_critique_of_their_own_round(page: str) -> None:
    data = data_of(page)
    apples = data["records"][0]
    # Final step 0 was judged in round 0 (reused after); steps 1 and 2 in round 1.
    assert [s[1] for s in apples["final"]] == [0.97, 0.93, 0.99]
    assert [apples["critiques"][s[2]]["round"] for s in apples["final"]] == [0, 1, 1]
    assert [s[1] for s in apples["initial"]] == [0.97, 0.08, None]  # the scan stopped at step 1
    assert apples["critiques"][1]["code_runs"] == [{"code": "print(12 - 5)", "output": "7", "status": "ok"}]
    # Without `critiques`: the final steps' rewards from step_rewards, no critique.
    passed = data["records"][4]
    assert [s[1:] for s in passed["final"]] == [[0.88, None], [0.97, None]]
    stuck = data["records"][5]
    assert [s[1] for s in stuck["final"]] == [0.2, None]
    assert [s[1] for s in stuck["rounds"][0]["steps"]] == [None, None]


def test_a_cut_step_in_critiques_still_matches_its_step() -> None:
    record = {**PASSED, "critiques": [critique(0, 0, "1 + 4 + 9...", 0.5, "ok")]}
    [data] = data_of(render_view([record], title="t"))["records"]
    assert [s[2] for s in data["final"]] == [0, None]


def test_the_summary_and_plots_are_inline(page: str) -> None:
    assert page.count('src="data:image/png;base64,') == 2
    assert "accuracy by round" in page and "critic rewards" in page
    assert "<th>wrong → right</th><td>1</td>" in page
    assert "<th>accuracy, final (best seen)</th><td>50.0% (3/6)</td>" in page


def test_a_single_solve_result_skips_what_does_not_apply() -> None:
    page = render_view([SOLVE_RESULT], title="result.json")
    assert 'id="summary"' not in page and "data:image/png" not in page
    data = data_of(page)
    assert data["graded"] is False
    [record] = data["records"]
    assert [s[1] for s in record["final"]] == [0.9, 0.95] and record["answer"] == "14"


def test_best_of_n_and_odd_records_do_not_crash_the_view() -> None:
    odd = {"id": 7, "stop_reason": None, "rounds": [{"round": "x", "steps": None}], "usage": {"policy": 3}}
    data = data_of(render_view([BEST_OF_N, odd, {}], title="bon.jsonl"))
    bon, weird, empty = data["records"]
    assert [s["picked"] for s in bon["samples"]] == [False, True, False]
    assert bon["extra"]["method"] == "best_of_n" and bon["w2r"] is True
    assert weird["id"] == "7" and weird["stop_reason"] == "unknown" and weird["usage"] == []
    assert empty["final"] == [] and empty["problem"] == ""
    with pytest.raises(ConfigError):
        render_view([], title="none")


def test_a_thousand_problems_make_a_page_of_reasonable_size() -> None:
    records = synthetic_records(1000)
    raw = sum(len(json.dumps(r)) for r in records)
    page = render_view(records, title="big.jsonl")
    assert len(page) < 0.8 * raw  # the steps the rounds repeat are stored once
    assert len(page.encode()) < 12_000_000


# --------------------------------------------------------------------------- reading and the command


def test_read_results_takes_jsonl_and_a_pretty_printed_object(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    with jsonl.open("a") as f:
        f.write('{"id": "torn", "probl')  # a line torn by a crash
    assert [r["id"] for r in read_results(jsonl)] == IDS
    single = tmp_path / "result.json"
    single.write_text(json.dumps(SOLVE_RESULT, indent=2))
    assert read_results(single) == [SOLVE_RESULT]
    for content in ("", "\n  \n", "not json\n"):
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(ConfigError, match=r"bad\.jsonl"):
            read_results(tmp_path / "bad.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read"):
        read_results(tmp_path / "binary.jsonl")


def test_view_writes_the_page_beside_the_results(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "results.jsonl", RECORDS)
    done = runner.invoke(app, ["view", str(results)])
    assert done.exit_code == 0, done.output
    page = tmp_path / "results.html"
    assert page.is_file() and str(page) in done.stdout
    assert [r["id"] for r in data_of(page.read_text())["records"]] == IDS
    out = tmp_path / "pages" / "mine.html"
    done = runner.invoke(app, ["view", str(results), "--out", str(out)])
    assert done.exit_code == 0 and out.is_file()


def test_view_of_a_solve_json_result(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    result.write_text(json.dumps(SOLVE_RESULT, indent=2))
    done = runner.invoke(app, ["view", str(result)])
    assert done.exit_code == 0, done.output
    assert data_of((tmp_path / "result.html").read_text())["records"][0]["problem"] == SOLVE_RESULT["problem"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such results file"), ("", "is empty"), ("[1, 2]\n", "holds no records")],
)
def test_bad_results_files_exit_2_with_a_clear_message(
    tmp_path: Path, content: str | None, message: str
) -> None:
    results = tmp_path / "results.jsonl"
    if content is not None:
        results.write_text(content)
    done = runner.invoke(app, ["view", str(results)])
    assert done.exit_code == 2
    assert f"{results}: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.output
    assert not (tmp_path / "results.html").exists()


def test_view_refuses_to_overwrite_its_input_and_port_without_serve(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "results.html", RECORDS)
    done = runner.invoke(app, ["view", str(results)])
    assert done.exit_code == 2 and "overwrite the results file" in done.stderr
    done = runner.invoke(app, ["view", str(results), "-o", str(tmp_path / "x.html"), "--port", "9000"])
    assert done.exit_code == 2 and "--port needs --serve" in done.stderr


def test_the_server_serves_the_page_on_loopback(tmp_path: Path) -> None:
    page = write_view(write_jsonl(tmp_path / "results.jsonl", RECORDS))
    server = make_server(page, 0)
    host, port = server.server_address[:2]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.read() == page.read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/etc/passwd", timeout=10)
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}"):
            make_server(page, port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.slow
def test_view_serve_serves_until_ctrl_c(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "results.jsonl", RECORDS)
    critloop = str(Path(sys.executable).with_name("critloop"))
    args = [critloop, "view", str(results), "--serve", "--port", "0"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stderr is not None
            line = process.stderr.readline()
            found = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
            assert found is not None, line
            with urllib.request.urlopen(found.group(1), timeout=10) as response:
                assert response.read() == (tmp_path / "results.html").read_bytes()
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, err
    assert f"page: {tmp_path / 'results.html'}" in out and "stopped" in err


# --------------------------------------------------------------------------- in a real browser


def require_chromium() -> None:
    # Not a machine limit: CI installs Chromium (.ci/run), so a missing one fails CI's run.
    if chromium_binary() is None:
        pytest.skip("no chromium binary: apt-get install chromium")


ROW_IDS = "[...document.querySelectorAll('#list li')].filter(li => !li.hidden).map(li => li.dataset.id)"


def click(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)}).click()"


@pytest.mark.slow
async def test_the_page_in_headless_chromium(tmp_path: Path) -> None:
    require_chromium()
    page = write_view(write_jsonl(tmp_path / "results.jsonl", RECORDS))
    async with await Chromium.open() as browser:
        await browser.navigate(page.as_uri())
        await browser.wait_for("document.body.dataset.ready === '1'")
        assert await browser.evaluate("document.title") == "results.jsonl"
        assert await browser.evaluate(ROW_IDS) == IDS
        assert (
            await browser.evaluate("document.getElementById('count').textContent") == "6 of 6 problems shown"
        )
        # The hostile text stayed text: no alert, no injected element.
        assert await browser.evaluate("document.querySelectorAll('b, img:not(.plots img)').length") == 0
        assert EVIL in await browser.evaluate(
            "document.querySelector('[data-id=hostile] .preview').textContent"
        )

        await browser.evaluate(click("label[for=f-w2r]"))
        assert await browser.evaluate(ROW_IDS) == ["apples"]
        await browser.evaluate(click("label[for=f-r2w]"))
        assert await browser.evaluate(ROW_IDS) == ["train"]
        await browser.evaluate(click("label[for=f-failed]"))
        assert await browser.evaluate(ROW_IDS) == ["broken"]
        await browser.evaluate(click("label[for=f-all]"))
        stop = (
            "(s => { s.value = %s; s.dispatchEvent(new Event('change')); })(document.getElementById('stop'))"
        )
        await browser.evaluate(stop % json.dumps("no_progress"))
        assert await browser.evaluate(ROW_IDS) == ["coins"]
        await browser.evaluate(stop % json.dumps(""))
        search = (
            "(s => { s.value = %s; s.dispatchEvent(new Event('input')); })(document.getElementById('search'))"
        )
        await browser.evaluate(search % json.dumps("APPLES"))
        assert await browser.evaluate(ROW_IDS) == ["apples"]
        assert (
            await browser.evaluate("document.getElementById('count').textContent") == "1 of 6 problems shown"
        )
        await browser.evaluate(search % json.dumps("sq"))
        assert await browser.evaluate(ROW_IDS) == ["squares"]  # by id
        await browser.evaluate(search % json.dumps(""))
        assert await browser.evaluate(ROW_IDS) == IDS

        # Nothing is built before a problem is opened.
        assert await browser.evaluate("document.querySelectorAll('#detail .step').length") == 0
        await browser.evaluate(click("[data-id=apples] .preview"))
        final = await browser.evaluate(
            """[...document.querySelectorAll('#detail .problem-detail > .solution .step')].map(s => ({
                reward: s.querySelector('.reward').textContent, text: s.querySelector('.text').textContent,
                background: getComputedStyle(s).backgroundColor}))"""
        )
        assert [s["text"] for s in final] == APPLES_FIXED
        assert [s["reward"] for s in final] == ["0.970", "0.930", "0.990"]
        assert all(s["background"].startswith("rgb(") for s in final)
        assert len({s["background"] for s in final}) == 3  # one colour per reward
        assert await browser.evaluate("document.querySelector('#detail del').textContent") == "8"
        assert await browser.evaluate("document.querySelector('#detail ins').textContent") == "7"
        diff = await browser.evaluate("document.querySelector('#detail .diff').textContent")
        assert diff == "He gives away 5 apples, so he has 12 - 5 = 87 apples left."  # 8 struck, 7 inserted
        usage_rows = await browser.evaluate("document.querySelectorAll('#detail table.usage tr').length")
        assert usage_rows == 4  # a header and three roles
        # The initial solution (closed), its flagged step red and its code run on demand.
        initial = await browser.evaluate(
            """(() => { const d = document.querySelector('#detail details.initial'); d.open = true;
                const flagged = d.querySelectorAll('.step')[1];
                flagged.querySelector('details.code-details').open = true;
                return {reward: flagged.querySelector('.reward').textContent,
                        flagged: !!flagged.querySelector('.badge.bad'),
                        background: getComputedStyle(flagged).backgroundColor,
                        code: flagged.querySelector('pre.code').textContent,
                        output: flagged.querySelector('pre.out').textContent,
                        visible: flagged.querySelector('pre.code').offsetHeight > 0}; })()"""
        )
        assert initial == {
            "reward": "0.080",
            "flagged": True,
            "background": initial["background"],
            "code": "print(12 - 5)",
            "output": "7",
            "visible": True,
        }
        red, green, _ = (int(c) for c in re.findall(r"\d+", initial["background"])[:3])
        assert red > green  # a low reward is red
        assert await browser.evaluate("location.hash") == "#apples"

        await browser.evaluate(click("[data-id=hostile]"))
        texts = await browser.evaluate(
            "[...document.querySelectorAll('#detail .text')].map(t => t.textContent)"
        )
        assert texts == HOSTILE["final_steps"]
        await browser.evaluate(click("[data-id=broken]"))
        assert "http 503" in await browser.evaluate("document.getElementById('detail').textContent")

        await browser.evaluate(click("[data-id=apples]"))
        await browser.evaluate("document.querySelector('#detail details.initial').open = true")
        await browser.evaluate("document.getElementById('browser').scrollIntoView()")
        shot = await browser.screenshot(tmp_path / "view.png")
        # One solve result: no summary, no right/wrong filters, and its problem open at once.
        single = tmp_path / "result.json"
        single.write_text(json.dumps(SOLVE_RESULT, indent=2))
        await browser.navigate(write_view(single).as_uri())
        await browser.wait_for("document.body.dataset.ready === '1'")
        assert await browser.evaluate(
            "!document.getElementById('summary') && !document.getElementById('f-w2r')"
        )
        assert (
            await browser.evaluate(
                "document.querySelectorAll('#detail .problem-detail > .solution .step').length"
            )
            == 2
        )
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert int.from_bytes(png[16:20], "big") == 1280 and int.from_bytes(png[20:24], "big") == 900
    if os.environ.get("CRITLOOP_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


@pytest.mark.slow
async def test_a_thousand_problem_page_lists_them_all_and_builds_a_problem_only_when_opened(
    tmp_path: Path,
) -> None:
    """What a large batch needs (its size and load time are measured by benchmarks/bench_view.py):
    every row listed, no problem's steps built before it is opened."""
    require_chromium()
    page = write_view(write_jsonl(tmp_path / "big.jsonl", synthetic_records(1000)))
    async with await Chromium.open() as browser:
        await browser.navigate(page.as_uri())
        await browser.wait_for("document.body.dataset.ready === '1'")
        assert await browser.evaluate("document.querySelectorAll('#list li').length") == 1000
        assert await browser.evaluate("document.querySelectorAll('#detail .step').length") == 0
        await browser.evaluate(click("[data-id=gsm8k-0999]"))
        assert await browser.evaluate("document.querySelectorAll('#detail .step').length") > 0


@pytest.mark.slow
async def test_a_real_batch_run_is_shown_step_by_step(template, local_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Records as ``critloop batch`` writes them (scripted models, the real graph, details on):
    the view shows the refined problem's steps, their rewards, the flagged step's code and the
    round's diff."""
    require_chromium()
    from refine_script import critic_by_content, policy_script

    from critloop.agent.budget import Budget
    from critloop.agent.critic import CriticConfig, GenPRMCritic
    from critloop.agent.policy import Policy, Refiner
    from critloop.agent.writer import CompletionWriter
    from critloop.graphs.batch import Problem, run_records, solve_record
    from critloop.graphs.refine import RefineContext, build_refine_graph
    from critloop.tools.completion import SamplingParams

    writer = CompletionWriter(policy_script(), template, SamplingParams(max_tokens=128))
    policy = Policy(writer)
    critic = GenPRMCritic(
        critic_by_content(lambda step: "15" in step),
        template,
        local_pool,
        CriticConfig(profile="genprm", samples=1),
    )
    context = RefineContext(policy=policy, refiner=Refiner(writer, policy), critic=critic, budget=Budget())
    graph = build_refine_graph()
    problems = [
        Problem(id=f"p{i}", problem=f"What is 2 + 3 * 4? (copy {i})", gold="14", line=i) for i in range(2)
    ]
    out = tmp_path / "results.jsonl"
    await run_records(problems, lambda p: solve_record(graph, context, p, details=500), out)
    async with await Chromium.open() as browser:
        await browser.navigate(write_view(out).as_uri())
        await browser.wait_for("document.body.dataset.ready === '1'")
        assert sorted(await browser.evaluate(ROW_IDS)) == ["p0", "p1"]
        await browser.evaluate(click("label[for=f-w2r]"))  # both were fixed: 15, then 14
        assert sorted(await browser.evaluate(ROW_IDS)) == ["p0", "p1"]
        await browser.evaluate(click("[data-id=p0] .preview"))
        final = await browser.evaluate(
            "[...document.querySelectorAll('#detail .problem-detail > .solution .step')]"
            ".map(s => s.querySelector('.text').textContent)"
        )
        assert final == ["First, 3 * 4 = 12.", "Then 2 + 12 = 14.", "The answer is $\\boxed{14}$."]
        flagged = await browser.evaluate(
            """(() => { const d = document.querySelector('#detail details.initial'); d.open = true;
                const s = d.querySelectorAll('.step')[1];
                return {flagged: !!s.querySelector('.badge.bad'),
                        code: !!s.querySelector('pre.code'), critique: s.textContent}; })()"""
        )
        assert flagged["flagged"] and flagged["code"] and "Checking the claim" in flagged["critique"]
        assert await browser.evaluate("document.querySelector('#detail del').textContent") == "15."
        assert await browser.evaluate("document.querySelector('#detail ins').textContent") == "14."
