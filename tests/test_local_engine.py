"""The in-process engine: batching, and what batching must not change."""

from __future__ import annotations

import asyncio

import pytest

from critloop.errors import ConfigError
from critloop.tools.chat_template import ChatTemplate
from critloop.tools.completion import SamplingParams
from critloop.tools.local_engine import TransformersEngine


def _prompts(engine: TransformersEngine) -> list[str]:
    template = ChatTemplate(engine.tokenizer)
    questions = ["What is 2 + 2?", "Name a prime number larger than ten, and explain why it is prime.", "Hi"]
    return [template.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]


async def test_concurrent_requests_run_as_one_batch(engine: TransformersEngine) -> None:
    prompts = _prompts(engine)
    before = engine.batches_run
    results = await asyncio.gather(
        *(
            engine.complete(p, SamplingParams(max_tokens=8, temperature=0.7, seed=i, n=2))
            for i, p in enumerate(prompts)
        )
    )
    assert engine.batches_run == before + 1
    assert [len(r.choices) for r in results] == [2, 2, 2]


async def test_batching_does_not_change_greedy_results(engine: TransformersEngine) -> None:
    """Left padding, attention masks and positions are right: batched == alone."""
    prompts = _prompts(engine)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    alone = [await engine.complete(p, params) for p in prompts]
    together = await asyncio.gather(*(engine.complete(p, params) for p in prompts))
    for a, b in zip(alone, together, strict=True):
        assert a.choices[0].text == b.choices[0].text
        assert a.prompt_tokens == b.prompt_tokens
        assert a.choices[0].tokens is not None and b.choices[0].tokens is not None
        for x, y in zip(a.choices[0].tokens, b.choices[0].tokens, strict=True):
            assert x.id == y.id and abs(x.logprob - y.logprob) < 1e-3


async def test_mixed_parameters_in_one_batch(engine: TransformersEngine) -> None:
    prompt = _prompts(engine)[1]
    short, long_ = await asyncio.gather(
        engine.complete(prompt, SamplingParams(max_tokens=3, temperature=0)),
        engine.complete(prompt, SamplingParams(max_tokens=10, temperature=0)),
    )
    assert short.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert long_.choices[0].text.startswith(short.choices[0].text)


async def test_raw_logprobs_ignore_the_temperature_and_processed_ones_follow_it(
    engine: TransformersEngine,
) -> None:
    """The default (raw, as vLLM's default) is the model's own distribution at any temperature;
    ``processed`` is the distribution after temperature: the two agree through the rescaling
    the critic does, exp(lp / T) normalised."""
    import math

    prompt = _prompts(engine)[0]

    async def top(t: float) -> dict[int | None, float]:
        params = SamplingParams(max_tokens=1, temperature=t, logprobs=5, seed=0)
        (token,) = (await engine.complete(prompt, params)).choices[0].tokens or ()
        return {alt.id: alt.logprob for alt in token.top[:5]}  # (the sampled token may follow)

    assert engine.logprobs_mode == "raw"
    cold, hot = await top(0.5), await top(2.0)
    assert cold == hot
    engine.logprobs_mode = "processed"
    try:
        sharp = await top(0.5)
    finally:
        engine.logprobs_mode = "raw"
    (a, b) = list(sharp)[:2]
    assert math.isclose(sharp[a] - sharp[b], (cold[a] - cold[b]) / 0.5, rel_tol=1e-4)


async def test_too_many_samples_is_a_clear_error(engine: TransformersEngine) -> None:
    with pytest.raises(ValueError, match="exceeds the engine's max_batch_rows"):
        await engine.complete("x", SamplingParams(n=engine.max_batch_rows + 1))


async def test_an_unloadable_model_names_itself(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = TransformersEngine(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="no-such-model"):
        await engine.complete("x", SamplingParams(max_tokens=1))


def test_rows_nobody_waits_for_stop_at_the_next_token(engine: TransformersEngine) -> None:
    """A request whose caller gave up (its future cancelled) is cut instead of generated to the end."""
    checks = iter(range(1000))
    params = SamplingParams(max_tokens=200, temperature=0.0)
    (kept,) = engine._generate([("Count from one to one hundred: one, two,", params)])
    (cut,) = engine._generate(
        [("Count from one to one hundred: one, two,", params)], [lambda: next(checks) >= 5]
    )
    assert kept.completion_tokens > 10, "the prompt must make the model write on"
    assert cut.choices[0].finish_reason == "length" and cut.completion_tokens <= 6
    assert kept.choices[0].text.startswith(cut.choices[0].text)
