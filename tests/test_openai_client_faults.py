"""Fault tests of :class:`OpenAICompletionModel` against a real local HTTP server.

Every test starts a :class:`ScriptedServer` on a free loopback port; the server answers from a
script (status, headers, body, delay) and records what the client sent and when.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from scripted_server import Recorded, Reply, ScriptedServer

from critloop.errors import ModelEndpointError, ModelResponseError
from critloop.tools.completion import CompletionResult, SamplingParams, TokenLogprob, TopLogprob
from critloop.tools.openai_client import OpenAICompletionModel

MODEL = "test/model-7B"
PROMPT = "Q: 1 + 1 = ?\nA:"


def completion_json(
    *choices: dict[str, Any], prompt_tokens: int = 11, completion_tokens: int | None = 3
) -> dict[str, Any]:
    """An OpenAI ``/v1/completions`` response body."""
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens}
    if completion_tokens is not None:
        usage["completion_tokens"] = completion_tokens
        usage["total_tokens"] = prompt_tokens + completion_tokens
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": i, **c} for i, c in enumerate(choices)],
        "usage": usage,
    }


def ok(text: str = " 2", finish: str = "length", **choice: Any) -> Reply:
    return Reply(200, completion_json({"text": text, "finish_reason": finish, **choice}))


def echo_n(request: Recorded) -> Reply:
    """A reply with as many choices as the request's ``n``."""
    n = request.json.get("n", 1)
    return Reply(200, completion_json(*({"text": f" s{i}", "finish_reason": "length"} for i in range(n))))


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv
        assert srv.unscripted == 0, "the client sent more requests than the test scripted"


@pytest.fixture
async def make_model() -> AsyncIterator[Callable[..., OpenAICompletionModel]]:
    """``make_model(base_url, **kwargs)``: a client with tiny backoffs, closed after the test."""
    models: list[OpenAICompletionModel] = []

    def make(base_url: str, **kwargs: Any) -> OpenAICompletionModel:
        options: dict[str, Any] = {
            "timeout_seconds": 5.0,
            "max_attempts": 4,
            "backoff_seconds": 0.001,
            "max_backoff_seconds": 0.01,
        }
        options.update(kwargs)
        model = OpenAICompletionModel(f"{base_url}/v1", MODEL, **options)
        models.append(model)
        return model

    yield make
    for model in models:
        await model.aclose()


def expected_token(text: str, logprob: float, *top: tuple[str, float]) -> TokenLogprob:
    """The expected parse of one token: its text and logprob, and its ``(text, logprob)`` alternatives."""
    return TokenLogprob(
        token=text, logprob=logprob, top=tuple(TopLogprob(token=t, logprob=lp) for t, lp in top)
    )


async def failure(
    model: OpenAICompletionModel,
    error: type[Exception] = ModelEndpointError,
    params: SamplingParams | None = None,
) -> str:
    """The message of the ``error`` that ``model``'s completion of PROMPT fails with."""
    with pytest.raises(error) as info:
        await model.complete(PROMPT, params or SamplingParams(max_tokens=4))
    return str(info.value)


def count_requests(model: OpenAICompletionModel) -> list[str]:
    """The URL of every HTTP request the client starts (its transport attempts), in order."""
    seen: list[str] = []

    async def hook(session: Any, context: Any, params: Any) -> None:
        seen.append(str(params.url))

    model._trace.on_request_start.append(hook)
    return seen


# ---------------------------------------------------------------------------------- 1. refused


async def test_refused_connection_gives_up_after_max_attempts(make_model) -> None:
    # A bound socket that never listens: connecting to it is refused, and no one can take the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{holder.getsockname()[1]}"
        model = make_model(base, max_attempts=3)
        attempts = count_requests(model)
        started = time.monotonic()
        message = await failure(model)
        elapsed = time.monotonic() - started
    assert attempts == [f"{base}/v1/completions"] * 3
    assert f"{base}/v1/completions" in message
    assert "connection failed" in message
    assert "gave up after 3 attempts" in message
    assert elapsed < 5.0  # tiny backoffs: no long sleeps between the attempts


