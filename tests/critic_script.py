"""A scripted GenPRM: answers each stage of the critique protocol from a plan per paragraph."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from critloop.agent.critic_protocol import ANALYZE_PREFIX, FORCED_JUDGEMENT, VERIFY_PREFIX
from critloop.tools.completion import SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel

DECISIONS = {"Yes": {"Yes": -0.1, "No": -2.4}, "No": {"No": -0.2, "Yes": -1.8}}


@dataclass
class Plan:
    """What the scripted critic does for one paragraph."""

    verdict: str = "Yes"
    analysis: str = "The arithmetic in this paragraph checks out."
    code: list[str] = field(default_factory=lambda: ["print(2 + 3)"])
    judgement: str | None = None
    """Raw text after the last code output; default: a boxed verdict in an output block."""
    forced: str | None = None
    """Raw text after a forced-judgement prefix; default: the verdict."""


def paragraph(prompt: str) -> int:
    found = re.findall(r"Let's analyze the Paragraph (\d+) step by step: ", prompt)
    return int(found[-1])


def scripted_genprm(plans: dict[int, Plan], **kwargs: object) -> ScriptedCompletionModel:
    def respond(prompt: str, params: SamplingParams) -> str:
        k = paragraph(prompt)
        plan = plans.get(k, Plan())
        if prompt.endswith(ANALYZE_PREFIX.format(k=k)):
            return f"{plan.analysis}\n</analyze>\n<verify>\nthis part is never reached"
        if prompt.endswith(FORCED_JUDGEMENT):
            return plan.forced if plan.forced is not None else "{" + plan.verdict + "}$\n</output>\n"
        current = prompt[prompt.rfind(ANALYZE_PREFIX.format(k=k)) :]
        rounds = current.count("[Code Output]")
        if prompt.endswith(VERIFY_PREFIX) or rounds < len(plan.code):
            code = plan.code[rounds] if rounds < len(plan.code) else "print('again')"
            prefix = "" if prompt.endswith(VERIFY_PREFIX) else "Let me check once more.\n```python\n"
            return f"{prefix}{code}\n```\nafter the fence"
        if plan.judgement is not None:
            return plan.judgement
        judgement = f"**Judgement**: $\\boxed{{{plan.verdict}}}$"
        return f"The output agrees.\n</verify>\n<output>\n{judgement}\n</output>\nextra"

    return ScriptedCompletionModel(respond, alternatives=DECISIONS, **kwargs)  # type: ignore[arg-type]
