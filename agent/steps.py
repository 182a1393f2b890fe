"""Solutions as steps: splitting on blank lines, joining, and the final ``\\boxed{}`` answer.

One convention serves the policy, the critic, the refiner and every report: a step is a
paragraph, steps are separated by one blank line.

Example:
    >>> steps = split_steps("3 * 4 = 12.\\n\\n2 + 12 = 14, so the answer is $\\\\boxed{14}$.")
    >>> len(steps), extract_answer(join_steps(steps))
    (2, '14')
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["extract_answer", "join_steps", "split_steps", "STEP_SEPARATOR"]

STEP_SEPARATOR = "\n\n"
"""What joins two steps; what the policy is asked to put between them."""

_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def split_steps(text: str) -> list[str]:
    """The steps of a solution: its paragraphs (split on blank lines), stripped, empty ones dropped.

    Blank lines inside a fenced code block or a display-math block do not split it.
    """
    steps: list[str] = []
    current: list[str] = []
    for part in _BLANK_LINE.split(text.replace("\r\n", "\n")):
        current.append(part)
        joined = "\n\n".join(current)
        if joined.count("```") % 2 == 0 and joined.count("$$") % 2 == 0:
            if joined.strip():
                steps.append(joined.strip())
            current = []
    if current and "\n\n".join(current).strip():
        steps.append("\n\n".join(current).strip())
    return steps


def join_steps(steps: Sequence[str]) -> str:
    """The solution text of ``steps`` (the inverse of :func:`split_steps` for clean steps)."""
    return STEP_SEPARATOR.join(step.strip() for step in steps)


def extract_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces kept), or None.

    An unclosed box yields None: a truncated answer is no answer.
    """
    answer = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            char = text[i]
            if char == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                continue
            if char == "{" and text[i - 1] != "\\":
                depth += 1
            elif char == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    answer = text[start:i].strip()
                    break
    return answer
