"""ProcessBench: loading real records, the metric on hand-made predictions, the resumable runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from critic_script import Plan, paragraph, scripted_genprm
from model_fixtures import TOKENIZER_DIR
from openai_script import policy_and_critic
from scripted_server import ScriptedServer
from typer.testing import CliRunner

from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.cli import app
from critloop.errors import ConfigError
from critloop.graphs.processbench import (
    ProcessBenchRecord,
    evaluate_processbench,
    load_processbench,
    metrics,
    read_results,
)
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate

DATA = Path(__file__).parent / "data" / "processbench"  # see data/SOURCES.md


def scripted_config(tmp_path: Path, url: str) -> Path:
    """A GenPRM critic on a scripted server (one chain), and the local sandbox."""
    config = tmp_path / "critloop.toml"
    config.write_text(
        f'[critic]\nkind = "openai"\nbase_url = "{url}/v1"\nmodel = "scripted"\n'
        f'tokenizer = "{TOKENIZER_DIR}"\nprofile = "genprm"\nsamples = 1\n'
        '[sandbox]\nbackend = "local"\npool_size = 1\n'
    )
    return config


def test_metric_on_hand_made_predictions() -> None:
    results = [
        # gsm8k: 3 erroneous (2 found exactly), 2 correct (1 kept correct) -> 66.7 / 50.0 -> F1 57.1
        {"split": "gsm8k", "label": 2, "prediction": 2, "error": None},
        {"split": "gsm8k", "label": 0, "prediction": 0, "error": None},
        {"split": "gsm8k", "label": 1, "prediction": 3, "error": None},
        {"split": "gsm8k", "label": -1, "prediction": -1, "error": None},
        {"split": "gsm8k", "label": -1, "prediction": 0, "error": None},
        {"split": "gsm8k", "label": 1, "prediction": None, "error": "ModelEndpointError: down"},
        # math: all right -> 100 / 100 -> 100
        {"split": "math", "label": 4, "prediction": 4, "error": None},
        {"split": "math", "label": -1, "prediction": -1, "error": None},
        # omnimath: nothing right on erroneous -> F1 0
        {"split": "omnimath", "label": 1, "prediction": -1, "error": None},
        {"split": "omnimath", "label": -1, "prediction": -1, "error": None},
    ]
    table = {m.split: m for m in metrics(results)}
    assert list(table) == ["gsm8k", "math", "omnimath"]
    gsm = table["gsm8k"]
    assert (gsm.erroneous, gsm.correct, gsm.failed) == (3, 2, 1)
    assert round(gsm.error_accuracy, 4) == round(200 / 3, 4) and gsm.correct_accuracy == 50.0
    assert round(gsm.f1, 4) == round(2 * (200 / 3) * 50 / (200 / 3 + 50), 4)
    assert table["math"].f1 == 100.0
    assert table["omnimath"].f1 == 0.0 and table["omnimath"].correct_accuracy == 100.0


def test_real_processbench_records_load() -> None:
    records = load_processbench(DATA / "gsm8k.json")
    assert [(r.id, len(r.steps), r.label) for r in records] == [
        ("gsm8k-100", 3, 2),
        ("gsm8k-126", 2, 0),
        ("gsm8k-202", 2, -1),
    ]
    assert {r.split for r in records} == {"gsm8k"}
    assert all(-1 <= r.label < len(r.steps) for r in records)
    assert sum(r.label == -1 for r in records) > 0
    assert all(r.problem.strip() and all(s.strip() for s in r.steps) for r in records)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"id": "a", "problem": "p", "steps": []}]', "record 1 lacks label"),
        ('[{"id": "a", "problem": "p", "steps": [], "label": -1}]', "non-empty list of strings"),
        ('[{"id": "a", "problem": "p", "steps": ["s"], "label": 3}]', "`label` must be -1 or a step index"),
        ('{"id": "a", "problem": "p", "steps": ["s"], "label": 0}\n{broken', "line 2 is not valid JSON"),
        ("[1, 2", "is not valid JSON"),
    ],
)
def test_bad_files_name_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "gsm8k.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_processbench(path)


async def test_runner_predicts_writes_and_resumes(
    template: ChatTemplate, local_pool: SandboxPool, tmp_path: Path
) -> None:
    records = [
        ProcessBenchRecord(id="ok", split="gsm8k", problem="P1", steps=("a", "b"), label=-1),
        ProcessBenchRecord(id="bad", split="gsm8k", problem="P2 wrong", steps=("a", "b", "c"), label=1),
    ]

    def plans(prompt: str) -> Plan:
        return Plan(verdict="No" if "P2 wrong" in prompt and paragraph(prompt) == 2 else "Yes")

    model = scripted_genprm({})
    inner = model._script
    model._script = lambda prompt, params: inner(prompt, params).replace(
        "{Yes}", "{" + plans(prompt).verdict + "}"
    )  # type: ignore[operator]
    critic = GenPRMCritic(model, template, local_pool, CriticConfig())
    out = tmp_path / "pb.jsonl"
    first = await evaluate_processbench(critic, records[:1], out)
    assert [r["prediction"] for r in first] == [-1]
    calls = len(model.calls)
    second = await evaluate_processbench(critic, records, out)  # resumes: only "bad" runs
    assert [r["id"] for r in second] == ["bad"] and second[0]["prediction"] == 1
    assert len(model.calls) > calls
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["ok", "bad"]
    assert {"id", "label", "prediction", "step_rewards", "critiques", "error"} <= set(lines[1])
    assert len(lines[1]["step_rewards"]) == 2 and len(lines[1]["critiques"]) == 2
    assert metrics(read_results(out))[0].f1 == 100.0
    assert await evaluate_processbench(critic, records, out) == []  # everything done: nothing to run


async def test_a_resume_after_a_crash_keeps_every_record(
    template: ChatTemplate, local_pool: SandboxPool, tmp_path: Path
) -> None:
    """A line torn by a crash is cut before the run appends: the record written next is whole,
    and the torn one runs again."""
    critic = GenPRMCritic(scripted_genprm({}), template, local_pool, CriticConfig())
    records = [
        ProcessBenchRecord(id=f"r{i}", split="gsm8k", problem=f"P{i}", steps=("a", "b"), label=-1)
        for i in range(4)
    ]
    out = tmp_path / "pb.jsonl"
    await evaluate_processbench(critic, records[:2], out)
    finished = out.read_bytes()
    out.write_bytes(finished + b'{"id": "r2", "split": "gsm8k", "label": -1, "predic')  # the crash
    again = await evaluate_processbench(critic, records, out, concurrency=1)
    assert sorted(r["id"] for r in again) == ["r2", "r3"]
    assert out.read_bytes().startswith(finished)
    assert sorted(r["id"] for r in read_results(out)) == ["r0", "r1", "r2", "r3"]
    assert all(line.endswith(b"\n") for line in out.read_bytes().splitlines(keepends=True))


def test_records_name_their_split_by_their_field_else_by_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sample.jsonl"
    rows = [
        {"id": "a", "problem": "p", "steps": ["s"], "label": -1, "split": "math"},
        {"id": "b", "problem": "p", "steps": ["s"], "label": 0},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [(r.id, r.split) for r in load_processbench(path)] == [("a", "math"), ("b", "sample")]
    assert [r.split for r in load_processbench(path, "gsm8k")] == ["gsm8k", "gsm8k"]


def test_eval_of_a_data_file_not_named_after_a_split(tmp_path: Path) -> None:
    """`--data FILE` with `--split all` (the default) evaluates the file: its records' splits are
    their `split` field, else the file's stem; `--split` keeps one of them."""
    data = tmp_path / "my_sample.jsonl"
    rows = [
        {"id": "a", "problem": "What is 2 + 3 * 4?", "steps": ["3 * 4 = 12.", "2 + 12 = 14."], "label": -1},
        {"id": "b", "problem": "What is 2 + 2?", "steps": ["2 + 2 = 4."], "label": -1, "split": "math"},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "pb.jsonl"
    with ScriptedServer(default=policy_and_critic()) as server:
        config = scripted_config(tmp_path, server.url)
        done = CliRunner().invoke(
            app, ["eval", "processbench", "--data", str(data), "--config", str(config), "--out", str(out)]
        )
        assert done.exit_code == 0, done.output
        assert sorted((r["split"], r["id"], r["prediction"]) for r in read_results(out)) == [
            ("math", "b", -1),
            ("my_sample", "a", -1),
        ]
        assert "F1 my_sample: 0.0" in done.stdout and "F1 math: 0.0" in done.stdout  # no erroneous sample
        one = CliRunner().invoke(
            app,
            [
                "eval",
                "processbench",
                "--data",
                str(data),
                "--config",
                str(config),
                "--out",
                str(out),
                "--split",
                "math",
            ],
        )
    assert one.exit_code == 0, one.output
    assert "F1 math" in one.stdout and "my_sample" not in one.stdout


def test_limit_spreads_the_records_evenly_through_a_split(tmp_path: Path) -> None:
    # The benchmark's files list the erroneous samples first: the first N would all be erroneous.
    from critloop.cli.eval import _processbench_records

    rows = [
        {"id": str(i), "problem": "p", "steps": ["a", "b"], "label": 0 if i < 5 else -1} for i in range(10)
    ]
    (tmp_path / "gsm8k.json").write_text(json.dumps(rows))
    chosen = _processbench_records(tmp_path / "gsm8k.json", "all", 4)
    assert [r.id for r in chosen] == ["0", "2", "5", "7"]
    assert [r.label for r in chosen] == [0, 0, -1, -1]
    assert len(_processbench_records(tmp_path / "gsm8k.json", "all", 20)) == 10


def test_eval_with_the_cascade_records_the_tier_of_every_step(tmp_path: Path) -> None:
    data = tmp_path / "gsm8k.jsonl"
    rows = [
        {"id": "a", "problem": "What is 2 + 3 * 4?", "steps": ["3 * 4 = 12.", "2 + 12 = 14."], "label": -1}
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "pb.jsonl"
    with ScriptedServer(default=policy_and_critic()) as server:
        config = scripted_config(tmp_path, server.url)
        done = CliRunner().invoke(
            app,
            [
                *("eval", "processbench", "--data", str(data), "--config", str(config), "--out", str(out)),
                *("--cascade", "--tau", "0.2"),
            ],
        )
        prompts = [json.loads(r.body)["prompt"] for r in server.requests]
    assert done.exit_code == 0, done.output
    [line] = read_results(out)
    # The scripted critic's hard labels are sure at a glance: one direct judgement per step.
    assert line["tiers"] == ["direct", "direct"] and line["prediction"] == -1
    assert [c["tier"] for step in line["critiques"] for c in step] == ["direct", "direct"]
    assert line["usage"]["calls"] == 2 and len(prompts) == 2
    assert all(p.endswith("$\\boxed") and "<analyze>" not in p for p in prompts)
    assert "steps decided by tier: direct 2, analysis 0, code 0" in done.stdout
    assert "critic usage over 1 solutions: 2 calls" in done.stdout


def test_eval_refuses_tau_without_the_cascade(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["eval", "processbench", "--data", str(tmp_path), "--tau", "0.2"])
    assert done.exit_code == 2
    assert "--tau tunes the cascade, which is off: add --cascade" in done.stderr
    done = CliRunner().invoke(
        app, ["eval", "processbench", "--data", str(tmp_path), "--cascade", "--tau", "0.7"]
    )
    assert done.exit_code == 2 and "Invalid value for '--tau'" in done.stderr


def test_eval_of_missing_data_says_it_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.json"
    done = CliRunner().invoke(app, ["eval", "processbench", "--data", str(missing)])
    assert done.exit_code == 2
    assert f"--data {missing}: no such file or folder" in done.stderr
    assert "gsm8k.json" not in done.stderr


@pytest.mark.parametrize("option", [["--n", "0"], ["--n", "65"], ["--limit", "0"], ["--concurrency", "0"]])
def test_eval_refuses_counts_out_of_range(tmp_path: Path, option: list[str]) -> None:
    done = CliRunner().invoke(app, ["eval", "processbench", "--data", str(tmp_path), *option])
    assert done.exit_code == 2
    assert f"Invalid value for '{option[0]}'" in done.stderr


def test_eval_refuses_an_unknown_logprob_mode_before_reading_data(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.json"
    done = CliRunner().invoke(
        app, ["eval", "processbench", "--data", str(missing), "--critic-logprobs", "soft"]
    )
    assert done.exit_code == 2
    assert "--critic-logprobs must be raw or processed, not 'soft'" in done.stderr


def test_eval_without_data_and_without_a_hub_says_to_pass_data(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "critloop.cli", "eval", "processbench", "--split", "gsm8k"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Qwen/ProcessBench is not reachable for gsm8k" in done.stderr
    assert "pass --data FILE_OR_FOLDER" in done.stderr
    assert "Traceback" not in done.stderr
