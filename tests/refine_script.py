"""Scripted roles for the refine loop: a policy/refiner and a critic that judges steps by content."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from critic_script import DECISIONS, Plan, paragraph, scripted_genprm

from critloop.agent.critic_protocol import ANALYZE_PREFIX
from critloop.tools.completion import CompletionResult, SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel

PROBLEM = "What is 2 + 3 * 4?"
GOOD = ["First, 3 * 4 = 12.", "Then 2 + 12 = 14.", "The answer is $\\boxed{14}$."]
BAD = ["First, 3 * 4 = 12.", "Then 2 + 12 = 15.", "The answer is $\\boxed{15}$."]
USER = "<|im_start|>user\n"


def critic_by_content(is_bad: Callable[[str], bool]) -> ScriptedCompletionModel:
    """A GenPRM that says No to the steps ``is_bad`` picks (read from the prompt's last user turn)."""

    def respond(prompt: str, params: SamplingParams) -> str:
        k = paragraph(prompt)
        head = prompt[: prompt.rfind(ANALYZE_PREFIX.format(k=k))]
        step = head[head.rfind(USER) + len(USER) :]
        plan = Plan(verdict="No" if is_bad(step) else "Yes", analysis=f"Checking the claim: {step[:60]}")
        return scripted_genprm({k: plan})._script(prompt, params)  # type: ignore[operator]

    return ScriptedCompletionModel(respond, name="critic", alternatives=DECISIONS)


def wrong_15(step: str) -> bool:
    return "15" in step


def policy_script(
    *,
    initial: list[str] = BAD,
    rewrite: str = "Then 2 + 12 = 14.",
    continuation: list[str] | None = None,
    full: list[str] = GOOD,
) -> ScriptedCompletionModel:
    """A policy/refiner: the first solution, a rewritten step, a continuation, a full rewrite."""
    rest = continuation if continuation is not None else ["The answer is $\\boxed{14}$."]

    def respond(prompt: str, params: SamplingParams) -> str:
        if "Write a corrected version of that one step" in prompt:
            return rewrite
        if "There might be some problem in this paragraph" in prompt:
            return "\n\n".join(full)
        if prompt.endswith("\n\n"):  # a prefix continuation
            return "\n\n".join(rest)
        return "\n\n".join(initial)

    return ScriptedCompletionModel(respond, name="policy")


class Gate(ScriptedCompletionModel):
    """A scripted model whose calls wait until :attr:`open` is set; records cancellations."""

    def __init__(self, inner: ScriptedCompletionModel) -> None:
        super().__init__(inner._script, alternatives=inner.alternatives)  # type: ignore[arg-type]
        self.open = asyncio.Event()
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        self.entered.set()
        try:
            await self.open.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await super().complete(prompt, params)
