"""Batch refinement: loading real dataset slices, grading, crash-safe results, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from refine_script import critic_by_content, policy_script

from critloop.agent.budget import Budget
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.policy import Policy, Refiner
from critloop.agent.writer import CompletionWriter
from critloop.errors import ConfigError
from critloop.graphs.batch import FieldMap, Problem, ResultsFile, load_problems, run_batch, solve_record
from critloop.graphs.refine import RefineContext, build_refine_graph
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams
from critloop.tools.grading import agrade, grade

DATA = Path(__file__).parent / "data" / "problems"  # see data/SOURCES.md


def test_gsm8k_math500_aime_and_amc_fields_are_detected() -> None:
    gsm8k, bad = load_problems(DATA / "gsm8k_test.jsonl")
    assert [p.gold for p in gsm8k] == ["18", "3", "70000", "540"] and bad == []
    assert gsm8k[0].id == "gsm8k_test:1" and gsm8k[0].problem.startswith("Janet")
    math500, bad = load_problems(DATA / "math500.jsonl")
    assert len(math500) == 2 and bad == []
    assert (
        math500[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
        and math500[0].id == "test/precalculus/807.json"
    )
    aime, bad = load_problems(DATA / "aime24.jsonl")
    assert [p.gold for p in aime] == ["204"] and bad == []
    amc, bad = load_problems(DATA / "amc23.jsonl")
    assert [p.gold for p in amc] == ["27"] and bad == []


def test_bad_records_become_error_records_naming_the_line(tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        '{"id": "a", "problem": "1+1?", "answer": "2"}\n'
        "{not json\n"
        '{"id": "b", "answer": "3"}\n'
        '{"id": "c", "problem": "   "}\n'
        '{"id": "a", "problem": "2+2?", "answer": "4"}\n'
        "[1, 2]\n"
        '{"id": "d", "question": "3+3?", "answer": "#### 6"}\n'
    )
    problems, bad = load_problems(data)
    assert [(p.id, p.gold, p.line) for p in problems] == [("a", "2", 1), ("d", "6", 7)]
    errors = {r["id"]: r["error"] for r in bad}
    assert errors["mixed:2"].startswith("mixed.jsonl line 2: not valid JSON")
    assert errors["b"] == "mixed.jsonl line 3: no 'problem or question' field"
    assert errors["c"] == "mixed.jsonl line 4: the problem is empty"
    assert errors["a@line5"] == "mixed.jsonl line 5: duplicate id 'a'"
    assert errors["mixed:6"] == "mixed.jsonl line 6: a JSON list, not an object"
    assert all(r["stop_reason"] == "error" and r["correct_final"] is False for r in bad)


def test_a_problem_field_there_but_empty_is_named_empty_not_missing(tmp_path: Path) -> None:
    data = tmp_path / "blank.jsonl"
    data.write_text('{"id": "a", "problem": ""}\n{"id": "b", "question": null}\n{"id": "c", "prompt": ""}\n')
    problems, bad = load_problems(data)
    assert problems == []
    assert {r["id"]: r["error"] for r in bad} == {
        "a": "blank.jsonl line 1: the problem is empty",
        "b": "blank.jsonl line 2: the problem is empty",
        "c": "blank.jsonl line 3: no 'problem or question' field",
    }
    _, bad = load_problems(data, fields=FieldMap(problem="prompt"))
    assert {r["id"]: r["error"] for r in bad} == {
        "a": "blank.jsonl line 1: no 'prompt' field",
        "b": "blank.jsonl line 2: no 'prompt' field",
        "c": "blank.jsonl line 3: the problem is empty",
    }


def test_csv_json_field_maps_limit_and_shuffle(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("qid,text,gold\nx1,What is 1+1?,2\nx2,What is 2+2?,4\n")
    problems, bad = load_problems(
        tmp_path / "p.csv", fields=FieldMap(problem="text", answer="gold", id="qid")
    )
    assert [(p.id, p.gold, p.line) for p in problems] == [("x1", "2", 2), ("x2", "4", 3)] and not bad
    (tmp_path / "p.json").write_text(json.dumps([{"problem": f"q{i}", "answer": str(i)} for i in range(10)]))
    first, _ = load_problems(tmp_path / "p.json", limit=3)
    assert [p.problem for p in first] == ["q0", "q1", "q2"]
    one, _ = load_problems(tmp_path / "p.json", limit=4, shuffle=True, seed=7)
    two, _ = load_problems(tmp_path / "p.json", limit=4, shuffle=True, seed=7)
    assert [p.id for p in one] == [p.id for p in two] != [p.id for p in first[:4]]


def test_unreadable_or_unknown_files_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ConfigError, match=r"unknown format '\.parquet'"):
        load_problems(tmp_path / "x.parquet")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.json is not valid JSON"):
        load_problems(tmp_path / "broken.json")


GRADES = [
    ("18", "18", True), (" 18", "18 ", True), ("\\frac{1}{2}", "0.5", True), ("14", "15", False),
    (None, "1", False), ("", "1", False), ("1" * 500, "1", False), ("\\frac{", "1", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left(3,\\frac{\\pi}{2}\\right)", True),
]  # fmt: skip


@pytest.mark.parametrize(("predicted", "gold", "correct"), GRADES)
def test_grading_is_mathematical_and_never_raises(predicted: str | None, gold: str, correct: bool) -> None:
    assert grade(predicted, gold) is correct
    assert grade(predicted, gold) is correct  # and again, from the cache


@pytest.mark.parametrize(("predicted", "gold", "correct"), GRADES)
async def test_grading_off_the_event_loop_agrees(predicted: str | None, gold: str, correct: bool) -> None:
    assert await agrade(predicted, gold) is correct


def test_a_torn_last_line_is_cut_and_finished_records_stay(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "ans')
    results = ResultsFile(out)
    assert [r["id"] for r in results.records()] == ["a", "b"]
    results.repair()
    assert out.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'


def context(template: ChatTemplate, pool: SandboxPool) -> RefineContext:
    """Every problem's first solution says 15, fixed to 14 after one round (gold decides)."""
    writer = CompletionWriter(policy_script(), template, SamplingParams(max_tokens=128))
    policy = Policy(writer)
    critic_model = critic_by_content(lambda step: "15" in step)
    critic = GenPRMCritic(critic_model, template, pool, CriticConfig(profile="genprm", samples=1))
    return RefineContext(policy=policy, refiner=Refiner(writer, policy), critic=critic, budget=Budget())


