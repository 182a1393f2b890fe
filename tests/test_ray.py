"""Batch methods on a real Ray cluster: two nodes on this machine (``ray.cluster_utils.Cluster``)
with the scripted model server. A Ray run writes the records of a local run; a node removed
mid-run, a problem that kills its worker, and a driver killed with SIGKILL then resumed leave
every id exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai_script import dataset, kill_when_written, policy_and_critic, policy_and_teacher, scripted_config
from ray_methods import PoisonedMethod
from scripted_server import ScriptedServer
from typer.testing import CliRunner

from critloop.cli import app
from critloop.config import load_config
from critloop.errors import ConfigError
from critloop.graphs.batch import ResultsFile, load_problems, run_method, run_records
from critloop.graphs.cluster import RayOptions, RayWorkers, check_ray_address
from critloop.graphs.processbench import load_processbench, read_results
from critloop.methods import BestOfNMethod, ProcessBenchMethod, RefineMethod

CRITLOOP = str(Path(sys.executable).with_name("critloop"))
TESTS = Path(__file__).parent
PROCESSBENCH = TESTS / "data" / "processbench" / "gsm8k.json"  # see data/SOURCES.md


def wrong_every_third(prompt: str) -> str:
    """A policy that answers 15 to copies 0, 3, 6, ... and 14 to the rest."""
    copy = int(prompt.split("(copy ")[1].split(")")[0]) if "(copy " in prompt else 1
    answer = 15 if copy % 3 == 0 else 14
    return (
        f"Multiply first: 3 * 4 = 12.\n\nThen add: 2 + 12 = {answer}.\n\nThe answer is $\\boxed{{{answer}}}$."
    )


def on_two_workers(args: list[str], cluster: Any) -> subprocess.CompletedProcess[str]:
    """``critloop ARGS`` run on two workers of ``cluster``, as a user runs it."""
    return subprocess.run(
        [CRITLOOP, *args, "--ray", cluster.address, "--ray-workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )


def outcome(records: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """What a run decided per id (not its timings or token counts)."""
    return {
        r["id"]: (r["answer"], r["stop_reason"], r["correct_final"], r["correct_by_round"], r["error"])
        for r in records
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A Ray cluster of two nodes of 2 CPUs each on this machine; its workers import the tests'
    helper modules (``ray_methods``)."""
    from ray.cluster_utils import Cluster

    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), saved["PYTHONPATH"]]))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # The nodes take the address Ray finds for this machine, as the drivers do (loopback in CI,
    # which runs the suite with no other network).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        yield cluster
    finally:
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_ray_flags_and_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    assert check_ray_address("auto") == "auto" and check_ray_address("ray://head:10001")
    assert check_ray_address("10.0.0.5:6379") and check_ray_address("local")
    with pytest.raises(
        ConfigError, match=r"--ray takes local, auto, HOST:PORT or ray://HOST:PORT, not 'x\.jsonl'"
    ):
        check_ray_address("x.jsonl")
    with pytest.raises(ConfigError, match="--ray-workers must be at least 1"):
        RayOptions(workers=0)
    data = dataset(tmp_path, 2)
    runner = CliRunner()
    config = str(scripted_config(tmp_path, "http://127.0.0.1:9"))
    base = ["batch", str(data), "--config", config, "--out", str(tmp_path / "r.jsonl")]
    alone = runner.invoke(app, [*base, "--ray-workers", "2"])
    assert alone.exit_code == 2 and "--ray-workers and --ray-worker-cpus need --ray" in alone.output
    bad = runner.invoke(app, [*base, "--ray", "problems.jsonl"])
    assert bad.exit_code == 2 and "--ray takes local, auto" in bad.output


def test_without_ray_installed_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    method = RefineMethod(config=load_config(scripted_config(tmp_path, "http://127.0.0.1:9")))

    async def run() -> None:
        async with RayWorkers(method, RayOptions(), concurrency=2):
            pass

    with pytest.raises(ConfigError, match=r"--ray needs Ray: pip install 'critloop\[ray\]'"):
        asyncio.run(run())


@pytest.mark.slow
async def test_a_ray_run_writes_the_records_of_a_local_run(tmp_path: Path, cluster: Any) -> None:
    problems, bad = load_problems(dataset(tmp_path, 9))
    on_ray = RayOptions(address=cluster.address)
    with ScriptedServer(default=policy_and_critic(delay=0.05, solution=wrong_every_third)) as server:
        cfg = load_config(scripted_config(tmp_path, server.url))
        for method in (RefineMethod(config=cfg), BestOfNMethod(config=cfg, n=2)):
            name = type(method).__name__
            local, remote = tmp_path / f"{name}-local.jsonl", tmp_path / f"{name}-ray.jsonl"
            await run_method(method, problems, local, bad=bad, concurrency=3)
            await run_method(method, problems, remote, bad=bad, concurrency=3, ray=on_ray)
            here, there = ResultsFile(local).records(), ResultsFile(remote).records()
            assert len(there) == 10 and len({r["id"] for r in there}) == 10, name
            assert outcome(there) == outcome(here), name
            assert {r["answer"] for r in there} == {"14", "15", None}  # None: the broken line
            assert {r["stop_reason"] for r in there} == {"all_steps_pass", "error"}


