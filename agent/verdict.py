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
RewardSource = Literal["logprobs", "logprobs_bound", "hard_label", "none"]
"""``logprobs``: P(Yes)/(P(Yes)+P(No)) at the decision token. ``logprobs_bound``: the same, but
the other answer was not among the token's top logprobs (or a server's top-k / top-p masking cut
it): its logprob is taken as the least likely listed one's, a bound that never overstates the
verdict's side. ``hard_label``: 1.0 or 0.0 from the verdict text (no logprobs from the server,
or the decision token could not be located). ``none``: no verdict at all; the reward is 0.5."""

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
    temperature: float | None = None,
) -> tuple[float, RewardSource]:
    """The reward of one critique and where it came from.

    The reward is P(Yes) / (P(Yes) + P(No)) at the decision token, after the sampling
    temperature T. The softmax's normaliser cancels in that ratio, so it follows from the two
    logprobs alone: 1 / (1 + exp((lp_No - lp_Yes) / T)) from raw logprobs, and with T = 1 from
    logprobs already processed (after temperature).

    Args:
        verdict: from :func:`find_verdict`.
        offset: the offset of the verdict word in the critique.
        segments: the critique's pieces with their tokens.
        yes_ids, no_ids: token ids of "Yes" / "No" in the critic's vocabulary, to match
            alternatives by id where the server gives ids (by text otherwise).
        temperature: the temperature the judgement was sampled at, when the logprobs are raw
            (0: greedy, the reward is 1, 0 or 0.5); None when they are processed.

    Example:
        >>> from critloop.tools.completion import TokenLogprob, TopLogprob
        >>> top = (TopLogprob(token="Yes", logprob=-0.1), TopLogprob(token="No", logprob=-2.4))
        >>> yes = (TokenLogprob(token="Yes", logprob=-0.1, top=top),)
        >>> segments = [Segment(0, "\\boxed{", ()), Segment(7, "Yes", yes), Segment(10, "}", ())]
        >>> round(reward_for("yes", 7, segments, temperature=0.6)[0], 4)
        0.9788
        >>> round(reward_for("yes", 7, segments)[0], 4)  # processed logprobs: the plain ratio
        0.9089
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
    source: RewardSource = "logprobs"
    if other is None:
        # The other answer is not among the top-k: the least likely listed one stands in for it.
        other = min((alt.logprob for alt in token.top if alt.id not in mine_ids), default=mine - 20.0)
        other = min(other, mine)
        source = "logprobs_bound"
    lp_yes, lp_no = (mine, other) if verdict == "yes" else (other, mine)
    return _ratio(lp_yes, lp_no, temperature), source


def _ratio(lp_yes: float, lp_no: float, temperature: float | None) -> float:
    """1 / (1 + exp((lp_no - lp_yes) / T)), T = 1 for processed logprobs; never overflows."""
    if not (math.isfinite(lp_yes) or math.isfinite(lp_no)):
        return 0.5  # both answers masked out: no information
    gap = lp_yes - lp_no
    if temperature is not None:
        if temperature <= 0:  # greedy: the distribution is all on the larger one
            return 0.5 if gap == 0 else float(gap > 0)
        gap /= temperature
    if gap >= 0:
        return 1.0 / (1.0 + math.exp(-gap))
    z = math.exp(gap)
    return z / (1.0 + z)


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
