"""GenPRM-style training data: the labels of solution steps from Monte Carlo rollouts (Relative
Progress Estimation), and the consensus of those labels with a teacher's critique.

A step's Monte Carlo score MC_t is the fraction of completions from the solution's first t steps
that reach the right answer; MC_0 is the problem's Pass@1. Relative Progress Estimation labels a
step by how much of the previous prefix's chance it keeps, P_t = MC_t / MC_(t-1): label 1 when
P_t >= threshold (0.8 in the GenPRM paper). A path is kept for training when the first step
labelled 0 agrees with the earliest wrong step a teacher model names (the consensus filter).

Step indices here are 0-based, and -1 means "no wrong step", as in ProcessBench.

Example:
    >>> rpe_labels([0.6, 0.55, 0.1, 0.0], pass_at_1=0.5)
    [1, 1, 0, 0]
    >>> first_error([1, 1, 0, 0])
    2
    >>> rollouts_for(0.05), rollouts_for(0.5), rollouts_for(0.95)
    (128, 64, 32)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from critloop.agent.critic_protocol import (
    DEFAULT_FIRST_STEP_FORMAT,
    CriticProfile,
    conversation,
    finished_critique,
)
from critloop.agent.policy import REASON_INSTRUCTION
from critloop.agent.steps import extract_answer
from critloop.agent.teacher import Teacher, rationales
from critloop.errors import ConfigError, ModelError
from critloop.graphs._results import ResultsFile
from critloop.tools.chat_template import ChatMessage, ChatTemplate
from critloop.tools.completion import Completion, CompletionModel, ModelUsage, SamplingParams
from critloop.tools.endpoint import EndpointConfig
from critloop.tools.grading import agrade
from critloop.tools.tracing import traced_complete

if TYPE_CHECKING:
    from critloop.graphs.batch import Problem

__all__ = [
    "STAGES",
    "STEP_FORCING",
    "DropReason",
    "LabelMode",
    "RolloutBuckets",
    "Stage",
    "StageItem",
    "SynthConfig",
    "agrees",
    "failed_record",
    "first_error",
    "forced_prefix",
    "load_stage",
    "monte_carlo",
    "rollouts_for",
    "rpe_labels",
    "sample_paths",
    "split_forced",
    "summarize",
    "teacher_rationales",
    "teacher_verdict",
    "training_conversations",
]

LabelMode = Literal["ratio", "difference"]
"""How a step's progress is measured against the previous prefix:

- ``ratio``: P_t = MC_t / MC_(t-1), the paper's Relative Progress Estimation.
- ``difference``: MC_t - MC_(t-1), an absolute change (its threshold is usually at or below 0).
"""


def rpe_labels(
    mc: Sequence[float], pass_at_1: float, *, threshold: float = 0.8, mode: LabelMode = "ratio"
) -> list[int]:
    """The label (1: the step keeps the solution on track, 0: it does not) of every step.

    Args:
        mc: MC_1 ... MC_T, the Monte Carlo score of each step prefix (fractions in [0, 1]; the
            last one is usually the path's own answer graded, 1.0 or 0.0).
        pass_at_1: MC_0, the problem's Pass@1 under the completer.
        threshold: a step's label is 1 when its progress is at least this.
        mode: ``ratio`` (the paper's) or ``difference`` (see :data:`LabelMode`).

    Once a prefix's MC reaches 0, that step and every later one are labelled 0: nothing after a
    dead end counts as progress (a ratio over 0 is 0, whatever the later MCs are).

    Raises:
        ConfigError: an MC or ``pass_at_1`` outside [0, 1], or an unknown ``mode``.

    Examples:
        The chance halves at step 3 (0.5 -> 0.25 is a ratio of 0.5 < 0.8):

        >>> rpe_labels([0.5, 0.5, 0.25, 0.25], pass_at_1=0.5)
        [1, 1, 0, 1]

        A step may raise the chance above the problem's Pass@1 (a ratio over 1):

        >>> rpe_labels([0.9, 1.0], pass_at_1=0.3)
        [1, 1]

        After an MC of 0 every step is 0, even one whose own MC recovers:

        >>> rpe_labels([0.4, 0.0, 0.5], pass_at_1=0.5)
        [1, 0, 0]

        A problem the completer never solves gives no step a chance to keep:

        >>> rpe_labels([0.25, 0.5], pass_at_1=0.0)
        [0, 0]

        The difference variant, with its own threshold (a drop of at most 0.1 is kept):

        >>> rpe_labels([0.5, 0.45, 0.2], pass_at_1=0.5, threshold=-0.1, mode="difference")
        [1, 1, 0]
    """
    if mode not in get_args(LabelMode):
        raise ConfigError(f"mode must be {' or '.join(get_args(LabelMode))}, not {mode!r}")
    for name, value in (("pass_at_1", pass_at_1), *((f"mc[{i}]", v) for i, v in enumerate(mc))):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must lie in [0, 1], not {value!r}")
    labels: list[int] = []
    previous = pass_at_1
    for current in mc:
        if previous == 0.0 or current == 0.0:
            labels.append(0)
            previous = 0.0  # a dead end: every later step is 0 too
            continue
        progress = current / previous if mode == "ratio" else current - previous
        labels.append(int(progress >= threshold))
        previous = current
    return labels


def first_error(labels: Sequence[int]) -> int:
    """The 0-based index of the first step labelled 0, or -1 when every step is 1.

    >>> first_error([1, 0, 1]), first_error([1, 1])
    (1, -1)
    """
    return next((i for i, label in enumerate(labels) if label == 0), -1)


def teacher_verdict(votes: Sequence[int | None]) -> int | None:
    """The teacher's earliest wrong step: the index most of its samples named (0-based, -1 for
    "no wrong step"); None when no index has more votes than every other, or no sample gave one
    (a sample whose answer could not be read votes None).

    >>> teacher_verdict([2, 2, -1, None]), teacher_verdict([2, -1]), teacher_verdict([None])
    (2, None, None)
    """
    counts = Counter(vote for vote in votes if vote is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def agrees(labels: Sequence[int], votes: Sequence[int | None]) -> bool:
    """Whether the consensus filter keeps a path: its RPE labels' first error equals the
    teacher's verdict (see :func:`teacher_verdict`; no verdict keeps nothing).

    >>> agrees([1, 0, 0], [1, 1, 2, 1]), agrees([1, 1], [-1, -1, 0, -1]), agrees([1, 0], [0, 0])
    (True, True, False)
    """
    verdict = teacher_verdict(votes)
    return verdict is not None and verdict == first_error(labels)


class RolloutBuckets(BaseModel):
    """How many Monte Carlo completions each step prefix gets, by the problem's Pass@1 (the
    paper's buckets: hard problems need more rollouts to see a rare success)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hard: int = Field(default=128, ge=1, le=256)
    """Rollouts when Pass@1 is below :attr:`hard_below`."""
    hard_below: float = Field(default=0.1, ge=0, le=1)
    medium: int = Field(default=64, ge=1, le=256)
    """Rollouts when Pass@1 is below :attr:`medium_below` (and not hard)."""
    medium_below: float = Field(default=0.9, ge=0, le=1)
    easy: int = Field(default=32, ge=1, le=256)
    """Rollouts otherwise."""

    @model_validator(mode="after")
    def _ordered(self) -> RolloutBuckets:
        if self.hard_below > self.medium_below:
            raise ValueError("the bucket bounds must satisfy hard_below <= medium_below")
        return self


def rollouts_for(pass_at_1: float, buckets: RolloutBuckets | None = None) -> int:
    """K, the completions per step prefix of a problem with this Pass@1 (the paper's buckets
    unless ``buckets`` says otherwise).

    >>> rollouts_for(0.0), rollouts_for(0.1), rollouts_for(0.9)
    (128, 64, 32)
    """
    buckets = buckets or RolloutBuckets()
    if pass_at_1 < buckets.hard_below:
        return buckets.hard
    if pass_at_1 < buckets.medium_below:
        return buckets.medium
    return buckets.easy


# --------------------------------------------------------------------------- the stages


class SynthConfig(BaseModel):
    """The ``[synth]`` table: how ``critloop synth`` makes training data. The policy's endpoint
    samples the paths and completes the prefixes; the teacher writes the rationales.

    Example:
        >>> SynthConfig(paths=8).batch, SynthConfig().rollouts.hard
        (16, 128)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    paths: int = Field(default=16, ge=2, le=256)
    """n: paths wanted per problem, n/2 correct and n/2 incorrect."""
    batch: int = Field(default=16, ge=1, le=256)
    """Paths sampled per request (one request with ``n`` of this)."""
    temperature: float = Field(default=0.7, ge=0)
    """Sampling temperature of the paths, of the Pass@1 estimate and of the completions."""
    max_batches: int = Field(default=4, ge=1)
    """Requests per problem at most while the paths are not balanced."""
    max_tokens: int = Field(default=1024, ge=16)
    """The limit of one path or completion; a path cut at it is invalid."""
    pass_samples: int = Field(default=32, ge=1, le=256)
    """Completions of the problem itself that estimate the completer's Pass@1 (MC_0)."""
    rollouts: RolloutBuckets = Field(default_factory=RolloutBuckets)
    """K, the completions of each step prefix, by Pass@1."""
    threshold: float = 0.8
    """A step's label is 1 when its progress is at least this (see :func:`rpe_labels`)."""
    label_mode: LabelMode = "ratio"
    """``ratio`` (the paper's Relative Progress Estimation) or ``difference``."""
    teacher: EndpointConfig | None = None
    """The model that writes the rationales (QwQ-32B in the paper); None: the policy's endpoint."""
    teacher_samples: int = Field(default=4, ge=1, le=32)
    """Independent critiques of each path by the teacher; their majority is its verdict."""
    teacher_max_tokens: int = Field(default=4096, ge=64)
    """The limit of one teacher critique, the code outputs fed back included."""
    teacher_code_runs: int = Field(default=16, ge=0)
    """Code blocks run at most per teacher critique."""


STEP_FORCING = "Step 1: "
"""How every path's assistant turn starts: the model writes ``Step N: `` steps, one per line."""
_STEP_LABEL = re.compile(r"^\d+\s*[:.]\s*")
_ANSWERLESS = "no gold answer: synth grades paths against it (see --answer-field)"


def split_forced(text: str) -> list[str]:
    """The steps of a step-forced solution (``Step 1: ...\\nStep 2: ...``), labels removed.

    >>> split_forced("Step 1: 3 * 4 = 12.\\nStep 2: So $\\\\boxed{12}$.")
    ['3 * 4 = 12.', 'So $\\\\boxed{12}$.']
    """
    parts = text.removeprefix(STEP_FORCING.strip()).split("\nStep ")
    steps = [
        _STEP_LABEL.sub("", part.strip(), count=1).strip() if i else part.strip()
        for i, part in enumerate(parts)
    ]
    return [step for step in steps if step]


def forced_prefix(steps: Sequence[str]) -> str:
    """The assistant text of a path's first ``len(steps)`` steps, ready for the next step's
    number: ``Step 1: a\\nStep 2: b\\nStep `` (``Step 1: `` alone for no steps)."""
    return "".join(f"Step {k}: {step}\nStep " for k, step in enumerate(steps, 1)) + (
        "" if steps else STEP_FORCING
    )


class _Sampler:
    """The policy's model as the stages call it: step-forced prompts, the caller's limit of
    requests in flight, and the usage it adds up."""

    def __init__(
        self, model: CompletionModel, template: ChatTemplate, config: SynthConfig, gate: asyncio.Semaphore
    ):
        self.model, self.template, self.config, self.gate = model, template, config, gate
        self.usage = ModelUsage()

    def prompt(self, problem: str) -> str:
        turn: ChatMessage = {"role": "user", "content": f"{problem}\n{REASON_INSTRUCTION}"}
        return self.template.render([turn], add_generation_prompt=True)

    async def sample(self, prompt: str, n: int) -> tuple[Completion, ...]:
        params = SamplingParams(max_tokens=self.config.max_tokens, temperature=self.config.temperature, n=n)
        async with self.gate:
            try:
                result = await traced_complete(self.model, prompt, params, role="policy")
            except ModelError as error:
                error.role = error.role or "policy"
                raise
        self.usage += ModelUsage(
            calls=1, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
        )
        return result.choices

    async def correct(self, completions: Sequence[Completion], prefix: str, gold: str) -> list[bool]:
        """Whether each completion of ``prefix`` stopped and reached ``gold`` (its last
        ``\\boxed{}``, else the prefix's)."""
        before = extract_answer(prefix)
        grades: dict[str | None, bool] = {}  # n samples often agree: grade each answer once
        right = []
        for completion in completions:
            answer = extract_answer(completion.text) or before
            if answer not in grades:
                grades[answer] = await agrade(answer, gold)
            right.append(completion.finish_reason == "stop" and grades[answer])
        return right


def _usage(usage: ModelUsage) -> dict[str, int]:
    return {
        "calls": usage.calls,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


def failed_record(record: dict[str, Any], error: str) -> dict[str, Any]:
    """The record of a problem a stage could not make: what identifies it, and why."""
    return {
        "id": record.get("id"),
        "problem": record.get("problem"),
        "gold": record.get("gold"),
        "error": error,
    }


async def sample_paths(
    model: CompletionModel,
    template: ChatTemplate,
    problem: Problem,
    config: SynthConfig,
    *,
    gate: asyncio.Semaphore,
) -> dict[str, Any]:
    """The ``paths`` stage for one problem: step-forced solutions, ``config.batch`` per request,
    until ``config.paths / 2`` correct and as many incorrect valid paths exist or
    ``config.max_batches`` requests were made. A path is valid when it stopped and has at least
    two steps. The record keeps at most ``paths / 2`` of each; Pass@1 counts every sample (an
    invalid one is wrong)."""
    base = {"id": problem.id, "problem": problem.problem, "gold": problem.gold}
    if problem.gold is None:
        return failed_record(base, _ANSWERLESS)
    sampler = _Sampler(model, template, config, gate)
    prompt = sampler.prompt(problem.problem) + STEP_FORCING
    half = config.paths // 2
    kept: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    samples = invalid = right = 0
    for _ in range(config.max_batches):
        completions = await sampler.sample(prompt, config.batch)
        grades = await sampler.correct(completions, STEP_FORCING, problem.gold)
        samples += len(completions)
        right += sum(grades)
        for completion, correct in zip(completions, grades, strict=True):
            steps = split_forced(STEP_FORCING + completion.text)
            if completion.finish_reason != "stop" or len(steps) < 2:
                invalid += 1
            elif len(kept[correct]) < half:
                kept[correct].append(
                    {"steps": steps, "answer": extract_answer(completion.text), "correct": correct}
                )
        if min(len(kept[True]), len(kept[False])) >= half:
            break
    return {
        **base,
        "pass_at_1": right / samples,
        "samples": samples,
        "invalid": invalid,
        "balanced": min(len(kept[True]), len(kept[False])) >= half,
        "paths": kept[True] + kept[False],
        "usage": {"paths": _usage(sampler.usage)},
        "error": None,
    }


async def monte_carlo(
    model: CompletionModel,
    template: ChatTemplate,
    record: dict[str, Any],
    config: SynthConfig,
    *,
    gate: asyncio.Semaphore,
) -> dict[str, Any]:
    """The ``mc`` stage for one problem's paths: the completer's Pass@1 (MC_0), K from the
    buckets, and for every path and step prefix t < T one request with ``n = K`` (the server
    shares the prefix; equal prefixes of different paths are asked once), MC_t the fraction of
    completions that reach the gold answer; MC_T is the path's own grade. Each path gets its
    RPE labels (:func:`rpe_labels`) and their :func:`first_error`."""
    sampler = _Sampler(model, template, config, gate)
    prompt = sampler.prompt(record["problem"])
    gold = record["gold"]
    problem_pass = await sampler.correct(
        await sampler.sample(prompt + STEP_FORCING, config.pass_samples), STEP_FORCING, gold
    )
    pass_at_1 = sum(problem_pass) / len(problem_pass)
    k = rollouts_for(pass_at_1, config.rollouts)
    scores: dict[tuple[str, ...], asyncio.Task[float]] = {}

    async def score(prefix: tuple[str, ...]) -> float:
        text = forced_prefix(prefix)
        completions = await sampler.sample(prompt + text, k)
        return sum(await sampler.correct(completions, text, gold)) / k

    async with asyncio.TaskGroup() as group:
        for path in record["paths"]:
            for t in range(1, len(path["steps"])):
                prefix = tuple(path["steps"][:t])
                if prefix not in scores:
                    scores[prefix] = group.create_task(score(prefix))
    paths = []
    for path in record["paths"]:
        steps = path["steps"]
        mc = [scores[tuple(steps[:t])].result() for t in range(1, len(steps))] + [float(path["correct"])]
        labels = rpe_labels(mc, pass_at_1, threshold=config.threshold, mode=config.label_mode)
        paths.append({**path, "mc": mc, "labels": labels, "first_error": first_error(labels)})
    return {
        **record,
        "completer_pass_at_1": pass_at_1,
        "rollouts": k,
        "requests": sampler.usage.calls,
        "paths": paths,
        "usage": {**record.get("usage", {}), "mc": _usage(sampler.usage)},
    }


async def teacher_rationales(teacher: Teacher, record: dict[str, Any]) -> dict[str, Any]:
    """The ``rationales`` stage for one problem's labelled paths: the teacher's critiques of
    every path (:meth:`~critloop.agent.teacher.Teacher.critique`) and its verdict, the majority
    of their votes (:func:`teacher_verdict`)."""
    paths = []
    usage = ModelUsage()
    code_runs = 0
    for path, critiques in zip(
        record["paths"],
        await asyncio.gather(
            *(teacher.critique(record["problem"], path["steps"]) for path in record["paths"])
        ),
        strict=True,
    ):
        for critique in critiques:
            usage += critique.usage
            code_runs += len(critique.code_runs)
        votes = [c.vote for c in critiques]
        paths.append(
            {
                **path,
                "teacher": [c.model_dump(mode="json", exclude={"usage"}) for c in critiques],
                "votes": votes,
                "verdict": teacher_verdict(votes),
            }
        )
    return {
        **record,
        "paths": paths,
        "code_runs": code_runs,
        "usage": {**record.get("usage", {}), "rationales": _usage(usage)},
    }


DropReason = Literal["disagree", "no_verdict", "incomplete_rationale"]
"""Why a path makes no conversation: its RPE first error and the teacher's verdict differ; the
teacher's samples gave no majority; or the agreeing sample has no analysis, or no verification
with Python code, for a step (the critic's full protocol verifies every step with code)."""


def training_conversations(
    record: dict[str, Any],
    *,
    profile: CriticProfile = "genprm",
    first_step_format: str = DEFAULT_FIRST_STEP_FORMAT,
) -> tuple[list[dict[str, Any]], list[DropReason | None]]:
    """The training conversations of one problem's paths, and what became of each path (None:
    kept).

    A path is kept when its RPE labels' first error equals the teacher's verdict
    (:func:`agrees`). Its conversation is what the critic sends and writes at inference
    (:func:`~critloop.agent.critic_protocol.conversation`), up to the first wrong step (the
    critic's first-error scan stops there), or over every step: the system prompt of
    ``profile``; a user turn per step, the first holding the problem; after each an assistant
    turn with the agreeing teacher sample's analysis and verification of the step and the
    judgement of its RPE label (:func:`~critloop.agent.critic_protocol.finished_critique`).
    """
    conversations: list[dict[str, Any]] = []
    fates: list[DropReason | None] = []
    for number, path in enumerate(record["paths"]):
        labels, verdict = path["labels"], path.get("verdict")
        if verdict is None:
            fates.append("no_verdict")
            continue
        if verdict != first_error(labels):
            fates.append("disagree")
            continue
        sample = next(s for s in path["teacher"] if s["vote"] == verdict)
        found = rationales(sample["text"])
        last = verdict if verdict >= 0 else len(labels) - 1
        if any(k not in found or "```python" not in found[k].verification for k in range(last + 1)):
            fates.append("incomplete_rationale")
            continue
        steps = path["steps"][: last + 1]
        critiques = [
            finished_critique(k + 1, found[k].analysis, found[k].verification, labels[k] == 1)
            for k in range(last + 1)
        ]
        messages = conversation(
            record["problem"], steps, critiques[:-1], profile=profile, first_step_format=first_step_format
        )
        messages.append({"role": "assistant", "content": critiques[-1]})
        conversations.append({"id": f"{record['id']}/{number}", "messages": messages})
        fates.append(None)
    return conversations, fates


Stage = Literal["paths", "mc", "rationales"]
"""The stages that call models, in order; each reads the previous one's records (``paths``
reads the problems)."""
STAGES: tuple[Stage, ...] = get_args(Stage)
_NEEDS = {"mc": ("steps", "paths"), "rationales": ("labels", "mc"), "conversations": ("votes", "rationales")}
"""What each stage needs in every path of a record, and the stage that writes it."""


@dataclass(frozen=True)
class StageItem:
    """One problem's record of the previous stage, as the next stage's item."""

    record: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.record["id"])


def load_stage(
    source: str | Path, stage: Literal["mc", "rationales", "conversations"]
) -> tuple[list[StageItem], list[dict[str, Any]]]:
    """The records of the stage before ``stage`` in ``source``, as its items, and the problems
    it cannot run: records of failed problems, carried on as they are, and records without
    what ``stage`` needs.

    Raises:
        ConfigError: ``source`` does not exist, or holds no record.
    """
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    records = ResultsFile(path).records()
    if not records:
        raise ConfigError(f"{path} holds no records")
    field, before = _NEEDS[stage]
    items: list[StageItem] = []
    carried: list[dict[str, Any]] = []
    for record in records:
        if record.get("error") or "id" not in record:
            carried.append(record if "id" in record else failed_record(record, "a record without an id"))
        elif not isinstance(record.get("paths"), list) or not all(
            isinstance(p, dict) and field in p for p in record["paths"]
        ):
            carried.append(
                failed_record(
                    record,
                    f"no {field!r} in the record: {path.name} is not the output of `critloop synth {before}`",
                )
            )
        else:
            items.append(StageItem(record))
    return items, carried


def summarize(records: Iterable[dict[str, Any]], fates: Iterable[DropReason | None] = ()) -> dict[str, Any]:
    """What a synth run made: problems (failed ones), paths, the step labels, the paths kept
    for training and why the others were dropped (``fates``, from
    :func:`training_conversations`), and the requests and tokens of each stage."""
    records = list(records)
    good = [r for r in records if not r.get("error")]
    paths = [p for r in good for p in r.get("paths", [])]
    labels = Counter(label for p in paths for label in p.get("labels", []))
    counted = Counter("kept" if fate is None else fate for fate in fates)
    stages: dict[str, dict[str, int]] = {}
    for record in good:
        for stage, usage in (record.get("usage") or {}).items():
            total = stages.setdefault(stage, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
            for key in total:
                total[key] += int(usage.get(key, 0))
    kept = counted.get("kept", 0)
    return {
        "problems": len(records),
        "failed": len(records) - len(good),
        "paths": len(paths),
        "correct_paths": sum(bool(p.get("correct")) for p in paths),
        "step_labels": {"1": labels.get(1, 0), "0": labels.get(0, 0)},
        "kept": kept,
        "kept_fraction": kept / sum(counted.values()) if counted else None,
        "dropped": {reason: n for reason, n in sorted(counted.items()) if reason != "kept"},
        "stages": stages,
    }


def export_conversations(
    records: Iterable[dict[str, Any]],
    out: str | Path,
    *,
    profile: CriticProfile = "genprm",
    first_step_format: str = DEFAULT_FIRST_STEP_FORMAT,
) -> dict[str, Any]:
    """Write the training conversations of the ``rationales`` stage's ``records`` to ``out``
    (chat ``messages`` JSONL, one conversation a line, by problem id, replaced as a whole) and
    return the run's :func:`summarize` with ``conversations``, the number written."""
    records = sorted(records, key=lambda record: str(record.get("id")))  # the same file, however the run went
    fates: list[DropReason | None] = []
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        written = 0
        for record in records:
            if record.get("error") or "paths" not in record:
                continue
            conversations, kept = training_conversations(
                record, profile=profile, first_step_format=first_step_format
            )
            fates.extend(kept)
            for item in conversations:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
                written += 1
        f.flush()
        os.fsync(f.fileno())
    partial.replace(target)
    return {**summarize(records, fates), "conversations": written}