# ------------------------------------------------------------------------------ 2-3. retry on status


async def test_500_twice_then_success(server: ScriptedServer, make_model) -> None:
    server.push(Reply(500, "boom"), Reply(500, "boom again"), ok(" 2", finish="stop"))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=4))
    assert isinstance(result, CompletionResult)
    assert len(server.requests) == 3
    assert [r.path for r in server.requests] == ["/v1/completions"] * 3
    assert server.requests[0].json == server.requests[2].json  # the same request, retried
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason, choice.stop, choice.tokens) == (" 2", "stop", None, None)
    assert (result.prompt_tokens, result.completion_tokens, result.model) == (11, 3, MODEL)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_retryable_status_until_max_attempts(server: ScriptedServer, make_model, status: int) -> None:
    server.push(*[Reply(status, {"error": {"message": f"overloaded-{status}"}})] * 3)
    message = await failure(make_model(server.url, max_attempts=3))
    assert len(server.requests) == 3
    assert f"{server.url}/v1/completions" in message
    assert "gave up after 3 attempts" in message
    assert f"HTTP {status}" in message
    assert f"overloaded-{status}" in message


async def test_429_retry_after_is_honoured(server: ScriptedServer, make_model) -> None:
    server.push(Reply(429, "slow down", headers={"Retry-After": "1"}), ok(" 2"))
    # The cap on Retry-After is 4 * max_backoff_seconds = 2 s: it allows the 1 s asked for.
    model = make_model(server.url, backoff_seconds=0.001, max_backoff_seconds=0.5)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=4))
    assert result.choices[0].text == " 2"
    assert len(server.requests) == 2
    gap = server.requests[1].arrived - server.requests[0].arrived
    assert 0.98 <= gap < 4.0  # waited the second asked for; upper bound only for a loaded machine


async def test_retry_after_is_capped(server: ScriptedServer, make_model) -> None:
    server.push(Reply(503, "busy", headers={"Retry-After": "120"}), ok(" 2"))
    # Cap: 4 * 0.05 = 0.2 s, not two minutes.
    model = make_model(server.url, backoff_seconds=0.001, max_backoff_seconds=0.05)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=4))
    assert result.choices[0].text == " 2"
    gap = server.requests[1].arrived - server.requests[0].arrived
    assert 0.19 <= gap < 5.0  # waited the cap, nowhere near 120 s


# ------------------------------------------------------------------------------------ 4. timeouts


async def test_hang_past_timeout_then_success(server: ScriptedServer, make_model) -> None:
    server.push(
        Reply(200, completion_json({"text": " late", "finish_reason": "length"}), delay=3.0), ok(" 2")
    )
    model = make_model(server.url, timeout_seconds=0.5)
    started = time.monotonic()
    result = await model.complete(PROMPT, SamplingParams(max_tokens=4))
    elapsed = time.monotonic() - started
    assert result.choices[0].text == " 2"
    assert len(server.requests) == 2
    assert 0.3 <= server.requests[1].arrived - server.requests[0].arrived < 5.0
    assert 0.5 <= elapsed < 5.0


async def test_always_hanging_server_times_out(server: ScriptedServer, make_model) -> None:
    server.push(*[Reply(200, completion_json({"text": " late"}), delay=10.0)] * 2)
    model = make_model(server.url, timeout_seconds=0.5, max_attempts=2)
    started = time.monotonic()
    message = await failure(model)
    elapsed = time.monotonic() - started
    assert "timed out" in message
    assert "gave up after 2 attempts" in message
    assert f"{server.url}/v1/completions" in message
    assert len(server.requests) == 2
    assert 0.95 <= elapsed < 6.0  # two 0.5 s timeouts, bounded


