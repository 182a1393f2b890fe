"""Reading a critique: its Yes/No verdict, and the reward P(Yes) / (P(Yes) + P(No)).

Model text is untrusted: nothing here raises on what a model wrote.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from critloop.tools.completion import TokenLogprob

__all__ = ["RewardSource", "Segment", "Verdict", "find_verdict", "reward_for", "segment_after"]

Verdict = Literal["yes", "no", "none"]
RewardSource = Literal["logprobs", "hard_label", "none"]
"""``logprobs``: P(Yes)/(P(Yes)+P(No)) at the decision token. ``hard_label``: 1.0 or 0.0 from the
verdict text (no logprobs from the server, or the decision token could not be located).
``none``: no verdict at all; the reward is 0.5."""

# \boxed{Yes}, \boxed{ yes }, \boxed{\text{No}}, \boxed {YES}; the word must end there.
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{\s*)?(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Segment:
    """A stretch of a critique: text at an offset, with the tokens that generated it (if any)."""

    start: int
    text: str
    tokens: tuple[TokenLogprob, ...] | None


def segment_after(before: str, text: str, tokens: tuple[TokenLogprob, ...] | None) -> Segment:
    """The stretch ``text`` a model generated after ``before``.

    Its tokens are kept only where a verdict word can lie: a ``\\boxed`` in the stretch or just
    before it. The other stretches (long analyses, code) keep an empty tuple, since holding
    every token's top-k alternatives of every chain costs memory and collector time at scale.
    """
    if tokens is not None and "boxed" not in text and "boxed" not in before[-64:]:
        tokens = ()
    return Segment(len(before), text, tokens)


def find_verdict(critique: str) -> tuple[Verdict, int | None]:
    """The judgement and the offset of its Yes/No word.

    The first boxed Yes/No inside the last ``<output>`` block wins; without an output block, the
    last boxed Yes/No anywhere (the forced-judgement text ends with it).
    """
    tail = critique.rfind("<output>")
    if tail >= 0:
        match = _BOXED.search(critique, tail)
        if match is not None:
            return _verdict(match), match.start(1)
    matches = list(_BOXED.finditer(critique))
    if not matches:
        return "none", None
    return _verdict(matches[-1]), matches[-1].start(1)


def _verdict(match: re.Match[str]) -> Verdict:
    return "yes" if match.group(1).lower() == "yes" else "no"


def _word(text: str) -> str:
    """A token's text reduced to the word it may hold: ``{Yes`` / `` yes`` / ``Yes`` -> ``yes``."""
    return text.strip().lstrip("{").strip().lower()


def reward_for(
    verdict: Verdict,
    offset: int | None,
    segments: Sequence[Segment],
    *,
    yes_ids: frozenset[int] = frozenset(),
    no_ids: frozenset[int] = frozenset(),
) -> tuple[float, RewardSource]:
    """The reward of one critique and where it came from.

    Args:
        verdict: from :func:`find_verdict`.
        offset: the offset of the verdict word in the critique.
        segments: the critique's pieces with their tokens.
        yes_ids, no_ids: token ids of "Yes" / "No" in the critic's vocabulary, to match
            alternatives by id where the server gives ids (by text otherwise).
    """
    if verdict == "none" or offset is None:
        return 0.5, "none"
    token = _decision_token(verdict, offset, segments)
    if token is None:
        return (1.0 if verdict == "yes" else 0.0), "hard_label"
    mine_ids, other_ids = (yes_ids, no_ids) if verdict == "yes" else (no_ids, yes_ids)
    other_word = "no" if verdict == "yes" else "yes"
    mine = token.logprob
    other = None
    for alt in token.top:
        matched = (
            alt.id in other_ids if (alt.id is not None and other_ids) else _word(alt.token) == other_word
        )
        if matched and (other is None or alt.logprob > other):
            other = alt.logprob
    if other is None:
        # The other answer is not among the top-k: the least likely listed one stands in for it.
        other = min((alt.logprob for alt in token.top if alt.id not in mine_ids), default=mine - 20.0)
        other = min(other, mine)
    p_mine, p_other = math.exp(mine), math.exp(other)
    p_yes, p_no = (p_mine, p_other) if verdict == "yes" else (p_other, p_mine)
    total = p_yes + p_no
    return (0.5 if total == 0 else p_yes / total), "logprobs"


def _decision_token(verdict: Verdict, offset: int, segments: Sequence[Segment]) -> TokenLogprob | None:
    """The generated token that holds the verdict word at ``offset``; by position first, then,
    if token texts do not line up with the text, the last token in that segment saying it."""
    for segment in segments:
        if not segment.start <= offset < segment.start + len(segment.text):
            continue
        if segment.tokens is None:
            return None
        position = segment.start
        for token in segment.tokens:
            end = position + len(token.token)
            if position <= offset < end:
                if (
                    _word(token.token[offset - position :]).startswith(verdict)
                    or _word(token.token) == verdict
                ):
                    return token
                break
            position = end
        for token in reversed(segment.tokens):
            if _word(token.token) == verdict:
                return token
        return None
    return None