@pytest.mark.slow
async def test_a_node_removed_mid_run_loses_no_problem_and_repeats_none(tmp_path: Path, cluster: Any) -> None:
    problems, _ = load_problems(dataset(tmp_path, 12, broken=False))
    out = tmp_path / "results.jsonl"
    with ScriptedServer(default=policy_and_critic(delay=0.1, solution=wrong_every_third)) as server:
        cfg = load_config(scripted_config(tmp_path, server.url))
        await run_method(RefineMethod(config=cfg), problems, tmp_path / "local.jsonl", concurrency=4)
        [other] = cluster.worker_nodes
        removal: list[asyncio.Task[None]] = []

        def remove_after_three(record: dict[str, Any]) -> None:
            if len(ResultsFile(out).records()) >= 3 and not removal:
                removal.append(asyncio.ensure_future(asyncio.to_thread(cluster.remove_node, other)))

        async with RayWorkers(
            RefineMethod(config=cfg), RayOptions(address=cluster.address), concurrency=2
        ) as workers:
            assert workers.size == 2 and len(set(workers.hosts)) == 2  # one per node by default
            await run_records(problems, workers.record, out, concurrency=4, on_record=remove_after_three)
            lost = list(workers.losses)
        await asyncio.gather(*removal)
        cluster.add_node(num_cpus=2)  # for the tests after this one
    records = ResultsFile(out).records()
    assert removal and lost, "the node was removed while problems were in flight on it"
    assert sorted(r["id"] for r in records) == sorted(p.id for p in problems)
    assert outcome(records) == outcome(ResultsFile(tmp_path / "local.jsonl").records())


@pytest.mark.slow
async def test_a_problem_that_kills_its_worker_is_recorded_as_an_error_and_the_rest_run(
    tmp_path: Path, cluster: Any
) -> None:
    problems, _ = load_problems(dataset(tmp_path, 6, broken=False))
    out = tmp_path / "results.jsonl"
    with ScriptedServer(default=policy_and_critic()) as server:
        cfg = load_config(scripted_config(tmp_path, server.url))
        method = PoisonedMethod(inner=RefineMethod(config=cfg), poison="q02")
        options = RayOptions(address=cluster.address, workers=2, max_attempts=2)
        # One problem at a time per worker: the poisoned one takes no other problem down with it.
        await run_method(method, problems, out, concurrency=1, ray=options)
    by_id = {r["id"]: r for r in ResultsFile(out).records()}
    assert sorted(by_id) == [p.id for p in problems]
    assert by_id["q02"]["stop_reason"] == "error"
    assert by_id["q02"]["error"].startswith("the Ray workers running it were lost: ")
    assert by_id["q02"]["error"].count("(Actor") == 2  # ActorDiedError or ActorUnavailableError
    assert all(
        r["error"] is None and r["stop_reason"] == "all_steps_pass" for i, r in by_id.items() if i != "q02"
    )


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_on_the_cluster_with_every_id_once(
    tmp_path: Path, cluster: Any
) -> None:
    data = dataset(tmp_path, 12)
    out = tmp_path / "results.jsonl"
    with ScriptedServer(default=policy_and_critic(delay=0.1, solution=wrong_every_third)) as server:
        config = scripted_config(tmp_path, server.url)
        args = [CRITLOOP, "batch", str(data), "--config", str(config), "--out", str(out)]
        args += ["--concurrency", "2", "--ray", cluster.address]
        before = kill_when_written(args, out)
        done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes().startswith(before[: before.rfind(b"\n") + 1])  # finished lines unchanged
    records = ResultsFile(out).records()
    assert sorted(r["id"] for r in records) == sorted([f"q{i:02d}" for i in range(12)] + ["problems:13"])
    # What a run of these problems gives (a local run gives the same: the first test): copies
    # 0, 3, 6 and 9 answer 15, the others 14; q01's gold is 15.
    answers = {f"q{i:02d}": "15" if i % 3 == 0 else "14" for i in range(12)}
    by_id = {r["id"]: r for r in records}
    assert {i: by_id[i]["answer"] for i in answers} == answers
    assert [i for i in answers if by_id[i]["correct_final"]] == [
        i for i, answer in answers.items() if answer == ("15" if i == "q01" else "14")
    ]
    assert {by_id[i]["stop_reason"] for i in answers} == {"all_steps_pass"}
    assert by_id["problems:13"]["stop_reason"] == "error"
    assert f"on Ray ({cluster.address})" in done.stderr