async def test_trickling_answer_is_limited_by_timeout(server: ScriptedServer, make_model) -> None:
    body = completion_json({"text": " 2", "finish_reason": "length"})
    # ~240 bytes at one byte per 5 ms: about 1.2 s in all, well past the 0.5 s limit, while no
    # single read waits longer than a few milliseconds.
    server.push(*[Reply(200, body, chunk_delay=0.005)] * 2)
    model = make_model(server.url, timeout_seconds=0.5, max_attempts=2)
    started = time.monotonic()
    with pytest.raises(ModelEndpointError, match="timed out"):
        await model.complete(PROMPT, SamplingParams(max_tokens=4))
    assert time.monotonic() - started < 1.5


# --------------------------------------------------------------------------- 5-6. broken responses


async def test_malformed_json_is_not_retried(server: ScriptedServer, make_model) -> None:
    server.push(Reply(200, b"{not json", headers={"Content-Type": "application/json"}))
    message = await failure(make_model(server.url), ModelResponseError)
    assert "invalid JSON" in message
    assert "{not json" in message
    assert f"{server.url}/v1/completions" in message
    assert len(server.requests) == 1


_USAGE = {"prompt_tokens": 3, "completion_tokens": 2}


@pytest.mark.parametrize(
    ("body", "params", "expected"),
    [
        pytest.param({"usage": _USAGE}, SamplingParams(), "no `choices` list", id="no-choices"),
        pytest.param(
            {"choices": [], "usage": _USAGE}, SamplingParams(), "no `choices` list", id="empty-choices"
        ),
        pytest.param(
            {"choices": {"text": "x"}, "usage": _USAGE},
            SamplingParams(),
            "no `choices` list",
            id="choices-not-list",
        ),
        pytest.param(
            {"choices": [{"index": 0, "finish_reason": "length"}], "usage": _USAGE},
            SamplingParams(),
            "a choice has no `text` string",
            id="choice-without-text",
        ),
        pytest.param(
            {"choices": [{"index": 0, "text": 5}], "usage": _USAGE},
            SamplingParams(),
            "a choice has no `text` string",
            id="text-not-string",
        ),
        pytest.param(
            {"choices": ["x"], "usage": _USAGE},
            SamplingParams(),
            "a choice has no `text` string",
            id="choice-not-object",
        ),
        pytest.param(
            {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]},
            SamplingParams(),
            "no `usage.prompt_tokens`",
            id="no-usage",
        ),
        pytest.param(
            {
                "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                "usage": {"completion_tokens": 1},
            },
            SamplingParams(),
            "no `usage.prompt_tokens`",
            id="usage-without-prompt-tokens",
        ),
        pytest.param(
            {
                "choices": [
                    {"index": 0, "text": "ab", "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.1]}}
                ],
                "usage": _USAGE,
            },
            SamplingParams(logprobs=1),
            "`logprobs.tokens` and `token_logprobs` do not match",
            id="logprobs-length-mismatch",
        ),
        pytest.param(
            {
                "choices": [
                    {
                        "index": 0,
                        "text": "ab",
                        "logprobs": {
                            "tokens": ["a", "b"],
                            "token_logprobs": [-0.1, -0.2],
                            "top_logprobs": [{"a": -0.1}],
                        },
                    }
                ],
                "usage": _USAGE,
            },
            SamplingParams(logprobs=1),
            "`logprobs.top_logprobs` does not match the tokens",
            id="top-logprobs-length-mismatch",
        ),
        pytest.param(
            {"choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"]}}], "usage": _USAGE},
            SamplingParams(logprobs=1),
            "`logprobs.tokens` and `token_logprobs` do not match",
            id="logprobs-values-missing",
        ),
        pytest.param(
            {
                "choices": [
                    {"index": 0, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [None]}}
                ],
                "usage": _USAGE,
            },
            SamplingParams(logprobs=1),
            "token 'a' has no logprob",
            id="token-logprob-null",
        ),
        pytest.param(
            {"choices": [{"index": 0, "text": "a", "logprobs": [-0.1]}], "usage": _USAGE},
            SamplingParams(logprobs=1),
            "`logprobs` is not an object",
            id="logprobs-not-object",
        ),
        pytest.param([{"text": "a"}], SamplingParams(), "JSON that is not an object", id="top-level-array"),
    ],
)
async def test_schema_breaks_raise_response_error(
    server: ScriptedServer, make_model, body: Any, params: SamplingParams, expected: str
) -> None:
    server.push(Reply(200, body))
    message = await failure(make_model(server.url), ModelResponseError, params)
    assert expected in message
    assert f"{server.url}/v1/completions" in message
    assert len(server.requests) == 1  # a broken answer is not retried


