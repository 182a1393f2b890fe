"""The completion-model contract: raw prompt in; text, finish reason, logprobs and usage out."""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Completion",
    "CompletionModel",
    "CompletionResult",
    "FinishReason",
    "LogprobsMode",
    "ModelUsage",
    "SamplingParams",
    "TokenLogprob",
    "TopLogprob",
]

FinishReason = Literal["stop", "length"]
"""``stop``: a stop string or the end-of-sequence token ended the text. ``length``: max_tokens."""

LogprobsMode = Literal["raw", "processed"]
"""What a server's logprobs are. ``raw``: of the model's own logits, before any penalty or
temperature (vLLM's default, and llama.cpp's). ``processed``: after them (vLLM's
``--logprobs-mode processed_logprobs``, which also masks what top-k and top-p cut)."""


class SamplingParams(BaseModel):
    """How to sample one completion request (every backend honours every field).

    Example:
        >>> SamplingParams(max_tokens=64, stop=("</analyze>\\n",), include_stop=True, logprobs=20).n
        1
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=512, ge=1)
    """Most tokens to generate per sample."""
    temperature: float = Field(default=0.7, ge=0)
    """0 means greedy decoding."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = Field(default=-1, ge=-1)
    """Sample among the k most likely tokens; -1 (or 0) disables it."""
    repetition_penalty: float = Field(default=1.0, gt=0)
    """vLLM/HF-style multiplicative penalty on tokens already in the prompt or output."""
    stop: tuple[str, ...] = ()
    """Generation ends at the first occurrence of any of these strings."""
    include_stop: bool = False
    """Keep the stop string that ended the text at its end (vLLM's ``include_stop_str_in_output``)."""
    n: int = Field(default=1, ge=1, le=256)
    """Independent samples for the one prompt."""
    seed: int | None = None
    """Makes sampling repeatable (same seed, same prompt, same backend: same text)."""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    """Return per-token logprobs with this many top alternatives (0: the chosen token only)."""

    @model_validator(mode="after")
    def _no_empty_stop(self) -> SamplingParams:
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class TopLogprob(NamedTuple):
    """One alternative at a position.

    A named tuple, not a model: a critic asks for the top-20 of every token, which makes millions
    of these per run, and a tuple costs a tenth of a model to build.
    """

    token: str
    logprob: float
    id: int | None = None
    """Token id where the backend gives it."""


class TokenLogprob(NamedTuple):
    """A generated token with its logprob and the top alternatives at its position (a named
    tuple too: one per generated token of every request)."""

    token: str
    logprob: float
    id: int | None = None
    top: tuple[TopLogprob, ...] = ()
    """The top-k alternatives, most likely first; always includes the chosen token."""


class Completion(BaseModel):
    """One sample."""

    model_config = ConfigDict(frozen=True)

    text: str
    finish_reason: FinishReason
    stop: str | None = None
    """The stop string that ended the text (None for end-of-sequence or length)."""
    tokens: tuple[TokenLogprob, ...] | None = None
    """Per-token logprobs when asked for and the backend gave them; None otherwise."""
    completion_tokens: int = 0


class CompletionResult(BaseModel):
    """All samples of one request, with usage."""

    model_config = ConfigDict(frozen=True)

    choices: tuple[Completion, ...]
    prompt_tokens: int
    completion_tokens: int
    """Sum over the choices."""
    model: str = ""


@runtime_checkable
class CompletionModel(Protocol):
    """An async raw-text completion model (vLLM, llama.cpp, SGLang, or in-process)."""

    name: str
    """What to call it in logs and reports."""

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        """Continue ``prompt`` (raw text, chat template already applied) ``params.n`` times."""
        ...

    async def aclose(self) -> None:
        """Release connections or memory."""
        ...


class ModelUsage(BaseModel):
    """What model calls used: how many, their prompt and completion tokens, and wall time."""

    model_config = ConfigDict(frozen=True)

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: ModelUsage) -> ModelUsage:
        return ModelUsage(
            calls=self.calls + other.calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            seconds=self.seconds + other.seconds,
        )
