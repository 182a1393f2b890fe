"""The contract every completion backend passes: the in-process engine and a real llama.cpp server."""

from __future__ import annotations

import math

import pytest

from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import CompletionModel, SamplingParams


@pytest.fixture(params=["engine", "llama.cpp"])
def backend(request: pytest.FixtureRequest) -> CompletionModel:
    return request.getfixturevalue("engine" if request.param == "engine" else "llama_client")


@pytest.fixture(scope="module")
def prompt(embedded_template: ChatTemplate) -> str:
    return embedded_template.render(
        [{"role": "user", "content": "Write a short story about a robot who learns to count."}],
        add_generation_prompt=True,
    )


GREEDY = SamplingParams(max_tokens=40, temperature=0)


async def test_length_finish_at_max_tokens(backend: CompletionModel, prompt: str) -> None:
    result = await backend.complete(prompt, SamplingParams(max_tokens=6, temperature=0))
    (choice,) = result.choices
    assert choice.finish_reason == "length"
    assert result.completion_tokens == 6
    assert choice.text and choice.stop is None


async def test_stop_strings_end_generation_kept_or_dropped(backend: CompletionModel, prompt: str) -> None:
    full = (await backend.complete(prompt, GREEDY)).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {full!r}"
    cut = full.find(stop)
    dropped = (await backend.complete(prompt, GREEDY.model_copy(update={"stop": (stop,)}))).choices[0]
    assert (dropped.text, dropped.finish_reason, dropped.stop) == (full[:cut], "stop", stop)
    kept = (
        await backend.complete(prompt, GREEDY.model_copy(update={"stop": (stop,), "include_stop": True}))
    ).choices[0]
    assert (kept.text, kept.finish_reason, kept.stop) == (full[: cut + len(stop)], "stop", stop)


async def test_the_earliest_of_several_stop_strings_wins(backend: CompletionModel, prompt: str) -> None:
    full = (await backend.complete(prompt, GREEDY)).choices[0].text
    late, early = full[-6:-3], full[len(full) // 3 : len(full) // 3 + 2]
    assert late.strip() and early.strip()
    params = GREEDY.model_copy(update={"stop": (late, early), "include_stop": True})
    choice = (await backend.complete(prompt, params)).choices[0]
    first = min((full.find(s), s) for s in (late, early))
    assert choice.stop == first[1]
    assert choice.text == full[: first[0] + len(first[1])]


async def test_logprobs_are_sane_and_include_the_chosen_token(backend: CompletionModel, prompt: str) -> None:
    result = await backend.complete(prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=5))
    tokens = result.choices[0].tokens
    assert tokens is not None and len(tokens) == result.completion_tokens
    assert "".join(t.token for t in tokens) == result.choices[0].text
    for token in tokens:
        assert -50 < token.logprob <= 1e-4
        assert 5 <= len(token.top) <= 6
        assert [t.logprob for t in token.top] == sorted((t.logprob for t in token.top), reverse=True)
        assert any(
            t.token == token.token and math.isclose(t.logprob, token.logprob, abs_tol=1e-4) for t in token.top
        )
        assert token.top[0].token == token.token  # greedy: the chosen token is the most likely
        assert sum(math.exp(t.logprob) for t in token.top) <= 1 + 1e-3


async def test_n_samples_and_usage_add_up(backend: CompletionModel, prompt: str) -> None:
    result = await backend.complete(prompt, SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=11))
    assert len(result.choices) == 3
    assert all(c.completion_tokens >= 1 for c in result.choices)
    assert result.completion_tokens == sum(c.completion_tokens for c in result.choices)


async def test_prompt_tokens_match_the_tokenizer(
    backend: CompletionModel, prompt: str, embedded_template: ChatTemplate
) -> None:
    expected = len(embedded_template.tokenizer(prompt)["input_ids"])
    result = await backend.complete(prompt, SamplingParams(max_tokens=1, temperature=0))
    assert abs(result.prompt_tokens - expected) <= 1  # llama.cpp may count a BOS token


async def test_seeded_sampling_repeats(backend: CompletionModel, prompt: str) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=20, seed=1234)
    first = await backend.complete(prompt, params)
    again = await backend.complete(prompt, params)
    assert first.choices[0].text == again.choices[0].text


async def test_both_backends_agree_on_the_next_token_distribution(
    engine: CompletionModel, llama_client: CompletionModel, prompt: str
) -> None:
    """Same GGUF weights (llama.cpp runs them quantised, the engine dequantised): on the same
    prefix, the top alternatives are the same tokens with close logprobs. Greedy texts may part
    at the first near-tie (here the second token), so the texts are not compared."""
    params = SamplingParams(max_tokens=2, temperature=0, logprobs=5)
    ours = (await engine.complete(prompt, params)).choices[0].tokens
    theirs = (await llama_client.complete(prompt, params)).choices[0].tokens
    assert ours is not None and theirs is not None and len(ours) == len(theirs) == 2
    assert ours[0].token == theirs[0].token  # so both second tokens follow the same prefix
    assert [t.token for t in ours[0].top] == [t.token for t in theirs[0].top]
    for a, b in zip(ours, theirs, strict=True):
        top_a = {t.token: t.logprob for t in a.top[:3]}
        top_b = {t.token: t.logprob for t in b.top[:3]}
        assert set(top_a) == set(top_b), (top_a, top_b)
        assert all(abs(top_a[t] - top_b[t]) < 0.5 for t in top_a), (top_a, top_b)


async def test_logprobs_are_raw_whatever_the_temperature(backend: CompletionModel, prompt: str) -> None:
    """Both backends return raw logprobs (of the model's own distribution, as vLLM does by
    default), which is what the critic's default ``logprobs = "raw"`` expects: the next-token
    alternatives of one prompt have the same logprobs at a low and a high temperature."""

    async def first_top(t: float) -> dict[str, float]:
        params = SamplingParams(max_tokens=1, temperature=t, logprobs=5, seed=1)
        tokens = (await backend.complete(prompt, params)).choices[0].tokens
        assert tokens
        return {alt.token: alt.logprob for alt in tokens[0].top[:5]}

    cold, hot = await first_top(0.3), await first_top(1.5)
    assert set(cold) == set(hot)
    assert all(abs(cold[t] - hot[t]) < 1e-3 for t in cold), (cold, hot)
