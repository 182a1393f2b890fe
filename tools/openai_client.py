"""A completion model behind any OpenAI-compatible ``/v1/completions`` endpoint.

vLLM (``vllm serve``), SGLang, llama.cpp's server and others. vLLM's extra sampling parameters
(``top_k``, ``repetition_penalty``, ``include_stop_str_in_output``) are sent when they differ
from their neutral values; what a server does not do itself (keeping the stop string, ``n``
samples, naming the stop string that ended the text) the client does, so every server gives the
same results as the in-process engine.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Mapping
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from critloop.errors import ModelEndpointError, ModelResponseError, ModelUnavailableError
from critloop.tools._stops import cut_at_stop, find_stop
from critloop.tools.completion import (
    Completion,
    CompletionResult,
    FinishReason,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

__all__ = ["OpenAICompletionModel"]

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class _Retryable(Exception):
    """A failure worth another try (connection trouble, 408, 409, 429, 500, 502, 503, 504)."""

    def __init__(self, description: str, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class OpenAICompletionModel:
    """A :class:`~critloop.tools.completion.CompletionModel` over HTTP.

    Example:
        >>> model = OpenAICompletionModel("http://127.0.0.1:8001/v1", "GenPRM/GenPRM-7B")
        >>> result = await model.complete("1 + 1 =", SamplingParams(max_tokens=4))  # doctest: +SKIP

    Args:
        base_url: the server's OpenAI base URL, usually ending in ``/v1``.
        model: the model name the server knows.
        api_key: sent as a bearer token when given.
        timeout_seconds: limit of one HTTP request (connect, send, and the whole answer).
        max_attempts: tries per request; connection errors, 408, 409, 429, 500, 502, 503 and 504
            are retried with exponential backoff and jitter (a server's Retry-After is honoured, capped).
        backoff_seconds: first backoff; it doubles per attempt up to ``max_backoff_seconds``.
        extra_body: more JSON fields for every request (server-specific options).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_seconds: float = 300.0,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 8.0,
        extra_body: Mapping[str, Any] | None = None,
        max_connections: int = 256,
        name: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name or model
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.extra_body = dict(extra_body or {})
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_connections = max_connections
        self._url = f"{self.base_url}/completions"
        self._timeout = timeout_seconds
        # aiohttp, not httpx: at hundreds of concurrent critic calls, httpx's pool costs ~6x the
        # CPU per request (it rescans every connection), and the client becomes the bottleneck.
        self._trace = aiohttp.TraceConfig()
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        """The HTTP session of the running event loop (a session cannot change loops)."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or session._loop is not loop:
            session = self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, limit_per_host=self._max_connections
                ),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self._timeout)),
                trace_configs=[self._trace],
            )
        return session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> OpenAICompletionModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ requests

    def _body(self, prompt: str, params: SamplingParams, n: int, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
        }
        if params.stop:
            body["stop"] = list(params.stop)
            if params.include_stop:
                body["include_stop_str_in_output"] = True
        if seed is not None:
            body["seed"] = seed
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        # Tokens identify the stop string on servers that do not name it (llama.cpp).
        logprobs = params.logprobs if params.logprobs is not None else (1 if params.stop else None)
        if logprobs is not None:
            body["logprobs"] = max(logprobs, 1)
        body.update(self.extra_body)
        return body

    async def complete(self, prompt: str, params: SamplingParams) -> CompletionResult:
        data = await self._post(self._body(prompt, params, params.n, params.seed))
        choices, prompt_tokens, completion_tokens = self._parse(data, params)
        # Servers that ignore `n` (llama.cpp) return one choice: ask again for the rest.
        while len(choices) < params.n:
            seed = None if params.seed is None else params.seed + len(choices)
            missing = params.n - len(choices)
            async with asyncio.TaskGroup() as group:  # one failure cancels the others
                tasks = [
                    group.create_task(
                        self._post(self._body(prompt, params, 1, None if seed is None else seed + i))
                    )
                    for i in range(missing)
                ]
            for extra in (t.result() for t in tasks):
                parsed, _, tokens = self._parse(extra, params)
                if not parsed:
                    raise ModelResponseError(f"{self._url}: a response held no choices")
                choices.extend(parsed)
                completion_tokens += tokens
        return CompletionResult(
            choices=tuple(choices[: params.n]),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=str(data.get("model") or self.model),
        )

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        # The first attempt runs outside the retry machinery: tenacity allocates a dozen
        # objects per call, which at the critic's fan-out feed the garbage collector.
        try:
            return await self._post_once(body)
        except _Retryable as exc:
            failure = exc
        attempt = 1
        if self.max_attempts > 1:
            await asyncio.sleep(self._backoff(1, failure))
            try:
                async for attempt_state in AsyncRetrying(
                    retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                    stop=stop_after_attempt(self.max_attempts - 1),
                    wait=self._wait,
                    reraise=True,
                ):
                    with attempt_state:
                        attempt += 1
                        return await self._post_once(body)
            except _Retryable as exc:
                failure = exc
        raise ModelUnavailableError(f"{self._url}: gave up after {attempt} attempts; last failure: {failure}")

    async def check_health(self) -> None:
        """Ask the server for its models (``GET /models``), once, within 5 seconds.

        Raises:
            ModelUnavailableError: it did not answer 200.
        """
        url = f"{self.base_url}/models"
        try:
            async with asyncio.timeout(min(5.0, self._timeout)):
                async with self._http().get(url) as response:
                    status = response.status
                    await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ModelUnavailableError(f"{url}: no answer ({type(exc).__name__}: {exc})") from None
        if status != 200:
            raise ModelUnavailableError(f"{url}: HTTP {status}")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        # The first attempt ran before the retry loop: its attempt 1 is the call's attempt 2.
        return self._backoff(state.attempt_number + 1, exc)

    def _backoff(self, failed_attempt: int, exc: BaseException | None) -> float:
        """Seconds to wait after attempt ``failed_attempt`` failed with ``exc``."""
        backoff = min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (failed_attempt - 1))
        backoff = random.uniform(backoff / 2, backoff)  # jitter: clients retrying together spread out
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            backoff = max(backoff, min(exc.retry_after, 4 * self.max_backoff_seconds))
        return backoff

    async def _post_once(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            # A limit on the whole answer, a trickling server's too.
            async with asyncio.timeout(self._timeout):
                async with self._http().post(self._url, json=body) as response:
                    status, headers = response.status, response.headers
                    raw = await response.read()
        except TimeoutError as exc:
            raise _Retryable(f"timed out after {self._timeout:g}s") from exc
        except aiohttp.ClientPayloadError as exc:
            raise ModelResponseError(f"{self._url} answered a body that does not decode: {exc}") from None
        except aiohttp.ClientError as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__}: {exc})") from exc
        text = raw.decode("utf-8", errors="replace")
        if status in _RETRY_STATUS:
            raise _Retryable(f"HTTP {status}: {_snippet(text)}", _retry_after(headers))
        if status >= 400:
            raise ModelEndpointError(f"{self._url} refused the request: HTTP {status}: {_snippet(text)}")
        try:
            data = json.loads(raw)
        except ValueError:
            raise ModelResponseError(f"{self._url} answered with invalid JSON: {_snippet(text)}") from None
        if not isinstance(data, dict):
            raise ModelResponseError(f"{self._url} answered JSON that is not an object")
        return data

    # ------------------------------------------------------------------ responses

    def _parse(self, data: dict[str, Any], params: SamplingParams) -> tuple[list[Completion], int, int]:
        try:
            return self._parse_checked(data, params)
        except ModelResponseError:
            raise
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ModelResponseError(
                f"{self._url}: malformed response ({type(exc).__name__}: {exc})"
            ) from None

    def _parse_checked(
        self, data: dict[str, Any], params: SamplingParams
    ) -> tuple[list[Completion], int, int]:
        raw_choices = data.get("choices")
        if not isinstance(raw_choices, list) or not raw_choices:
            raise ModelResponseError(f"{self._url}: the response has no `choices` list")
        raw_choices = sorted(
            raw_choices,
            key=lambda c: c["index"] if isinstance(c, dict) and isinstance(c.get("index"), int) else 0,
        )
        choices = [self._choice(c, params) for c in raw_choices]
        usage = data.get("usage")
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
            raise ModelResponseError(f"{self._url}: the response has no `usage.prompt_tokens`")
        prompt_tokens = usage["prompt_tokens"]
        completion_tokens = usage.get("completion_tokens")
        if not isinstance(completion_tokens, int):
            completion_tokens = sum(c.completion_tokens for c in choices)
        if len(choices) == 1 and choices[0].completion_tokens == 0:
            choices = [choices[0].model_copy(update={"completion_tokens": completion_tokens})]
        return choices, prompt_tokens, completion_tokens

    def _choice(self, raw: Any, params: SamplingParams) -> Completion:
        if not isinstance(raw, dict) or not isinstance(raw.get("text"), str):
            raise ModelResponseError(f"{self._url}: a choice has no `text` string")
        text: str = raw["text"]
        finish = raw.get("finish_reason")
        tokens = self._tokens(raw.get("logprobs"), params.logprobs)
        stop: str | None = None
        if finish == "stop" and params.stop:
            stop = self._which_stop(raw, text, tokens, params)
            if stop is not None and params.include_stop and not text.endswith(stop):
                text += stop
            elif stop is not None and not params.include_stop and text.endswith(stop):
                text = text[: -len(stop)]
        # A server that ignored the stop strings: cut the text as the engine does.
        cut, matched = cut_at_stop(text, params.stop, include=params.include_stop)
        if matched is not None and (stop is None or len(cut) < len(text)):
            text, stop, finish = cut, matched, "stop"
        finish_reason: FinishReason = "length" if finish == "length" else "stop"  # eos, stop_sequence, ...
        # Every value is checked above; validating the token tuples again would cost more than
        # the whole HTTP exchange at the critic's fan-out.
        return Completion.model_construct(
            text=text,
            finish_reason=finish_reason,
            stop=stop,
            tokens=tuple(tokens) if tokens is not None and params.logprobs is not None else None,
            completion_tokens=len(tokens) if tokens is not None else 0,
        )

    @staticmethod
    def _which_stop(
        raw: dict[str, Any], text: str, tokens: list[TokenLogprob] | None, params: SamplingParams
    ) -> str | None:
        named = raw.get("stop_reason")
        if isinstance(named, str) and named in params.stop:
            return named  # vLLM names it
        for stop in params.stop:
            if params.include_stop and text.endswith(stop):
                return stop
        if tokens:
            # llama.cpp cuts the text before the stop string but returns the token holding it.
            joined = "".join(t.token for t in tokens)
            if joined.startswith(text):
                found = find_stop(joined, params.stop, start=len(text))
                if found is not None and found[0] == len(text):
                    return found[1]
        return None

    def _tokens(self, logprobs: Any, k: int | None) -> list[TokenLogprob] | None:
        """Per-token logprobs; ``top`` keeps the ``k`` most likely alternatives plus the chosen token."""
        if logprobs is None:
            return None
        if not isinstance(logprobs, dict):
            raise ModelResponseError(f"{self._url}: `logprobs` is not an object")
        keep = k if k is not None else 1
        if "content" in logprobs and "tokens" not in logprobs:
            return self._chat_style_tokens(logprobs["content"], keep)
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values):
            raise ModelResponseError(f"{self._url}: `logprobs.tokens` and `token_logprobs` do not match")
        tops = logprobs.get("top_logprobs") or [None] * len(tokens)
        if not isinstance(tops, list) or len(tops) != len(tokens):
            raise ModelResponseError(f"{self._url}: `logprobs.top_logprobs` does not match the tokens")
        result = []
        # Per token of every judgement stretch, with up to 20 alternatives each: kept lean.
        for token, value, top in zip(tokens, values, tops, strict=True):
            text, token_id = _token(token)
            if not _is_number(value):
                raise ModelResponseError(f"{self._url}: token {token!r} has no logprob")
            alternatives = []
            if isinstance(top, dict) and top:
                numeric = [(v, alt) for alt, v in top.items() if _is_number(v)]
                numeric.sort(key=_first, reverse=True)
                for alt_value, alt in numeric[:keep]:
                    alt_text, alt_id = _token(alt)
                    alternatives.append(TopLogprob(alt_text, float(alt_value), alt_id))
            result.append(self._with_chosen(text, token_id, float(value), alternatives))
        return result

    def _chat_style_tokens(self, content: Any, keep: int) -> list[TokenLogprob]:
        """llama.cpp's newer ``logprobs.content`` form (as in the chat API)."""
        if not isinstance(content, list):
            raise ModelResponseError(f"{self._url}: `logprobs.content` is not a list")
        result = []
        for entry in content:
            if not isinstance(entry, dict) or not _is_number(entry.get("logprob")):
                raise ModelResponseError(f"{self._url}: a `logprobs.content` entry has no logprob")
            text, token_id = _token(entry.get("token", ""))
            alternatives = [
                TopLogprob(
                    token=_token(t.get("token", ""))[0],
                    id=_token(t.get("token", ""))[1],
                    logprob=float(t["logprob"]),
                )
                for t in entry.get("top_logprobs") or []
                if isinstance(t, dict) and _is_number(t.get("logprob"))
            ]
            alternatives = sorted(alternatives, key=lambda t: -t.logprob)[:keep]
            result.append(self._with_chosen(text, token_id, float(entry["logprob"]), alternatives))
        return result

    @staticmethod
    def _with_chosen(text: str, token_id: int | None, logprob: float, top: list[TopLogprob]) -> TokenLogprob:
        """The token, with itself among its alternatives (as vLLM and the engine return it)."""
        for alt in top:
            if alt.token == text and (alt.id is None or alt.id == token_id):
                break
        else:
            top.append(TopLogprob(text, logprob, token_id))
            top.sort(key=lambda t: -t.logprob)
        return TokenLogprob(text, logprob, token_id, tuple(top))


def _first(pair: tuple[float, Any]) -> float:
    return pair[0]


def _is_number(value: Any) -> bool:
    if type(value) is float:  # nearly every value: checked first, on the hot path of logprobs
        return value == value  # not NaN
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _token(raw: Any) -> tuple[str, int | None]:
    """A token's text and id; vLLM's ``token_id:N`` form (``--return-tokens-as-token-ids``) gives the id."""
    if not isinstance(raw, str):
        return str(raw), None
    if raw.startswith("token_id:") and raw[9:].isdigit():
        return raw, int(raw[9:])
    return raw, None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
