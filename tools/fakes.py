"""Scripted fakes, shipped so you can test your own code against critloop without a model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence

from critloop.tools._stops import cut_at_stop
from critloop.tools.completion import Completion, CompletionResult, SamplingParams, TokenLogprob, TopLogprob

__all__ = ["Reply", "ScriptedCompletionModel", "scripted_tokens"]

Reply = str | Completion
"""What a script gives for one sample: raw text (cut at the request's stop strings, as a server
would) or a ready :class:`Completion`."""

# Words and the spaces before them, and single punctuation marks: "{Yes}" -> "{", "Yes", "}".
_PIECES = re.compile(r"\s*[A-Za-z0-9_]+|\s*[^\sA-Za-z0-9_]|\s+$")


def scripted_tokens(
    text: str, *, alternatives: Mapping[str, Mapping[str, float]] | None = None, logprob: float = -0.05
) -> tuple[TokenLogprob, ...]:
    """Tokens that spell ``text``, each with ``logprob``.

    ``alternatives`` maps a token's text (stripped, e.g. ``"Yes"``) to the top-k at that position,
    e.g. ``{"Yes": {"Yes": -0.1, "No": -2.4}}``; the chosen token's logprob is taken from it.
    """
    tokens = []
    for piece in _PIECES.findall(text):
        alts = (alternatives or {}).get(piece.strip())
        if alts:
            chosen = alts.get(piece.strip(), logprob)
            top = tuple(
                sorted(
                    (
                        TopLogprob(token=(piece[: len(piece) - len(piece.lstrip())] + t), logprob=v)
                        for t, v in alts.items()
                    ),
                    key=lambda t: -t.logprob,
                )
            )
            tokens.append(TokenLogprob(token=piece, logprob=chosen, top=top))
        else:
            tokens.append(
                TokenLogprob(token=piece, logprob=logprob, top=(TopLogprob(token=piece, logprob=logprob),))
            )
    assert "".join(t.token for t in tokens) == text
    return tuple(tokens)


class ScriptedCompletionModel:
    """A :class:`~critloop.tools.completion.CompletionModel` that answers from a script.

    The script is either a list of replies, used in order, or a function of (prompt, params)
    returning one reply. Text replies are cut at the request's stop strings exactly as a real
    backend cuts them, and get tokens (with logprobs when asked) from :func:`scripted_tokens`.
    Every call is recorded in :attr:`calls`.

    Example:
        >>> import asyncio
        >>> model = ScriptedCompletionModel(["4</answer>\\nignored"])
        >>> params = SamplingParams(stop=("</answer>",), include_stop=True)
        >>> asyncio.run(model.complete("2 + 2 = ", params)).choices[0].text
        '4</answer>'
    """

    def __init__(
        self,
        script: Sequence[Reply] | Callable[[str, SamplingParams], Reply],
        *,
        name: str = "scripted",
        alternatives: Mapping[str, Mapping[str, float]] | None = None,
        with_logprobs: bool = True,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        self.name = name
        self.calls: list[tuple[str, SamplingParams]] = []
        self.alternatives = alternatives
        self.with_logprobs = with_logprobs
        self.count_tokens = count_tokens
        """How a completion's tokens are counted for usage (a chat template's ``count_tokens``
        counts them as that model would); by default one per scripted token piece."""
        self._script = script
        self._replies: Iterator[Reply] | None = None if callable(script) else iter(script)

    def _next(self, prompt: str, params: SamplingParams) -> Reply:
        if callable(self._script):
            return self._script(prompt, params)
        assert self._replies is not None
        try:
            return next(self._replies)
        except StopIteration:
            raise AssertionError(
                f"{self.name}: the script ran out of replies at call {len(self.calls)}"
            ) from None

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        self.calls.append((prompt, params))
        choices = []
        for _ in range(params.n):
            reply = self._next(prompt, params)
            if isinstance(reply, str):
                reply = self._completion(reply, params)
            choices.append(reply)
        return CompletionResult(
            choices=tuple(choices),
            prompt_tokens=max(1, len(prompt) // 4),
            completion_tokens=sum(c.completion_tokens for c in choices),
            model=self.name,
        )

    def _completion(self, raw: str, params: SamplingParams) -> Completion:
        text, stop = cut_at_stop(raw, params.stop, include=params.include_stop)
        tokens = scripted_tokens(text, alternatives=self.alternatives)
        finish = "stop"
        if len(tokens) > params.max_tokens:
            tokens = tokens[: params.max_tokens]
            text, stop, finish = "".join(t.token for t in tokens), None, "length"
        return Completion(
            text=text,
            finish_reason=finish,  # type: ignore[arg-type]
            stop=stop,
            tokens=tokens if params.logprobs is not None and self.with_logprobs else None,
            completion_tokens=self.count_tokens(text) if self.count_tokens is not None else len(tokens),
        )

    async def aclose(self) -> None:
        return None
