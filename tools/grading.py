"""Answer grading with ``math-verify``: is a predicted answer mathematically the gold one?

Example:
    >>> grade("\\\\frac{1}{2}", "0.5"), grade("14", "15"), grade(None, "3")
    (True, False, False)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re

__all__ = ["MAX_ANSWER_CHARS", "agrade", "gold_from_gsm8k", "grade"]

MAX_ANSWER_CHARS = 400
"""Longer answers are graded wrong without parsing: model text is untrusted, and sympy can take
unbounded time on pathological input (math-verify's own timeouts need the main thread)."""

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)

# math-verify warns at every call that its signal-based timeouts are off (they only work in the
# main thread, and grading runs in worker threads so that it never blocks the event loop).
logging.getLogger("math_verify").setLevel(logging.ERROR)


def gold_from_gsm8k(answer: str) -> str:
    """GSM8K's gold answer: the number after ``####`` (thousands separators dropped)."""
    match = _GSM8K_FINAL.search(answer)
    return (match.group(1) if match else answer).replace(",", "").strip()


def grade(predicted: str | None, gold: str | None) -> bool:
    """Whether ``predicted`` (the content of a ``\\boxed{}``) equals ``gold`` mathematically.

    None, empty, over-long or unparsable answers are wrong; this never raises.
    """
    quick = _quick(predicted, gold)
    return quick if quick is not None else _grade(predicted, gold)


async def agrade(predicted: str | None, gold: str | None) -> bool:
    """:func:`grade`, with sympy's part in a worker thread (the event loop stays free)."""
    quick = _quick(predicted, gold)
    if quick is not None:
        return quick
    return await asyncio.to_thread(_grade, predicted, gold)


def _quick(predicted: str | None, gold: str | None) -> bool | None:
    """The verdict where no parsing is needed, else None."""
    if not predicted or not gold or len(predicted) > MAX_ANSWER_CHARS:
        return False
    if predicted.strip() == gold.strip():
        return True
    return None


@functools.lru_cache(maxsize=4096)
def _grade(predicted: str, gold: str) -> bool:
    # Cached: a batch grades each problem's answer after every round and at the end, and most
    # answers do not change; parsing with sympy is the costly part.
    from math_verify import parse, verify

    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=None)
        predicted_parsed = parse(f"${predicted}$", parsing_timeout=None)
        if not gold_parsed or not predicted_parsed:
            return False  # not the same string (checked first), and not maths either
        return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - untrusted model text: a failure to grade is "wrong"
        return False