async def test_a_malformed_logprobs_block_is_a_response_error(server: ScriptedServer, make_model) -> None:
    body = {
        "choices": [{"index": 0, "text": "a", "logprobs": {"tokens": 5, "token_logprobs": [-0.1]}}],
        "usage": _USAGE,
    }
    server.push(Reply(200, body))
    with pytest.raises(ModelResponseError, match="do not match"):
        await make_model(server.url).complete(PROMPT, SamplingParams(logprobs=1))
    assert len(server.requests) == 1


async def test_harmless_quirks_are_tolerated(server: ScriptedServer, make_model) -> None:
    """A null choice index and a non-numeric alternative do not cost the answer."""
    body = {
        "choices": [
            {
                "index": None,
                "text": "a",
                "logprobs": {
                    "tokens": ["a"],
                    "token_logprobs": [-0.1],
                    "top_logprobs": [{"a": -0.1, "b": "x"}],
                },
            },
            {"index": 1, "text": "b"},
        ],
        "usage": _USAGE,
    }
    server.push(Reply(200, body))
    result = await make_model(server.url).complete(PROMPT, SamplingParams(n=2, logprobs=1))
    assert [c.text for c in result.choices] == ["a", "b"]
    tokens = result.choices[0].tokens
    assert tokens is not None and [t.token for t in tokens[0].top] == ["a"]
    assert len(server.requests) == 1


async def test_body_breaking_its_content_encoding(server: ScriptedServer, make_model) -> None:
    server.push(Reply(200, b"this is not gzip", headers={"Content-Encoding": "gzip"}))
    await failure(make_model(server.url), ModelResponseError)
    assert len(server.requests) == 1


# ------------------------------------------------------------------------- 7. logprobs missing


async def test_logprobs_missing_when_requested(server: ScriptedServer, make_model) -> None:
    server.push(ok(" The answer is 2.", finish="length"))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=8, logprobs=5))
    assert server.requests[0].json["logprobs"] == 5
    (choice,) = result.choices
    assert choice.tokens is None
    assert choice.text == " The answer is 2."
    assert choice.finish_reason == "length"
    assert choice.completion_tokens == 3  # from usage, as no tokens came back


# ------------------------------------------------------------------------------- 8. refused request


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_non_retryable_4xx_fails_at_once(server: ScriptedServer, make_model, status: int) -> None:
    error = {
        "error": {"message": "max_tokens (999999) is too large for this model", "type": "BadRequestError"}
    }
    server.push(Reply(status, error))
    message = await failure(make_model(server.url))
    assert len(server.requests) == 1
    assert f"HTTP {status}" in message
    assert "max_tokens (999999) is too large for this model" in message
    assert f"{server.url}/v1/completions" in message


# ------------------------------------------------------------------------------------ 9. parsing


async def test_openai_legacy_logprobs(server: ScriptedServer, make_model) -> None:
    logprobs = {
        "tokens": ["Hello", " world"],
        "token_logprobs": [-0.1, -2.0],
        "top_logprobs": [
            {" foo": -3.0, "Hello": -0.1, "Hi": -2.5},  # unsorted; holds the chosen token
            {" all": -1.0, " there": -0.5},  # lacks the chosen token
        ],
        "text_offset": [0, 5],
    }
    server.push(ok("Hello world", finish="length", logprobs=logprobs))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=2, logprobs=3))
    (choice,) = result.choices
    assert choice.text == "Hello world"
    assert choice.tokens == (
        expected_token("Hello", -0.1, ("Hello", -0.1), ("Hi", -2.5), (" foo", -3.0)),
        expected_token(" world", -2.0, (" there", -0.5), (" all", -1.0), (" world", -2.0)),
    )
    for token in choice.tokens:
        values = [t.logprob for t in token.top]
        assert values == sorted(values, reverse=True)
        assert sum(t.token == token.token for t in token.top) == 1
    assert choice.completion_tokens == 2