async def test_a_batch_writes_one_graded_record_per_problem_and_resumes(
    template, local_pool, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "p.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is 2 + 3 * 4? (copy {i})", "answer": "14"} for i in range(5)]
    rows[3]["answer"] = "15"  # this gold agrees with the first attempt, not the refined one
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    problems, bad = load_problems(data)
    out = tmp_path / "results.jsonl"
    graph = build_refine_graph()
    seen: list[str] = []
    written = await run_batch(
        graph,
        context(template, local_pool),
        problems[:3],
        out,
        concurrency=2,
        bad=bad,
        on_record=lambda r: seen.append(r["id"]),
    )
    assert len(written) == 4 and sorted(seen) == sorted(["p:6", "p0", "p1", "p2"])
    with pytest.raises(ConfigError, match="already holds results"):
        await run_batch(graph, context(template, local_pool), problems, out)
    before = out.read_bytes()
    more = await run_batch(graph, context(template, local_pool), problems, out, resume=True, bad=bad)
    assert sorted(r["id"] for r in more) == ["p3", "p4"]
    assert out.read_bytes().startswith(before)  # finished records byte-identical
    records = {r["id"]: r for r in ResultsFile(out).records()}
    assert sorted(records) == ["p0", "p1", "p2", "p3", "p4", "p:6"]
    p0, p3, broken = records["p0"], records["p3"], records["p:6"]
    assert p0["stop_reason"] == "all_steps_pass" and p0["answer"] == "14" and p0["initial_answer"] == "15"
    assert (p0["correct_initial"], p0["correct_final"], p0["correct_by_round"]) == (
        False,
        True,
        [False, True],
    )
    assert (p3["correct_initial"], p3["correct_final"]) == (True, False)
    assert len(p0["rounds"]) == 1 and p0["error"] is None and p0["usage"]["critic"]["calls"] > 0
    assert [flagged for _, flagged in p0["critiqued"]] == [False, True, False, False]
    assert broken["error"].startswith("p.jsonl line 6: not valid JSON") and broken["stop_reason"] == "error"


