"""The labels of GenPRM's training data: Relative Progress Estimation from Monte Carlo scores,
the teacher's verdict, the consensus filter and the rollout buckets (``critloop.graphs.synth``)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
from model_fixtures import TOKENIZER_DIR
from pydantic import ValidationError
from synth_script import PROBLEM, synthesize

from critloop.agent import teacher as teacher_module
from critloop.agent.critic import CriticConfig, GenPRMCritic
from critloop.agent.critic_protocol import SYSTEM_PROMPT
from critloop.errors import ConfigError
from critloop.graphs import synth
from critloop.graphs.synth import (
    STEP_FORCING,
    RolloutBuckets,
    agrees,
    export_conversations,
    first_error,
    rollouts_for,
    rpe_labels,
    teacher_verdict,
)
from critloop.sandbox import SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel


def test_the_worked_examples_in_the_docstrings_hold() -> None:
    results = doctest.testmod(synth, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 10 and results.failed == 0
    results = doctest.testmod(teacher_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 3 and results.failed == 0


@pytest.mark.parametrize(
    ("mc", "pass_at_1", "expected"),
    [
        # Hand-computed: ratios 0.8 (exactly the threshold: kept), 0.75, 1.0, then a dead end.
        ([0.4, 0.3, 0.3, 0.0], 0.5, [1, 0, 1, 0]),
        ([1.0, 1.0, 1.0], 1.0, [1, 1, 1]),
        ([0.0, 1.0], 0.7, [0, 0]),
        ([], 0.5, []),
    ],
)
def test_rpe_labels_by_hand(mc: list[float], pass_at_1: float, expected: list[int]) -> None:
    assert rpe_labels(mc, pass_at_1) == expected


def test_the_threshold_moves_the_labels_and_the_first_error() -> None:
    mc = [0.45, 0.3, 0.29]
    assert rpe_labels(mc, 0.5) == [1, 0, 1] and first_error(rpe_labels(mc, 0.5)) == 1
    assert rpe_labels(mc, 0.5, threshold=0.6) == [1, 1, 1] and first_error([1, 1, 1]) == -1


def test_bad_scores_and_modes_name_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"mc\[1\] must lie in \[0, 1\], not 1.5"):
        rpe_labels([0.5, 1.5], 0.5)
    with pytest.raises(ConfigError, match=r"pass_at_1 must lie in \[0, 1\], not -0.1"):
        rpe_labels([0.5], -0.1)
    with pytest.raises(ConfigError, match="mode must be ratio or difference, not 'log'"):
        rpe_labels([0.5], 0.5, mode="log")  # type: ignore[arg-type]


def test_the_consensus_keeps_only_paths_whose_first_error_the_teacher_names() -> None:
    assert teacher_verdict([1, 1, 3, None]) == 1
    assert teacher_verdict([1, 3]) is None  # a tie is no verdict
    assert agrees([1, 0, 1], [1, 1, 1, 1]) and not agrees([1, 0, 1], [2, 2, 2, 2])
    assert agrees([1, 1, 1], [-1, -1, 0, -1])
    assert not agrees([1, 1], [None, None, None, None])


def test_rollout_buckets_follow_pass_at_1_and_refuse_nonsense() -> None:
    assert [rollouts_for(p) for p in (0.0, 0.099, 0.1, 0.5, 0.899, 0.9, 1.0)] == [
        128,
        128,
        64,
        64,
        64,
        32,
        32,
    ]
    custom = RolloutBuckets(hard=16, medium=8, easy=4)
    assert (rollouts_for(0.05, custom), rollouts_for(0.5, custom), rollouts_for(0.95, custom)) == (16, 8, 4)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RolloutBuckets(easy=0)
    with pytest.raises(ValidationError, match="hard_below <= medium_below"):
        RolloutBuckets(hard_below=0.95, medium_below=0.9)


# --------------------------------------------------------------------------- the stages, scripted


async def test_the_stages_label_filter_and_write_conversations(
    local_pool: SandboxPool, tmp_path: Path
) -> None:
    records, policy, _ = await synthesize(local_pool)
    record = records[0]
    # paths: two requests of 4; two right and two wrong paths kept, the one-step path invalid.
    assert [p["steps"][0] for p in record["paths"]] == [
        "3 * 4 = 12.",
        "4 * 3 = 12.",
        "3 * 4 = 11.",
        "3 * 4 = 12.",
    ]
    assert [p["correct"] for p in record["paths"]] == [True, True, False, False]
    assert (record["samples"], record["invalid"], record["balanced"]) == (8, 1, True)
    # Pass@1 counts every sample: 0, 3 (invalid as a path, but its answer is right) and 4.
    assert record["pass_at_1"] == 3 / 8
    # mc: Pass@1 5/10 -> K = 4; one request for Pass@1 and one per distinct prefix (3, not 4).
    assert (record["completer_pass_at_1"], record["rollouts"], record["requests"]) == (0.5, 4, 4)
    prefix_calls = [params.n for prompt, params in policy.calls if not prompt.endswith(STEP_FORCING)]
    assert prefix_calls == [4, 4, 4]
    # MC and labels, by hand: MC_0 = 0.5; 0.75 / 0.5 = 1.5 and 1 / 0.75 >= 0.8; 0 is a dead end.
    assert [p["mc"] for p in record["paths"]] == [[0.75, 1.0], [1.0, 1.0], [0.0, 0.0], [0.75, 0.0]]
    assert [p["labels"] for p in record["paths"]] == [[1, 1], [1, 1], [0, 0], [1, 0]]
    assert [p["first_error"] for p in record["paths"]] == [-1, -1, 0, 1]
    # rationales: the votes (0-based; 7 names no paragraph) and verdicts.
    assert [p["votes"] for p in record["paths"]] == [[-1, -1, 1], [0, 0, -1], [0, 0, 0], [1, -1, None]]
    assert [p["verdict"] for p in record["paths"]] == [-1, 0, 0, None]
    assert record["code_runs"] == 24 and all(
        s["code_runs"][0]["output"] == "12" for p in record["paths"] for s in p["teacher"]
    )

    out = tmp_path / "train.jsonl"
    summary = export_conversations(records, out, profile="genprm")
    assert summary["kept"] == 2 and summary["kept_fraction"] == 0.5
    assert summary["dropped"] == {"disagree": 1, "no_verdict": 1}
    assert summary["step_labels"] == {"1": 5, "0": 3}
    assert summary["stages"]["mc"]["calls"] == 4 and summary["stages"]["rationales"]["calls"] == 36
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["id"] for c in lines] == ["p1/0", "p1/2"]
    code = "```python\nprint(3 * 4)\n```\n[Code Output]\n\n```\n12\n```\nThe code prints 12."
    assert lines[0]["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is 3 * 4 + 2?\n3 * 4 = 12."},
        {
            "role": "assistant",
            "content": "<analyze>\nLet's analyze the Paragraph 1 step by step: "
            "Sample 0: the paragraph multiplies "
            "3 by 4.\n</analyze>\n<verify>\nLet's use python code to find any potential error:\n"
            f"{code}\n</verify>\n<output>\n**Judgement**: $\\boxed{{Yes}}$\n</output>\n",
        },
        {"role": "user", "content": "12 + 2 = 14, so the answer is $\\boxed{14}$."},
        {
            "role": "assistant",
            "content": "<analyze>\nLet's analyze the Paragraph 2 step by step: "
            "Sample 0: the paragraph adds 2.\n</analyze>\n<verify>\n"
            "Let's use python code to find any potential error:\n```python\nprint(12 + 2)\n"
            "```\n[Code Output]\n\n```\n14\n```\nIt prints 14.\n</verify>\n"
            "<output>\n**Judgement**: $\\boxed{Yes}$\n"
            "</output>\n",
        },
    ]
    # The wrong path stops at its first error, judged No.
    assert len(lines[1]["messages"]) == 3
    assert lines[1]["messages"][2]["content"].endswith("$\\boxed{No}$\n</output>\n")


async def test_a_conversation_is_byte_for_byte_what_the_critic_sends(
    local_pool: SandboxPool, tmp_path: Path
) -> None:
    """The critic, replaying a conversation's critiques as its model's output, sends exactly the
    rendered conversation up to each step, and writes exactly each assistant turn."""
    records, _, _ = await synthesize(local_pool)
    export_conversations(records, tmp_path / "train.jsonl", profile="genprm")
    template = ChatTemplate.from_pretrained(str(TOKENIZER_DIR))
    for line in (tmp_path / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        critiques = [m["content"] for m in messages if m["role"] == "assistant"]
        steps = [m["content"] for m in messages if m["role"] == "user"]
        steps[0] = steps[0].removeprefix(PROBLEM.problem + "\n")
        sent: list[str] = []

        def replay(
            prompt: str, params: SamplingParams, critiques: list[str] = critiques, sent: list[str] = sent
        ) -> str:
            at = prompt.rfind("<analyze>\nLet's analyze the Paragraph ")
            k = int(prompt[at:].split("Paragraph ", 1)[1].split(" ", 1)[0])
            if len(sent) < k:
                sent.append(prompt[:at])
            written = prompt[at:]
            assert critiques[k - 1].startswith(written)
            return critiques[k - 1][len(written) :]

        critic = GenPRMCritic(
            ScriptedCompletionModel(replay),
            template,
            local_pool,
            CriticConfig(profile="genprm", code_rounds=3),
        )
        report = await critic.critique(PROBLEM.problem, steps, scan="all")
        for k in range(1, len(steps) + 1):
            assert sent[k - 1] == template.render(messages[: 2 * k])
            assert report.step_reports[k - 1].chains[0].text == messages[2 * k]["content"]
        labels = ["Yes" in c.rsplit("boxed", 1)[1] for c in critiques]
        assert [s.verdicts["yes"] == 1 for s in report.step_reports] == labels
