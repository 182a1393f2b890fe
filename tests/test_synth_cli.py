"""``critloop synth`` as a user runs it: every stage on the embedded model with the Docker
sandbox, then ``--resume`` (nothing runs again), and the errors of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from critloop.cli import app

CRITLOOP = str(Path(sys.executable).with_name("critloop"))
APPLES = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@pytest.mark.docker
@pytest.mark.model
def test_synth_run_on_the_embedded_model_makes_every_stage_and_resumes(tmp_path: Path) -> None:
    # A problem the embedded model answers in short steps that stop (GSM8K's run past 100 tokens).
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"id": "apples", "problem": APPLES, "answer": "7"}) + "\n")
    config = tmp_path / "critloop.toml"
    config.write_text(
        "[synth]\npaths = 2\nbatch = 4\nmax_batches = 1\nmax_tokens = 96\npass_samples = 1\n"
        "teacher_samples = 1\nteacher_max_tokens = 96\nteacher_code_runs = 1\n"
        "[synth.rollouts]\nhard = 1\nmedium = 1\neasy = 1\n"
        '[sandbox]\nbackend = "docker"\npool_size = 1\n'
    )
    out = tmp_path / "synth"
    args = [CRITLOOP, "synth", "run", str(data), "--config", str(config), "--out-dir", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {
        stage: [json.loads(line) for line in (out / f"{stage}.jsonl").read_text().splitlines()]
        for stage in ("paths", "mc", "rationales")
    }
    paths, mc, rationales = (records[stage][0] for stage in ("paths", "mc", "rationales"))
    assert paths["error"] is None and paths["id"] == "apples" and paths["gold"] == "7"
    assert paths["samples"] == 4 and paths["usage"]["paths"]["calls"] == 1
    assert len(paths["paths"]) <= 2 and 0.0 <= paths["pass_at_1"] <= 1.0
    # One Pass@1 request, then one per distinct prefix (the paths' steps but their last).
    prefixes = {tuple(p["steps"][:t]) for p in paths["paths"] for t in range(1, len(p["steps"]))}
    assert mc["requests"] == 1 + len(prefixes) and mc["rollouts"] == 1
    for path in rationales["paths"]:
        assert len(path["mc"]) == len(path["labels"]) == len(path["steps"])
        assert path["mc"][-1] == float(path["correct"])
        assert len(path["teacher"]) == 1 and len(path["teacher"][0]["code_runs"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["problems"] == 1 and summary["failed"] == 0 and summary["paths"] == len(rationales["paths"])
    )
    assert summary["kept"] == len((out / "train.jsonl").read_text().splitlines())
    assert "conversations in" in done.stdout and "rationales" in done.stdout
    before = {name: (out / name).read_bytes() for name in ("paths.jsonl", "mc.jsonl", "rationales.jsonl")}
    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: (out / name).read_bytes() for name in before} == before


def test_synth_refuses_bad_input_with_a_clear_error(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        app, ["synth", "mc", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    )
    assert missing.exit_code == 2 and "none.jsonl does not exist" in missing.output
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"id": "a", "problem": "1 + 1?", "answer": "2"}\n')
    wrong = runner.invoke(app, ["synth", "rationales", str(problems), "--out", str(tmp_path / "o.jsonl")])
    # A file of another stage: nothing runs (no model is loaded), the record says why.
    assert wrong.exit_code == 0, wrong.output
    record = json.loads((tmp_path / "o.jsonl").read_text())
    assert record["id"] == "a" and "is not the output of `critloop synth mc`" in record["error"]
