"""The policy (writes step-by-step solutions) and the refiner (rewrites a flagged step).

Example:
    >>> policy = Policy(writer)  # doctest: +SKIP
    >>> draft = await policy.solve("What is 2 + 3 * 4?")  # doctest: +SKIP
    >>> draft.steps  # doctest: +SKIP
    ['3 * 4 = 12.', '2 + 12 = 14, so the answer is $\\\\boxed{14}$.']
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from critloop.agent.budget import Role, UsageMeter
from critloop.agent.steps import join_steps, split_steps
from critloop.agent.writer import Writer, Written
from critloop.errors import ModelError
from critloop.tools import tracing
from critloop.tools.chat_template import ChatMessage

__all__ = [
    "Draft",
    "Policy",
    "REASON_INSTRUCTION",
    "REFINE_FULL_INSTRUCTION",
    "Refiner",
    "RefineMode",
    "critique_analysis",
]

RefineMode = Literal["step", "full"]
"""``step``: rewrite the first flagged step from the critique's analysis, then the policy continues
from the corrected prefix. ``full``: the reference protocol; the model sees its whole solution and
the critique of the flagged step, and writes a new solution."""

REASON_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to the problem in the policy's user turn (the reference protocol's wording)."""

REFINE_FULL_INSTRUCTION = (
    "There might be some problem in this paragraph of your reasoning, "
    "please rethink and refine your answer:\n>"
)
"""The reference protocol's refinement turn: this, the flagged step, a blank line, the analysis."""

REWRITE_STEP_PROMPT = (
    "Problem:\n{problem}\n\n"
    "Solution so far:\n{earlier}\n\n"
    "The next step was checked and found wrong:\n{step}\n\n"
    "The reviewer's analysis of that step:\n{analysis}\n\n"
    "Write a corrected version of that one step only: one paragraph, no other steps, no commentary."
)
"""The refiner's turn in ``step`` mode."""

_ANALYSIS = re.compile(r"<analyze>\s*(.*?)\s*(?:</analyze>|$)", re.DOTALL)
_JUDGEMENT = re.compile(r"<output>.*?(?:</output>|$)", re.DOTALL)
_LEAD_IN = re.compile(r"^Let's analyze the Paragraph \d+ step by step:\s*")


def critique_analysis(critique: str) -> str:
    """The ``<analyze>`` text of a critique, without the protocol's lead-in (what the refiner is
    shown), or the critique but its judgement when it has no analysis block (empty for a direct
    judgement of the critic's cascade)."""
    match = _ANALYSIS.search(critique)
    return _LEAD_IN.sub("", (match.group(1) if match else _JUDGEMENT.sub("", critique)).strip())


@dataclass(frozen=True, kw_only=True)
class Draft:
    """A solution as written, with the model replies that wrote it."""

    steps: list[str]
    replies: tuple[Written, ...]

    @property
    def text(self) -> str:
        return join_steps(self.steps)


def _user(problem: str) -> ChatMessage:
    return {"role": "user", "content": f"{problem}\n{REASON_INSTRUCTION}"}


async def _write(
    writer: Writer,
    messages: list[ChatMessage],
    *,
    role: Role,
    meter: UsageMeter | None,
    prefix: str | None = None,
    max_tokens: int | None = None,
) -> Written:
    """One model call of ``role``, checked against the run's budget before it starts and
    charged to it after (with a ``meter``)."""
    if meter is not None:
        meter.before_call()
    attributes = {"critloop.role": role, "input.value": json.dumps(messages), "critloop.prefix": prefix}
    with tracing.span(f"{role}.write", "LLM", attributes) as current:
        try:
            written = await writer.write(messages, prefix=prefix, max_tokens=max_tokens)
        except ModelError as error:
            error.role = error.role or role
            raise
        tracing.record(
            current,
            {
                "output.value": written.text,
                **tracing.token_counts(written.prompt_tokens, written.completion_tokens),
            },
        )
    if meter is not None:
        meter.charge(role, written.usage)
    return written