async def test_chat_style_logprobs(server: ScriptedServer, make_model) -> None:
    # llama.cpp's newer /v1/completions form: `logprobs.content`.
    logprobs = {
        "content": [
            {
                "token": "4",
                "logprob": -0.2,
                "top_logprobs": [{"token": "4", "logprob": -0.2}, {"token": "5", "logprob": -2.0}],
            },
            {"token": ".", "logprob": -1.5, "top_logprobs": [{"token": "!", "logprob": -0.4}]},
        ]
    }
    server.push(ok("4.", finish="length", logprobs=logprobs))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=2, logprobs=2))
    assert result.choices[0].tokens == (
        expected_token("4", -0.2, ("4", -0.2), ("5", -2.0)),
        expected_token(".", -1.5, ("!", -0.4), (".", -1.5)),
    )


async def test_vllm_token_id_form(server: ScriptedServer, make_model) -> None:
    logprobs = {
        "tokens": ["token_id:123", "token_id:7"],
        "token_logprobs": [-0.3, -0.9],
        "top_logprobs": [{"token_id:9": -1.8, "token_id:123": -0.3}, {"token_id:7": -0.9}],
    }
    server.push(ok("ab", logprobs=logprobs))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=2, logprobs=2))
    tokens = result.choices[0].tokens
    assert tokens is not None
    assert [t.id for t in tokens] == [123, 7]
    assert [[(a.id, a.logprob) for a in t.top] for t in tokens] == [[(123, -0.3), (9, -1.8)], [(7, -0.9)]]


async def test_logprobs_zero_gives_the_chosen_token_only(server: ScriptedServer, make_model) -> None:
    logprobs = {"tokens": ["B"], "token_logprobs": [-2.0], "top_logprobs": [{"A": -0.1}]}
    server.push(ok("B", logprobs=logprobs))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=1, logprobs=0))
    assert server.requests[0].json["logprobs"] == 1
    assert result.choices[0].tokens == (expected_token("B", -2.0, ("B", -2.0)),)


STOPS = ("</a>", "</b>")


@pytest.mark.parametrize("server_included", [True, False])
async def test_vllm_stop_reason_with_include_stop(
    server: ScriptedServer, make_model, server_included: bool
) -> None:
    text = " 4.</b>" if server_included else " 4."
    server.push(ok(text, finish="stop", stop_reason="</b>"))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=8, stop=STOPS, include_stop=True))
    (choice,) = result.choices
    assert (choice.text, choice.stop, choice.finish_reason) == (" 4.</b>", "</b>", "stop")
    assert choice.tokens is None  # logprobs went out only to identify stops


async def test_vllm_stop_reason_without_include_stop(server: ScriptedServer, make_model) -> None:
    server.push(ok(" 4.", finish="stop", stop_reason="</a>"))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=8, stop=STOPS))
    (choice,) = result.choices
    assert (choice.text, choice.stop, choice.finish_reason) == (" 4.", "</a>", "stop")


async def test_eos_is_not_a_stop_string(server: ScriptedServer, make_model) -> None:
    # vLLM: stop_reason None (or a token id) when the end-of-sequence token ended the text.
    server.push(ok(" 4.", finish="stop", stop_reason=None))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=8, stop=STOPS, include_stop=True))
    (choice,) = result.choices
    assert (choice.text, choice.stop, choice.finish_reason) == (" 4.", None, "stop")