@pytest.mark.slow
def test_processbench_on_the_cluster_gives_the_lines_of_a_local_run(tmp_path: Path, cluster: Any) -> None:
    records = load_processbench(PROCESSBENCH)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": r.id, "problem": r.problem, "steps": list(r.steps), "label": r.label}) + "\n"
            for r in records
        )
    )
    config = tmp_path / "critloop.toml"
    runner = CliRunner()
    with ScriptedServer(default=policy_and_critic()) as server:
        config = scripted_config(tmp_path, server.url)
        common = ["eval", "processbench", "--data", str(data), "--config", str(config)]
        here = runner.invoke(app, [*common, "--out", str(tmp_path / "here.jsonl")])
        there = on_two_workers([*common, "--out", str(tmp_path / "there.jsonl")], cluster)
    assert here.exit_code == 0, here.output
    assert there.returncode == 0, there.stderr[-3000:]

    def lines(name: str) -> dict[str, Any]:
        return {
            r["id"]: (r["prediction"], r["step_rewards"], r["error"]) for r in read_results(tmp_path / name)
        }

    assert lines("there.jsonl") == lines("here.jsonl") and len(lines("there.jsonl")) == len(records) == 3
    assert "F1 gsm8k" in there.stdout
    assert ProcessBenchMethod(config=load_config(config)).record_key({"split": "gsm8k", "id": "x"}) == (
        "gsm8k",
        "x",
    )


@pytest.mark.slow
def test_the_readme_example_runs_on_a_local_ray_instance(tmp_path: Path) -> None:
    """The README's Python example, as written, in a folder holding its files: a Ray instance
    of its own (``local``), even beside the module's cluster."""
    readme = (TESTS.parent / "README.md").read_text()
    [code] = [
        block for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "RayOptions(" in block
    ]
    dataset(tmp_path, 4)
    with ScriptedServer(default=policy_and_critic()) as server:
        scripted_config(tmp_path, server.url)
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    assert done.returncode == 0, done.stderr[-3000:]
    records = ResultsFile(tmp_path / "results.jsonl").records()
    assert sorted(r["id"] for r in records) == ["problems:5", "q00", "q01", "q02", "q03"]
    assert [r["correct_final"] for r in sorted(records, key=lambda r: r["id"])] == [
        False,
        True,
        False,
        True,
        True,
    ]


@pytest.mark.slow
def test_synth_on_the_cluster_writes_the_records_of_a_local_run(tmp_path: Path, cluster: Any) -> None:
    """``critloop synth run --ray``: every stage on two workers, the same records as here."""
    data = dataset(tmp_path, 4, broken=False)
    runner = CliRunner()
    with ScriptedServer(default=policy_and_teacher()) as server:
        config = scripted_config(tmp_path, server.url)
        config.write_text(
            config.read_text()
            + "[synth]\npaths = 2\nbatch = 2\npass_samples = 4\nteacher_samples = 2\n"
            + "[synth.rollouts]\nhard = 2\nmedium = 2\neasy = 2\n"
        )
        common = ["synth", "run", str(data), "--config", str(config)]
        here = runner.invoke(app, [*common, "--out-dir", str(tmp_path / "here")])
        there = on_two_workers([*common, "--out-dir", str(tmp_path / "there")], cluster)
    assert here.exit_code == 0, here.output
    assert there.returncode == 0, there.stderr[-3000:]

    def records(folder: str, stage: str) -> dict[str, Any]:
        return {r["id"]: r for r in ResultsFile(tmp_path / folder / f"{stage}.jsonl").records()}

    for stage in ("paths", "mc", "rationales"):
        assert records("there", stage) == records("here", stage) and len(records("here", stage)) == 4
    labelled = records("here", "mc")["q00"]
    # Half the completions right: Pass@1 0.5; MC 0.5 after step 1; the wrong path's last step 0.
    assert labelled["completer_pass_at_1"] == 0.5 and labelled["requests"] == 2
    assert [p["labels"] for p in labelled["paths"]] == [[1, 1], [1, 0]]
    assert (tmp_path / "there" / "train.jsonl").read_bytes() == (
        tmp_path / "here" / "train.jsonl"
    ).read_bytes()
    assert json.loads((tmp_path / "there" / "summary.json").read_text())["kept"] == 4  # the right paths
