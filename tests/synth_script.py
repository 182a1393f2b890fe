"""A scripted ``critloop synth`` run: a policy whose paths, Pass@1 and prefix completions are
known, and a teacher whose votes are known, so that labels, the kept paths and the conversations
can be computed by hand (``test_synth.py``), and a synthesized training file (``test_train.py``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from model_fixtures import TOKENIZER_DIR

from critloop.agent.teacher import Teacher
from critloop.graphs.batch import Problem
from critloop.graphs.synth import (
    STEP_FORCING,
    RolloutBuckets,
    SynthConfig,
    export_conversations,
    monte_carlo,
    sample_paths,
    teacher_rationales,
)
from critloop.sandbox import SandboxConfig, SandboxPool
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel

PROBLEM = Problem(id="p1", problem="What is 3 * 4 + 2?", gold="14", line=1)
# What the policy writes after "Step 1: ", in the order it is asked: two requests of four.
PATHS = [
    "3 * 4 = 12.\nStep 2: 12 + 2 = 14, so the answer is $\\boxed{14}$.",  # right
    "3 * 4 = 11.\nStep 2: 11 + 2 = 13, so the answer is $\\boxed{13}$.",  # wrong at step 1
    "3 * 4 = 12.\nStep 2: 12 + 2 = 15, so the answer is $\\boxed{15}$.",  # wrong at step 2
    "The answer is $\\boxed{14}$.",  # one step: invalid
    "4 * 3 = 12.\nStep 2: Adding 2 gives $\\boxed{14}$.",  # right
    "3 * 4 = 10.\nStep 2: So $\\boxed{12}$.",  # wrong, but two wrong paths are kept already
    "3 * 4 = 12.\nStep 2: 12 + 2 = 14.",  # no boxed answer: wrong
    "3 * 4 = 12.\nStep 2: 12 + 2 = 14.",
]
# Correct completions out of 4 for each step prefix (K = 4: Pass@1 is 0.5, the medium bucket).
PREFIX_RIGHT = {"3 * 4 = 12.": 3, "4 * 3 = 12.": 4, "3 * 4 = 11.": 0}
# The teacher's three samples' answers (1-based paragraph, -1: none) for each path's first step.
TEACHER_VOTES = {
    ("3 * 4 = 12.", "14"): [-1, -1, 2],  # path 0: agrees with its labels (-1)
    ("4 * 3 = 12.", "14"): [1, 1, -1],  # path 1: says step 1 is wrong, labels say none: dropped
    ("3 * 4 = 11.", "13"): [1, 1, 1],  # path 2: agrees (step 1, index 0)
    ("3 * 4 = 12.", "15"): [2, -1, 7],  # path 3: 2 vs -1, and 7 names no paragraph: no verdict
}
CONFIG = SynthConfig(
    paths=4,
    batch=4,
    pass_samples=10,
    rollouts=RolloutBuckets(hard=8, medium=4, easy=2),
    teacher_samples=3,
)


def policy_script() -> ScriptedCompletionModel:
    """The policy: the paths in order, a Pass@1 of 5 in 10, and completions of each prefix of
    which ``PREFIX_RIGHT`` reach 14."""
    paths = iter(PATHS)
    counts: dict[str, int] = {}

    def reply(prompt: str, params: SamplingParams) -> str:
        if prompt.endswith(STEP_FORCING) and params.n == CONFIG.batch:
            return next(paths)
        counts[prompt] = counts.get(prompt, 0) + 1
        if prompt.endswith(STEP_FORCING):  # the Pass@1 request
            return (
                "3 * 4 = 12.\nStep 2: $\\boxed{14}$." if counts[prompt] <= 5 else "$\\boxed{0}$\nStep 2: no."
            )
        step = prompt.rsplit("Step 1: ", 1)[1].split("\n")[0]
        return "2: So $\\boxed{14}$." if counts[prompt] <= PREFIX_RIGHT[step] else "2: So $\\boxed{9}$."

    return ScriptedCompletionModel(reply, name="policy")


def teacher_script() -> ScriptedCompletionModel:
    """The teacher: per sample, paragraph 1 with code (``print(3 * 4)``), after its output
    paragraph 2 with code (``print(12 + 2)``), after that the sample's answer from
    ``TEACHER_VOTES``."""
    started: dict[tuple[str, str], int] = {}

    def reply(prompt: str, params: SamplingParams) -> str:
        first = prompt.split("<paragraph_1>\n", 1)[1].split("\n", 1)[0]
        answer = prompt.split("<paragraph_2>\n", 1)[1].split("\n", 1)[0].split("boxed{")[-1].split("}")[0]
        if "[Code Output]\n" not in prompt:
            sample = started.get((first, answer), 0)
            started[(first, answer)] = sample + 1
            return (
                f"### Paragraph 1\n<analyze>\nSample {sample}: the paragraph multiplies 3 by 4.\n</analyze>\n"
                "<verify>\n```python\nprint(3 * 4)\n```\n"
            )
        sample = int(prompt.rsplit("Sample ", 1)[1].split(":")[0])
        vote = TEACHER_VOTES[(first, answer)][sample]
        if prompt.count("[Code Output]\n") == 2:
            return f"It prints 14.\n</verify>\nThe earliest error: $\\boxed{{{vote}}}$."
        return (
            "The code prints 12.\n</verify>\n### Paragraph 2\n<analyze>\n"
            f"Sample {sample}: the paragraph adds 2.\n"
            f"</analyze>\n<verify>\n```python\nprint(12 + 2)\n```\n"
        )

    return ScriptedCompletionModel(reply, name="teacher")


async def synthesize(
    pool: SandboxPool,
) -> tuple[list[dict], ScriptedCompletionModel, ScriptedCompletionModel]:
    template = ChatTemplate.from_pretrained(str(TOKENIZER_DIR))
    policy, teacher_model = policy_script(), teacher_script()
    gate = asyncio.Semaphore(8)
    paths = await sample_paths(policy, template, PROBLEM, CONFIG, gate=gate)
    labelled = await monte_carlo(policy, template, paths, CONFIG, gate=gate)
    teacher = Teacher(
        teacher_model, template, sandbox=pool, sampling=SamplingParams(max_tokens=400), samples=3
    )
    return [await teacher_rationales(teacher, labelled)], policy, teacher_model


def write_training_file(out: Path) -> dict:
    """Synthesize the scripted problem's conversations into ``out`` (the local sandbox runs the
    teacher's code); the run's summary."""

    async def run() -> dict:
        async with SandboxPool(SandboxConfig(backend="local", pool_size=1)) as pool:
            records, _, _ = await synthesize(pool)
        return export_conversations(records, out, profile="genprm")

    return asyncio.run(run())