def llama_cpp_stop_reply(request: Recorded) -> Reply:
    """llama.cpp: the text is cut before the stop string; the tokens hold the one containing it."""
    assert request.json["stop"] == list(STOPS)
    assert request.json["logprobs"] >= 1
    logprobs = {
        "tokens": [" The", " answer", " is", " 4", ".</b>", "\n"],
        "token_logprobs": [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6],
        "top_logprobs": [None] * 6,
    }
    return Reply(
        200,
        completion_json(
            {"text": " The answer is 4.", "finish_reason": "stop", "logprobs": logprobs},
            completion_tokens=6,
        ),
    )


@pytest.mark.parametrize(
    ("include_stop", "expected_text"), [(True, " The answer is 4.</b>"), (False, " The answer is 4.")]
)
async def test_llama_cpp_stop_from_tokens(
    server: ScriptedServer, make_model, include_stop: bool, expected_text: str
) -> None:
    server.push(llama_cpp_stop_reply)
    model = make_model(server.url)
    result = await model.complete(
        PROMPT, SamplingParams(max_tokens=16, stop=STOPS, include_stop=include_stop)
    )
    (choice,) = result.choices
    assert (choice.text, choice.stop, choice.finish_reason) == (expected_text, "</b>", "stop")
    assert choice.tokens is None
    assert server.requests[0].json["logprobs"] == 1


@pytest.mark.parametrize(("include_stop", "expected_text"), [(True, "Step 1</a>"), (False, "Step 1")])
async def test_server_that_ignored_stops(
    server: ScriptedServer, make_model, include_stop: bool, expected_text: str
) -> None:
    server.push(ok("Step 1</a>Step 2</b>Step 3", finish="length"))
    model = make_model(server.url)
    result = await model.complete(
        PROMPT, SamplingParams(max_tokens=16, stop=("</b>", "</a>"), include_stop=include_stop)
    )
    (choice,) = result.choices
    assert (choice.text, choice.stop, choice.finish_reason) == (expected_text, "</a>", "stop")


# ------------------------------------------------------------------------- 10. n over follow-ups


def one_choice_per_request(request: Recorded) -> Reply:
    """llama.cpp ignores `n`: one choice whatever was asked, its text naming the seed."""
    seed = request.json.get("seed")
    completion_tokens = {42: 5, 43: 7, 44: 9}[seed]
    return Reply(
        200,
        completion_json(
            {"text": f" seed={seed}", "finish_reason": "length"},
            prompt_tokens=10 + seed,  # differs per request: only the first one counts
            completion_tokens=completion_tokens,
        ),
    )


async def test_n_from_a_server_returning_one_choice(server: ScriptedServer, make_model) -> None:
    server.push(*[one_choice_per_request] * 3)
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=8, n=3, seed=42))
    assert len(server.requests) == 3
    bodies = [r.json for r in server.requests]
    assert (bodies[0]["n"], bodies[0]["seed"]) == (3, 42)
    assert sorted((b["n"], b["seed"]) for b in bodies[1:]) == [(1, 43), (1, 44)]
    assert [c.text for c in result.choices] == [" seed=42", " seed=43", " seed=44"]
    assert [c.completion_tokens for c in result.choices] == [5, 7, 9]
    assert result.completion_tokens == 5 + 7 + 9
    assert result.prompt_tokens == 52


async def test_n_from_a_server_returning_one_choice_without_seed(server: ScriptedServer, make_model) -> None:
    server.push(ok(" a"), ok(" b"), ok(" c"))
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=8, n=3))
    assert len(server.requests) == 3
    assert all("seed" not in r.json for r in server.requests)
    assert [r.json["n"] for r in server.requests] == [3, 1, 1]
    assert result.choices[0].text == " a"
    assert sorted(c.text for c in result.choices) == [" a", " b", " c"]
    assert (result.prompt_tokens, result.completion_tokens) == (11, 9)


async def test_n_all_in_one_response(server: ScriptedServer, make_model) -> None:
    server.push(echo_n)
    model = make_model(server.url)
    result = await model.complete(PROMPT, SamplingParams(max_tokens=8, n=3))
    assert len(server.requests) == 1
    assert [c.text for c in result.choices] == [" s0", " s1", " s2"]


