"""A scripted GenPRM: answers each stage of the critique protocol from a plan per paragraph."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from critloop.agent.critic_protocol import ANALYZE_PREFIX, FORCED_JUDGEMENT, OUTPUT_PREFIX, VERIFY_PREFIX
from critloop.tools.completion import Completion, SamplingParams
from critloop.tools.fakes import ScriptedCompletionModel, scripted_tokens

DECISIONS = {"Yes": {"Yes": -0.1, "No": -2.4}, "No": {"No": -0.2, "Yes": -1.8}}
UNSURE = {"Yes": {"Yes": -0.6, "No": -0.9}, "No": {"No": -0.6, "Yes": -0.9}}
"""The decision token of an unsure judgement (a reward near 0.5 at any temperature)."""


@dataclass
class Plan:
    """What the scripted critic does for one paragraph."""

    verdict: str = "Yes"
    analysis: str = "The arithmetic in this paragraph checks out."
    code: list[str] = field(default_factory=lambda: ["print(2 + 3)"])
    judgement: str | None = None
    """Raw text after the last code output; default: a boxed verdict in an output block."""
    forced: str | None = None
    """Raw text after a forced-judgement prefix (a judgement after the analysis alone); default:
    the verdict."""
    direct: str | None = None
    """The verdict of a direct judgement (the cascade's first tier); default: ``verdict``."""
    unsure: frozenset[str] = frozenset()
    """Tiers whose judgement is unsure (``direct``, ``analysis``): its decision token has the
    logprobs of :data:`UNSURE`."""


def paragraph(prompt: str) -> int:
    """The paragraph a prompt asks about (the ChatML user turns count for a direct judgement,
    which has no analysis lead-in)."""
    if is_direct(prompt):
        return prompt.count("<|im_start|>user")
    found = re.findall(r"Let's analyze the Paragraph (\d+) step by step: ", prompt)
    return int(found[-1])


def is_direct(prompt: str) -> bool:
    """Whether the prompt asks for a direct judgement (no analysis before it)."""
    return prompt.endswith(OUTPUT_PREFIX) and not prompt.endswith(FORCED_JUDGEMENT)


def judgement_reply(text: str, *, unsure: bool) -> str | Completion:
    """A judgement reply; an unsure one carries the :data:`UNSURE` logprobs."""
    if not unsure:
        return text
    tokens = scripted_tokens(text, alternatives=UNSURE)
    return Completion(
        text=text, finish_reason="stop", stop="</output>\n", tokens=tokens, completion_tokens=len(tokens)
    )


def scripted_genprm(plans: dict[int, Plan], **kwargs: object) -> ScriptedCompletionModel:
    def respond(prompt: str, params: SamplingParams) -> str | Completion:
        k = paragraph(prompt)
        plan = plans.get(k, Plan())
        if is_direct(prompt):
            return judgement_reply(
                "{" + (plan.direct or plan.verdict) + "}$\n</output>\n", unsure="direct" in plan.unsure
            )
        if prompt.endswith(ANALYZE_PREFIX.format(k=k)):
            return f"{plan.analysis}\n</analyze>\n<verify>\nthis part is never reached"
        if prompt.endswith(FORCED_JUDGEMENT):
            if plan.forced is not None:
                return plan.forced
            return judgement_reply("{" + plan.verdict + "}$\n</output>\n", unsure="analysis" in plan.unsure)
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
