"""The GenPRM critique format: protocol constants the released checkpoints were trained on.

A critic that deviates from these strings scores worse, so they are constants, not options.
The ``instruct`` profile teaches the same format to a general instruct model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from critloop.tools.chat_template import ChatMessage

__all__ = [
    "ANALYZE_PREFIX",
    "ANALYZE_STOP",
    "CODE_FENCE_STOP",
    "CODE_OUTPUT",
    "CriticProfile",
    "DEFAULT_FIRST_STEP_FORMAT",
    "FORCED_JUDGEMENT",
    "INSTRUCT_SYSTEM_PROMPT",
    "OUTPUT_PREFIX",
    "OUTPUT_STOP",
    "SYSTEM_PROMPT",
    "VERIFY_PREFIX",
    "conversation",
    "finished_critique",
]

CriticProfile = Literal["genprm", "instruct"]
"""``genprm``: the exact protocol, for GenPRM checkpoints. ``instruct``: the same format, taught to
a general instruct model by a system prompt with one worked example."""

SYSTEM_PROMPT = (
    "You are a math teacher. Your task is to review and critique the paragraphs in solution step by step."
)
DEFAULT_FIRST_STEP_FORMAT = "{problem}\n{step}"
"""How step 1's user turn holds the problem (the public README example uses
``"Question: {problem}\\n\\n{step}"``)."""

ANALYZE_PREFIX = "<analyze>\nLet's analyze the Paragraph {k} step by step: "
ANALYZE_STOP = "</analyze>\n"
VERIFY_PREFIX = "<verify>\nLet's use python code to find any potential error:\n```python\n"
CODE_FENCE_STOP = "\n```\n"
OUTPUT_STOP = "</output>\n"
CODE_OUTPUT = "[Code Output]\n\n```\n{output}\n```\n"
OUTPUT_PREFIX = "<output>\n**Judgement**: $\\boxed"
FORCED_JUDGEMENT = "</analyze>\n" + OUTPUT_PREFIX
"""Appended to the analysis alone when the limits were hit: the model then only has to say Yes/No."""

# The executor messages GenPRM saw in training for code that failed, timed out or was missing.
CODE_ERROR = "Code execute Error: {error}"
CODE_TIMEOUT = "Code execute time out: Code execution timed out"
CODE_MISSING = "Code format error: No code found."

_EXAMPLE_PROBLEM = (
    "A shop sells pens at $3 each. Tom buys 4 pens and pays with a $20 bill. How much change does he get?"
)
_EXAMPLE_STEP = "Tom pays 4 * 3 = 14 dollars for the pens."
_EXAMPLE_CRITIQUE = (
    "<analyze>\nLet's analyze the Paragraph 1 step by step: The paragraph computes the cost of 4 pens at "
    "$3 each. The product 4 * 3 is 12, not 14, so the paragraph contains an arithmetic error.\n</analyze>\n"
    "<verify>\nLet's use python code to find any potential error:\n```python\nprint(4 * 3)\n```\n"
    "[Code Output]\n\n```\n12\n```\nThe code confirms the cost is 12 dollars, so the paragraph is wrong.\n"
    "</verify>\n<output>\n**Judgement**: $\\boxed{No}$\n</output>\n"
)
INSTRUCT_SYSTEM_PROMPT = (
    f"{SYSTEM_PROMPT}\n\n"
    "You will be shown a math problem and its solution one paragraph at a time. For each paragraph, "
    "answer in exactly this format:\n"
    "<analyze>\nLet's analyze the Paragraph N step by step: (your reasoning)\n</analyze>\n"
    "<verify>\nLet's use python code to find any potential error:\n```python\n(code that checks the "
    "paragraph and prints results)\n```\n[Code Output] will be shown to you; then comment on it.\n</verify>\n"
    "<output>\n**Judgement**: $\\boxed{Yes}$ if the paragraph is correct, $\\boxed{No}$ if it has an error\n"
    "</output>\n\n"
    f"Example.\nProblem: {_EXAMPLE_PROBLEM}\nParagraph 1: {_EXAMPLE_STEP}\nCritique:\n{_EXAMPLE_CRITIQUE}"
)


def conversation(
    problem: str,
    steps: Sequence[str],
    critiques: Sequence[str],
    *,
    profile: CriticProfile = "genprm",
    first_step_format: str = DEFAULT_FIRST_STEP_FORMAT,
) -> list[ChatMessage]:
    """The messages whose rendering is the prompt for step ``len(critiques) + 1``.

    [system, user_1, assistant_1, ..., user_k]: step 1's user turn holds the problem; each
    assistant turn is the finished critique of the step before.
    """
    k = len(critiques) + 1
    if not 1 <= k <= len(steps):
        raise ValueError(f"{len(critiques)} critiques for {len(steps)} steps: nothing to critique next")
    system = SYSTEM_PROMPT if profile == "genprm" else INSTRUCT_SYSTEM_PROMPT
    messages: list[ChatMessage] = [{"role": "system", "content": system}]
    for index in range(k):
        content = first_step_format.format(problem=problem, step=steps[0]) if index == 0 else steps[index]
        messages.append({"role": "user", "content": content})
        if index < k - 1:
            messages.append({"role": "assistant", "content": critiques[index]})
    return messages


def finished_critique(paragraph: int, analysis: str, verification: str, correct: bool) -> str:
    """A whole critique of paragraph ``paragraph`` (1-based) in the protocol's form, as the critic
    would have written it: the analysis; the verification (code blocks, each followed by its
    ``[Code Output]``, and comments), when there is one; the judgement. Training data is made of
    these (``critloop synth``).

    Example:
        >>> text = finished_critique(1, "4 * 3 is 12.", "```python\\nprint(4 * 3)\\n```", True)
        >>> text.startswith(ANALYZE_PREFIX.format(k=1)), text.endswith("{Yes}$\\n" + OUTPUT_STOP)
        (True, True)
    """
    text = f"{ANALYZE_PREFIX.format(k=paragraph)}{analysis.strip()}\n{ANALYZE_STOP}"
    verification = verification.strip()
    fence = verification.find("```python")
    if fence >= 0:
        # The protocol's verify prefix holds the lead-in and the first block's opening fence.
        lead = VERIFY_PREFIX[: VERIFY_PREFIX.index("```python")]
        text += f"{lead}{verification[fence:]}\n</verify>\n"
    return f"{text}{OUTPUT_PREFIX}{{{'Yes' if correct else 'No'}}}$\n{OUTPUT_STOP}"