# ------------------------------------------------------------------------------ 11. request body


BASE_BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 512, "temperature": 0.7, "top_p": 1.0, "n": 1}


@pytest.mark.parametrize(
    ("params", "extra"),
    [
        pytest.param(SamplingParams(), {}, id="defaults"),
        pytest.param(
            SamplingParams(
                max_tokens=64,
                temperature=0.0,
                top_p=0.9,
                top_k=20,
                repetition_penalty=1.1,
                stop=("</a>", "</b>"),
                include_stop=True,
                n=2,
                seed=7,
                logprobs=5,
            ),
            {
                "max_tokens": 64,
                "temperature": 0.0,
                "top_p": 0.9,
                "top_k": 20,
                "repetition_penalty": 1.1,
                "stop": ["</a>", "</b>"],
                "include_stop_str_in_output": True,
                "n": 2,
                "seed": 7,
                "logprobs": 5,
            },
            id="everything",
        ),
        pytest.param(SamplingParams(stop=("\n\n",)), {"stop": ["\n\n"], "logprobs": 1}, id="stops-only"),
        pytest.param(SamplingParams(include_stop=True), {}, id="include-stop-without-stops"),
        pytest.param(SamplingParams(logprobs=0), {"logprobs": 1}, id="logprobs-0"),
        pytest.param(SamplingParams(logprobs=20), {"logprobs": 20}, id="logprobs-20"),
        pytest.param(SamplingParams(top_k=0, repetition_penalty=1.0), {}, id="neutral-top-k-0"),
        pytest.param(SamplingParams(top_k=-1), {}, id="neutral-top-k-minus-1"),
        pytest.param(SamplingParams(top_k=1), {"top_k": 1}, id="top-k-1"),
        pytest.param(
            SamplingParams(repetition_penalty=0.9), {"repetition_penalty": 0.9}, id="penalty-below-1"
        ),
        pytest.param(SamplingParams(seed=0), {"seed": 0}, id="seed-0"),
    ],
)
async def test_request_body(
    server: ScriptedServer, make_model, params: SamplingParams, extra: dict[str, Any]
) -> None:
    server.push(echo_n)
    model = make_model(server.url)
    await model.complete(PROMPT, params)
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/v1/completions")
    assert request.headers["content-type"] == "application/json"
    assert request.json == {**BASE_BODY, **extra}


async def test_extra_body_is_merged(server: ScriptedServer, make_model) -> None:
    server.push(echo_n, echo_n)
    extra_body = {"min_p": 0.05, "skip_special_tokens": False, "temperature": 0.2}
    model = make_model(server.url, extra_body=extra_body)
    await model.complete(PROMPT, SamplingParams(max_tokens=4))
    await model.complete(PROMPT, SamplingParams(max_tokens=4, stop=("x",)))
    first, second = (r.json for r in server.requests)
    assert first == {
        **BASE_BODY,
        "max_tokens": 4,
        "min_p": 0.05,
        "skip_special_tokens": False,
        "temperature": 0.2,
    }
    assert second == {**first, "stop": ["x"], "logprobs": 1}


@pytest.mark.parametrize(("api_key", "expected"), [("KEY", "Bearer KEY"), (None, None), ("", None)])
async def test_authorization_header(
    server: ScriptedServer, make_model, api_key: str | None, expected: str | None
) -> None:
    server.push(echo_n)
    model = make_model(server.url, api_key=api_key)
    await model.complete(PROMPT, SamplingParams(max_tokens=4))
    assert server.requests[0].headers.get("authorization") == expected


async def test_base_url_trailing_slash(server: ScriptedServer) -> None:
    server.push(echo_n)
    model = OpenAICompletionModel(f"{server.url}/v1/", MODEL)
    try:
        await model.complete(PROMPT, SamplingParams(max_tokens=4))
    finally:
        await model.aclose()
    assert server.requests[0].path == "/v1/completions"
