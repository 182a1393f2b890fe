"""Raw prompts from the embedded model's real chat template."""

from __future__ import annotations

import pytest

from critloop.errors import ConfigError
from critloop.tools.chat_template import ChatTemplate

CONVERSATION = [
    {"role": "system", "content": "You are a math teacher."},
    {"role": "user", "content": "Step 1"},
    {"role": "assistant", "content": "Critique 1"},
]


def test_render_without_generation_prompt_strips_the_trailing_eos(template: ChatTemplate) -> None:
    assert template.render(CONVERSATION) == (
        "<|im_start|>system\nYou are a math teacher.<|im_end|>\n"
        "<|im_start|>user\nStep 1<|im_end|>\n"
        "<|im_start|>assistant\nCritique 1"
    )


def test_render_can_keep_the_trailing_eos(template: ChatTemplate) -> None:
    assert template.render(CONVERSATION, strip_trailing_eos=False).endswith("Critique 1<|im_end|>\n")


def test_generation_prompt_opens_an_assistant_turn(template: ChatTemplate) -> None:
    text = template.render(CONVERSATION[:2], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nStep 1<|im_end|>\n<|im_start|>assistant\n")


def test_partial_assistant_message_continues(template: ChatTemplate) -> None:
    partial = [*CONVERSATION[:2], {"role": "assistant", "content": "Step 1 is"}]
    assert template.render(partial, continue_final_message=True).endswith("<|im_start|>assistant\nStep 1 is")


def test_the_default_system_prompt_of_the_template_applies(template: ChatTemplate) -> None:
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_bad_combinations_are_errors(template: ChatTemplate) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        template.render(CONVERSATION, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="final assistant message"):
        template.render(CONVERSATION[:2], continue_final_message=True)


def test_a_tokenizer_without_template_is_a_config_error() -> None:
    class Bare:
        chat_template = None
        name_or_path = "bare-tokenizer"

    with pytest.raises(ConfigError, match="bare-tokenizer"):
        ChatTemplate(Bare())


def test_token_counts_match_the_tokenizer_with_and_without_its_fast_encoder(template: ChatTemplate) -> None:
    text = "Let's verify: 3 * 4 = 12, so \\boxed{Yes}.\n```python\nprint(3 * 4)\n```"
    expected = len(template.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert expected > 5
    assert template.count_tokens(text) == expected

    class Slow:  # a tokenizer without a Rust backend: the generic call counts
        chat_template = template.tokenizer.chat_template

        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            return template.tokenizer(text, add_special_tokens=add_special_tokens)

    assert ChatTemplate(Slow()).count_tokens(text) == expected
