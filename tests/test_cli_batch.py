"""``critloop batch``, ``bon`` and ``report`` as subprocesses against a real HTTP server, a crash
(SIGKILL) and ``--resume``, and an end-to-end batch on the embedded model; ``models complete``
against the same server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from model_fixtures import TOKENIZER_DIR
from openai_script import completion, dataset, kill_when_written, policy_and_critic, scripted_config
from scripted_server import Recorded, Reply, ScriptedServer
from typer.testing import CliRunner

from critloop.cli import app

CRITLOOP = str(Path(sys.executable).with_name("critloop"))
GSM8K = Path(__file__).parent / "data" / "problems" / "gsm8k_test.jsonl"  # see data/SOURCES.md


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


@pytest.mark.slow
def test_a_killed_batch_resumes_with_every_id_once_and_finished_records_untouched(tmp_path: Path) -> None:
    data = dataset(tmp_path, 12)
    out = tmp_path / "results.jsonl"
    with ScriptedServer(default=policy_and_critic(delay=0.05)) as server:
        config = scripted_config(tmp_path, server.url)
        args = [
            CRITLOOP,
            "batch",
            str(data),
            "--config",
            str(config),
            "--out",
            str(out),
            "--concurrency",
            "2",
        ]
        before = kill_when_written(args, out)
        done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    after = out.read_bytes()
    finished = before[: before.rfind(b"\n") + 1]  # a line torn by the kill is not a record
    assert after.startswith(finished)
    records = [json.loads(line) for line in lines(out)]
    assert all(line.endswith(b"\n") for line in lines(out))
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted([f"q{i:02d}" for i in range(12)] + ["problems:13"])
    by_id = {r["id"]: r for r in records}
    assert by_id["problems:13"]["error"].startswith("problems.jsonl line 13: not valid JSON")
    assert by_id["q00"]["correct_final"] is True and by_id["q01"]["correct_final"] is False
    unfinished = {r["id"]: (r["stop_reason"], r["error"]) for r in records if r["id"] != "problems:13"}
    assert {reason for reason, _ in unfinished.values()} == {"all_steps_pass"}, [
        u for u in unfinished.values() if u[1]
    ]
    assert "accuracy" in done.stdout.lower()
    assert (tmp_path / "results.report.md").is_file() and (
        tmp_path / "results.accuracy.png"
    ).stat().st_size > 1000


def test_batch_input_errors_exit_2_and_name_the_problem(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r.jsonl")])
    assert missing.exit_code == 2 and "none.jsonl: no such file" in missing.output
    out = tmp_path / "r.jsonl"
    out.write_text('{"id": "x"}\n')
    # Endpoints that are never called: the embedded default would fetch the model before the check.
    config = str(scripted_config(tmp_path, "http://127.0.0.1:9"))
    taken = runner.invoke(app, ["batch", str(dataset(tmp_path, 2)), "--config", config, "--out", str(out)])
    assert taken.exit_code == 2 and "already holds results" in taken.output


@pytest.mark.slow
def test_bon_and_report_on_a_scripted_server(tmp_path: Path) -> None:
    data = dataset(tmp_path, 3, broken=False)
    out = tmp_path / "bon.jsonl"
    with ScriptedServer(default=policy_and_critic()) as server:
        config = scripted_config(tmp_path, server.url)
        args = ["bon", str(data), "--config", str(config), "--out", str(out), "--n", "2"]
        done = subprocess.run([CRITLOOP, *args], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in lines(out)]
    assert [r["method"] for r in records] == ["best_of_n"] * 3
    assert [r["correct_final"] for r in sorted(records, key=lambda r: r["id"])] == [True, False, True]
    assert "majority vote over the 2 samples: 66.7%" in done.stdout
    # report: one file re-rendered into a folder, then two files compared.
    runner = CliRunner()
    folder = tmp_path / "again"
    single = runner.invoke(app, ["report", str(out), "--out", str(folder)])
    assert single.exit_code == 0, single.output
    assert (folder / "bon.report.md").is_file() and (folder / "bon.rewards.png").is_file()
    other = tmp_path / "other.jsonl"
    other.write_bytes(out.read_bytes())
    both = runner.invoke(app, ["report", str(out), str(other), "--out", str(tmp_path / "cmp")])
    assert both.exit_code == 0, both.output
    assert (tmp_path / "cmp.md").is_file() and (tmp_path / "cmp.png").stat().st_size > 1000
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert runner.invoke(app, ["report", str(empty)]).exit_code == 2


@pytest.mark.docker
@pytest.mark.model
def test_a_batch_on_the_embedded_model_with_the_docker_sandbox(tmp_path: Path) -> None:
    data = tmp_path / "gsm8k.jsonl"  # the first two GSM8K problems: golds 18 and 3
    data.write_text("".join(GSM8K.read_text().splitlines(keepends=True)[:2]))
    config = tmp_path / "critloop.toml"
    config.write_text(
        "[policy]\nmax_tokens = 128\n[critic]\nsamples = 1\nmax_critique_tokens = 128\ncode_rounds = 1\n"
        "forced_judgement_tokens = 8\n[budget]\nmax_rounds = 1\n[refine]\nmax_step_tokens = 64\n"
        '[sandbox]\nbackend = "docker"\npool_size = 1\n'
    )
    out = tmp_path / "results.jsonl"
    args = [CRITLOOP, "batch", str(data), "--config", str(config), "--out", str(out), "--concurrency", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1500, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in lines(out)]
    assert sorted(r["id"] for r in records) == ["gsm8k:1", "gsm8k:2"]
    for record in records:
        assert record["error"] is None, record["error"]
        assert record["gold"] in ("18", "3")
        assert isinstance(record["correct_initial"], bool) and isinstance(record["correct_final"], bool)
        assert record["usage"]["critic"]["calls"] >= 1 and len(record["rounds"]) <= 1
    assert (tmp_path / "results.report.md").is_file()


def test_models_complete_sends_the_flags_to_the_endpoint_of_the_role_asked(tmp_path: Path) -> None:
    def reply(request: Recorded) -> Reply:
        return Reply(200, completion("4", None, json.loads(request.body)["prompt"]))

    runner = CliRunner()
    config = tmp_path / "critloop.toml"
    with ScriptedServer(default=reply) as server:
        endpoint = f'kind = "openai"\nbase_url = "{server.url}/v1"\ntokenizer = "{TOKENIZER_DIR}"\n'
        args = ["models", "complete", "2 + 2 =", "--config", str(config), "--role", "refiner"]
        # With a [refiner] table the refiner has its own endpoint: the flags set that one.
        config.write_text(f'[policy]\n{endpoint}model = "p"\n[refiner]\n{endpoint}model = "r"\n')
        done = runner.invoke(app, [*args, "--model", "chosen"])
        assert done.exit_code == 0, done.output
        assert done.stdout == "4\n"
        assert json.loads(server.requests[-1].body)["model"] == "chosen"
        # Without one the refiner is the policy's endpoint, which the flags set then.
        config.write_text(f'[policy]\n{endpoint}model = "p"\n')
        done = runner.invoke(app, [*args, "--model", "also chosen"])
        assert done.exit_code == 0, done.output
        assert json.loads(server.requests[-1].body)["model"] == "also chosen"
        requests = len(server.requests)
        wrong = runner.invoke(app, [*args[:-1], "judge"])
    assert wrong.exit_code == 2 and "--role must be policy, critic or refiner, not 'judge'" in wrong.stderr
    assert len(server.requests) == requests
