"""Writers: how the policy and the refiner talk to a model, completion or chat alike.

A writer takes chat messages and returns the model's reply. With ``prefix`` it continues a
partial assistant reply: a completion model does a true prefix continuation (chat template with
the partial assistant turn left open); a chat-only model (any LangChain ``BaseChatModel``) is
asked, in words, to continue without repeating.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from critloop.errors import ModelResponseError
from critloop.tools.chat_template import ChatMessage, ChatTemplate
from critloop.tools.completion import CompletionModel, ModelUsage, SamplingParams

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = ["ChatModelWriter", "CompletionWriter", "Writer", "Written", "CONTINUE_INSTRUCTION"]

CONTINUE_INSTRUCTION = (
    "Here is the beginning of a solution:\n\n{prefix}\n\n"
    "Continue this solution from exactly where it stops. Do not repeat what is already written. "
    "Write the remaining steps as paragraphs separated by blank lines, and put the final answer "
    "within \\boxed{{}}."
)
"""How a chat-only model is asked to continue a partial solution."""


@dataclass(frozen=True, kw_only=True)
class Written:
    """One reply of a writer, with what it cost."""

    text: str
    """The reply (with ``prefix``: only the continuation, not the prefix)."""
    finish_reason: str
    """``stop`` (the model ended) or ``length`` (cut at the token limit)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def usage(self) -> ModelUsage:
        """This reply as one model call's usage."""
        return ModelUsage(
            calls=1,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            seconds=self.seconds,
        )


@runtime_checkable
class Writer(Protocol):
    """Anything that turns chat messages into a reply (see :class:`CompletionWriter`,
    :class:`ChatModelWriter`)."""

    async def write(
        self, messages: Sequence[ChatMessage], *, prefix: str | None = None, max_tokens: int | None = None
    ) -> Written: ...


class CompletionWriter:
    """A writer over a raw-text :class:`CompletionModel` and the model's chat template.

    Args:
        model: the completion model (OpenAI-compatible server, in-process engine, a fake).
        template: the model's chat template.
        sampling: default sampling parameters (``max_tokens`` is the reply's limit).

    Example:
        >>> writer = CompletionWriter(model, template, SamplingParams(max_tokens=512))  # doctest: +SKIP
        >>> (await writer.write([{"role": "user", "content": "1+1?"}])).text  # doctest: +SKIP
    """

    def __init__(self, model: CompletionModel, template: ChatTemplate, sampling: SamplingParams) -> None:
        self.model = model
        self.template = template
        self.sampling = sampling

    async def write(
        self, messages: Sequence[ChatMessage], *, prefix: str | None = None, max_tokens: int | None = None
    ) -> Written:
        if prefix is None:
            prompt = self.template.render(messages, add_generation_prompt=True)
        else:
            # The template strips the open turn's trailing blank line: put the step separator back,
            # so that the model starts a new paragraph.
            partial: ChatMessage = {"role": "assistant", "content": prefix.rstrip()}
            prompt = self.template.render([*messages, partial], continue_final_message=True)
            prompt += prefix[len(prefix.rstrip()) :] or "\n\n"
        params = self.sampling
        if max_tokens is not None:
            params = params.model_copy(update={"max_tokens": max_tokens})
        started = time.perf_counter()
        result = await self.model.complete(prompt, params)
        choice = result.choices[0]
        return Written(
            text=choice.text,
            finish_reason=choice.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            seconds=time.perf_counter() - started,
        )


class ChatModelWriter:
    """A writer over any LangChain ``BaseChatModel`` (``ChatOpenAI`` against vLLM, and so on).

    Example:
        >>> from langchain_core.language_models import FakeListChatModel
        >>> import asyncio
        >>> writer = ChatModelWriter(FakeListChatModel(responses=["2"]))
        >>> asyncio.run(writer.write([{"role": "user", "content": "1+1?"}])).text
        '2'
    """

    def __init__(self, chat: BaseChatModel) -> None:
        self.chat = chat

    async def write(
        self, messages: Sequence[ChatMessage], *, prefix: str | None = None, max_tokens: int | None = None
    ) -> Written:
        from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

        kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
        chat_messages: list[BaseMessage] = [kinds[m["role"]](content=m["content"]) for m in messages]
        if prefix is not None:
            chat_messages.append(HumanMessage(content=CONTINUE_INSTRUCTION.format(prefix=prefix.strip())))
        kwargs: dict[str, Any] = {}
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        started = time.perf_counter()
        reply = await self.chat.ainvoke(chat_messages, **kwargs)
        content = reply.content
        if isinstance(content, list):  # content blocks: keep the text ones
            content = "".join(
                b if isinstance(b, str) else str(b.get("text", ""))
                for b in content
                if isinstance(b, str | dict)
            )
        if not isinstance(content, str):
            raise ModelResponseError(f"the chat model answered {type(content).__name__}, not text")
        usage = getattr(reply, "usage_metadata", None) or {}
        metadata = getattr(reply, "response_metadata", None) or {}
        finish = metadata.get("finish_reason") or "stop"
        return Written(
            text=content,
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=int(usage.get("input_tokens", 0) or 0),
            completion_tokens=int(usage.get("output_tokens", 0) or 0),
            seconds=time.perf_counter() - started,
        )
