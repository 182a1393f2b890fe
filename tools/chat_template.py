"""Raw prompts from chat messages, with the model's own chat template."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal, TypedDict

from critloop.errors import ConfigError

__all__ = ["ChatMessage", "ChatTemplate", "load_tokenizer"]


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@lru_cache(maxsize=16)
def load_tokenizer(name_or_path: str) -> Any:
    """A Hugging Face tokenizer from a hub id or a local folder (cached per process).

    Needs ``transformers`` (no torch). Raises ConfigError naming the tokenizer when it cannot
    be loaded (for instance a hub id on a machine with no hub access).
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise ConfigError("building raw prompts needs `transformers`") from exc
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc


class ChatTemplate:
    """Renders messages to the exact raw text a model was trained on.

    Example:
        >>> template = ChatTemplate.from_pretrained("/path/to/model")  # doctest: +SKIP
        >>> messages = [{"role": "user", "content": "1+1?"}]
        >>> template.render(messages, add_generation_prompt=True)  # doctest: +SKIP
        '<|im_start|>system\\n...<|im_start|>user\\n1+1?<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template"
            )
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> ChatTemplate:
        return cls(load_tokenizer(name_or_path))

    @property
    def eos_token(self) -> str | None:
        return getattr(self.tokenizer, "eos_token", None)

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` (no special tokens added)."""
        # A fast tokenizer's own Rust encoder: the transformers call around it costs several
        # times the encoding itself, paid on every piece the critic inserts.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return len(backend.encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        strip_trailing_eos: bool = True,
    ) -> str:
        """The raw prompt text for ``messages``.

        Args:
            messages: system / user / assistant turns, in order.
            add_generation_prompt: append the header of a new assistant turn.
            continue_final_message: the last message is a partial assistant turn: render it
                open-ended, so that generation continues it (true prefix continuation).
            strip_trailing_eos: remove an end-of-sequence token (and a newline after it) that
                the template puts at the very end, as the GenPRM protocol requires.
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message exclude each other")
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise ValueError("continue_final_message needs a final assistant message")
        text: str = self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        eos = self.eos_token
        if strip_trailing_eos and eos and not add_generation_prompt:
            for tail in (eos + "\n", eos):
                if text.endswith(tail):
                    text = text[: -len(tail)]
                    break
        return text