async def test_a_real_gsm8k_slice_through_scripted_models_gives_the_hand_computed_summary(  # type: ignore[no-untyped-def]
    template, local_pool, tmp_path: Path
) -> None:
    """GSM8K's first four golds are 18, 3, 70000, 540. The policy always answers 15, the critic
    flags that step, the rewrite answers 18. By hand: first attempts 0/4 right; after the one
    round 1/4 (only the gold 18); one flip wrong -> right; every problem passes in one round."""
    from critloop.graphs.report import summarize

    problems, bad = load_problems(DATA / "gsm8k_test.jsonl")
    writer = CompletionWriter(
        policy_script(rewrite="Then 2 + 12 = 18.", continuation=["The answer is $\\boxed{18}$."]),
        template,
        SamplingParams(max_tokens=128),
    )
    policy = Policy(writer)
    critic_model = critic_by_content(lambda step: "= 15" in step or "{15}" in step)
    critic = GenPRMCritic(critic_model, template, local_pool, CriticConfig(profile="genprm", samples=1))
    ctx = RefineContext(
        policy=policy, refiner=Refiner(writer, policy), critic=critic, budget=Budget(max_rounds=1)
    )
    out = tmp_path / "results.jsonl"
    await run_batch(build_refine_graph(), ctx, problems, out, concurrency=4, bad=bad)
    summary = summarize(ResultsFile(out).records())
    assert [p.gold for p in problems] == ["18", "3", "70000", "540"]
    assert summary.n == 4 and summary.errors == 0
    assert summary.accuracy_initial == 0.0 and summary.accuracy_final == 0.25
    assert summary.accuracy_by_round == [0.0, 0.25]
    assert (summary.flips_wrong_to_right, summary.flips_right_to_wrong) == (1, 0)
    assert summary.stop_reasons == {"all_steps_pass": 4}
    assert summary.rounds_mean == 1.0


def test_a_hub_dataset_id_loads_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub is reachable here: an offline cache laid out as huggingface_hub writes it stands in."""
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "datasets--acme--tiny-math" / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    (snapshot / "data" / "train.jsonl").write_text('{"question": "2+2?", "answer": "#### 4"}\n')
    (snapshot / "README.md").write_text("a dataset card\n")
    refs = tmp_path / "hub" / "datasets--acme--tiny-math" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abcd")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    problems, _ = load_problems("acme/tiny-math")
    assert [(p.problem, p.gold) for p in problems] == [("1+1?", "2")]  # the test split by default
    problems, _ = load_problems("hf://acme/tiny-math:data/train.jsonl")
    assert [(p.problem, p.gold) for p in problems] == [("2+2?", "4")]
    with pytest.raises(ConfigError, match="could not be fetched"):
        load_problems("acme/not-cached")
    with pytest.raises(ConfigError, match=r"pick one data file"):
        load_problems("acme/tiny-math:data/missing.jsonl")


async def test_with_details_a_record_keeps_each_judged_step_its_critique_and_code(
    template, local_pool
) -> None:  # type: ignore[no-untyped-def]
    problem = Problem(id="p0", problem="What is 2 + 3 * 4?", gold="14", line=1)
    graph = build_refine_graph()
    record = await solve_record(graph, context(template, local_pool), problem, details=20)
    judged = record["critiques"]
    # The first solution's steps 1 and 2 (flagged), then the refined one's steps 2 and 3.
    assert [(c["round"], c["index"], c["flagged"]) for c in judged] == [
        (0, 0, False),
        (0, 1, True),
        (1, 1, False),
        (1, 2, False),
    ]
    assert [c["reward"] for c in judged] == [r for r, _ in record["critiqued"]]
    # The steps (17 characters) are within the limit; the critiques are cut to it.
    assert judged[1]["step"] == "Then 2 + 12 = 15." and judged[2]["step"] == "Then 2 + 12 = 14."
    assert judged[1]["verdict"] == "no" and judged[1]["tier"] == "code"
    assert all(len(c["critique"]) <= 23 for c in judged) and judged[1]["critique"].endswith("...")
    (run,) = judged[1]["code_runs"]
    assert run["status"] == "ok" and run["code"] and len(run["output"]) <= 23
    without = await solve_record(graph, context(template, local_pool), problem)
    assert "critiques" not in without