class Policy:
    """Writes a step-by-step solution, and continues one from a corrected prefix.

    Args:
        writer: the model (a :class:`~critloop.agent.writer.CompletionWriter` for true prefix
            continuation, or a :class:`~critloop.agent.writer.ChatModelWriter`).
        system_prompt: an optional system turn.
        max_tokens: the limit of one reply.
    """

    def __init__(self, writer: Writer, *, system_prompt: str | None = None, max_tokens: int | None = None):
        self.writer = writer
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens

    def messages(self, problem: str) -> list[ChatMessage]:
        head: list[ChatMessage] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )
        return [*head, _user(problem)]

    async def solve(self, problem: str, *, meter: UsageMeter | None = None) -> Draft:
        """A solution of ``problem`` (one model call, checked and charged through ``meter``)."""
        written = await _write(
            self.writer, self.messages(problem), role="policy", meter=meter, max_tokens=self.max_tokens
        )
        return Draft(steps=split_steps(written.text), replies=(written,))

    async def continue_from(
        self, problem: str, prefix: Sequence[str], *, meter: UsageMeter | None = None
    ) -> Draft:
        """The solution that starts with the steps ``prefix`` (kept as they are) and goes on."""
        written = await _write(
            self.writer,
            self.messages(problem),
            role="policy",
            meter=meter,
            prefix=join_steps(prefix) + "\n\n",
            max_tokens=self.max_tokens,
        )
        return Draft(steps=[*prefix, *split_steps(written.text)], replies=(written,))


class Refiner:
    """Rewrites the first flagged step of a solution (``step`` mode) or the whole solution
    (``full`` mode, the reference protocol), from the critique's analysis.

    Args:
        writer: the refiner's model (by default the policy's).
        policy: continues the solution after a rewritten step (``step`` mode).
        mode: see :data:`RefineMode`.
        max_tokens: the limit of one rewrite (``step`` mode); ``full`` mode uses the policy's.
    """

    def __init__(self, writer: Writer, policy: Policy, *, mode: RefineMode = "step", max_tokens: int = 512):
        self.writer = writer
        self.policy = policy
        self.mode: RefineMode = mode
        self.max_tokens = max_tokens

    async def _rewrite_step(
        self, problem: str, steps: Sequence[str], index: int, analysis: str, meter: UsageMeter | None
    ) -> Written:
        """The corrected step ``index`` (its text is the model's raw reply)."""
        prompt = REWRITE_STEP_PROMPT.format(
            problem=problem,
            earlier=join_steps(steps[:index]) if index else "(nothing yet: this is the first step)",
            step=steps[index],
            analysis=analysis or "(no analysis given)",
        )
        return await _write(
            self.writer,
            [{"role": "user", "content": prompt}],
            role="refiner",
            meter=meter,
            max_tokens=self.max_tokens,
        )

    async def refine(
        self,
        problem: str,
        steps: Sequence[str],
        index: int,
        analysis: str,
        *,
        meter: UsageMeter | None = None,
    ) -> Refinement:
        """A new solution in which step ``index`` (flagged, with ``analysis``) is rethought. The
        refiner's calls are charged to ``refiner``, the policy's continuation to ``policy``."""
        if self.mode == "full":
            messages: list[ChatMessage] = [
                *self.policy.messages(problem),
                {"role": "assistant", "content": join_steps(steps)},
                {"role": "user", "content": f"{REFINE_FULL_INSTRUCTION}{steps[index]}\n\n{analysis}"},
            ]
            written = await _write(
                self.writer, messages, role="refiner", meter=meter, max_tokens=self.policy.max_tokens
            )
            return Refinement(
                rewrite=written.text.strip(),
                steps=split_steps(written.text),
                replies=(written,),
                continued=(),
            )
        rewrite = await self._rewrite_step(problem, steps, index, analysis, meter)
        new_step = join_steps(split_steps(rewrite.text)[:1])
        if not new_step:
            return Refinement(rewrite="", steps=[], replies=(rewrite,), continued=())
        continued = await self.policy.continue_from(problem, [*steps[:index], new_step], meter=meter)
        return Refinement(
            rewrite=new_step, steps=continued.steps, replies=(rewrite,), continued=continued.replies
        )


@dataclass(frozen=True, kw_only=True)
class Refinement:
    """What one refinement produced."""

    rewrite: str
    """The rewritten step (``step`` mode) or the whole new solution (``full`` mode); empty when
    the refiner wrote nothing usable."""
    steps: list[str]
    """The new solution's steps (empty when nothing usable was written)."""
    replies: tuple[Written, ...]
    """The refiner's replies."""
    continued: tuple[Written, ...]
    """The policy's replies that continued the solution after the rewrite."""
